"""Compact stores: int4 targets, zstd members and JPEG pixels.

int4 is checked against a block quantiser and a nibble packing written here; a compact store is read back by hand
with webdataset, numcodecs, numpy and PIL as docs/FORMAT.md says; the pixels of a loader batch are the pixels the
teacher ran on (the teacher's targets are recomputed from them by the by-hand forward of tests/reference.py); a
decoder that gives other pixels stops the loader and fails verify, unless Pillow (the reference) gives the
teacher's; --dry-run prints the size and writes nothing.
"""
import io
import json
import subprocess
import sys
import tarfile

import numcodecs
import numpy as np
import pytest
import torch
from PIL import Image

from helpers import CLI_TINY, TINY, precompute, precompute_env, write_photos
from reference import reference_forward
from hdistill.common.errors import HdistillError
from hdistill.common.targets import TargetSpec
from hdistill.precompute.config import PrecomputeConfig
from hdistill.precompute.teachers import build_teachers
from hdistill.shards.encoding import decode, decode_batch, encode
from hdistill.shards.manifest import read_manifest
from hdistill.shards.reader import StoreReader
from hdistill.shards.verify import verify_store
from hdistill.train.loader import Store


def int4_by_hand(x: np.ndarray, block: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """One row at a time, one block at a time: scale max|block| / 7 in float16, q = round(x / s) + 8, packed two per
    byte with the even index in the low nibble."""
    *rows, width = x.shape
    flat = x.reshape(-1, width).astype(np.float32)
    nb = -(-width // block)
    packed = np.zeros((flat.shape[0], -(-width // 2)), np.uint8)
    scales = np.zeros((flat.shape[0], nb), np.float16)
    for r, row in enumerate(flat):
        q = np.zeros(width + width % 2, np.int64)
        for b in range(nb):
            part = row[b * block:(b + 1) * block]
            s = np.float16(np.abs(part).max() / 7)
            scales[r, b] = s
            if s > 0:
                q[b * block:b * block + len(part)] = np.clip(np.round(part / np.float32(s)), -7, 7)
        q += 8
        q[width:] = 8
        packed[r] = q[0::2] | (q[1::2] << 4)
    return packed.reshape(*rows, -1), scales.reshape(*rows, nb)


def test_int4_packs_as_written_here_and_decodes_within_half_a_step():
    g = torch.Generator().manual_seed(1)
    values = torch.randn(2, 3, 7, 69, generator=g) * torch.logspace(-2, 2, 69)            # outlier channels
    values[0, 0, 0] = 0.0                                                                 # a row of zeros
    spec = TargetSpec("rel", "mae", 1, (3, 7, 69), "int4")
    arrays = encode(spec, values, who=str)
    batch = decode_batch([spec], arrays)["rel.mae.b1"]
    for i in range(2):
        packed, scales = int4_by_hand(values[i].numpy())
        np.testing.assert_array_equal(arrays["rel.mae.b1"][i].numpy(), packed)
        np.testing.assert_array_equal(arrays["scale.rel.mae.b1"][i].numpy(), scales)
        got = decode(spec, {k: v[i].numpy() for k, v in arrays.items()})
        np.testing.assert_array_equal(batch[i].numpy(), got)
        step = np.repeat(scales.astype(np.float32), 32, -1)[..., :69]
        # half a step, plus the float16 rounding of the scale (7 steps of at most 2^-11 each)
        assert (np.abs(got - values[i].numpy()) <= step / 2 + 7 * step / 2048 + 1e-7).all()
    np.testing.assert_array_equal(batch[0, 0, 0], 0)


@pytest.fixture(scope="module")
def compact(tmp_path_factory):
    """The same photos as a raw fp16 store and as a compact one (JPEG pixels, int4 targets, zstd), and a --tokens
    full JPEG store with fp16 targets (for recomputing the teacher's targets from a batch's pixels)."""
    root = tmp_path_factory.mktemp("compact")
    write_photos(root / "photos", 6, seed=4)
    targets = ["clip:feat", "mae:rel@1,2"]
    precompute(root / "photos", root / "raw", targets=targets, views=2)
    precompute(root / "photos", root / "small", targets=targets, views=2, pixels="jpeg", encodings=["int4"],
               compress="zstd", jpeg_quality=80)
    precompute(root / "photos", root / "full", targets=targets, pixels="jpeg", tokens="full")
    precompute(root / "photos", root / "full4", targets=targets, tokens="full", encodings=["int4"])
    return root


def plain_samples(store):
    """Every sample of a compact store read with tarfile, numcodecs, numpy and PIL only, as docs/FORMAT.md says."""
    manifest = read_manifest(store)
    n, P = manifest.layout.stored_patches, manifest.layout.patch_size
    columns = manifest.layout.image_size // P
    C = -(-P // 8) * 8
    out = {}
    for shard in manifest.shards:
        with tarfile.open(store / shard.file) as tar:
            entries = {}
            for member in tar.getmembers():
                key, _, entry = member.name.partition(".")
                entries.setdefault(key, {})[entry] = tar.extractfile(member).read()
        for key, e in entries.items():
            mosaic = np.asarray(Image.open(io.BytesIO(e["pixels.jpg"])))
            cells = mosaic.reshape(-1, C, columns, C, 3).transpose(0, 2, 1, 3, 4).reshape(-1, C, C, 3)
            sample = {"pixels": cells[:n, :P, :P]}
            for spec in manifest.targets:
                load = lambda name: np.load(io.BytesIO(numcodecs.Zstd().decode(e[f"{name}.npy.zst"])))  # noqa: E731
                packed, scale = load(spec.name), load(f"scale.{spec.name}")
                q = np.stack([packed & 15, packed >> 4], -1).reshape(*packed.shape[:-1], -1)[..., :spec.shape[-1]]
                steps = np.repeat(scale.astype(np.float32), 32, -1)[..., :spec.shape[-1]]
                sample[spec.name] = (q.astype(np.float32) - 8) * steps
            out[key] = sample
    return out


def test_a_compact_store_reads_by_hand_as_the_reader_reads_it(compact):
    manifest = read_manifest(compact / "small")
    assert manifest.pixels.encoding == "jpeg" and manifest.pixels.quality == 80
    assert manifest.pixels.decoder["library"] == "Pillow" and manifest.compress == "zstd"
    reader = StoreReader(compact / "small", manifest)
    by_hand = plain_samples(compact / "small")
    read = {s.key: s for shard in manifest.shards for s in reader.read(shard)}
    assert read.keys() == by_hand.keys() and len(read) == 12
    for key, sample in read.items():
        np.testing.assert_array_equal(sample.pixels, by_hand[key]["pixels"])
        for name, values in sample.targets.items():
            np.testing.assert_array_equal(values, by_hand[key][name])
    raw_manifest = read_manifest(compact / "raw")
    raw_reader = StoreReader(compact / "raw", raw_manifest)
    raw = {s.key: s for shard in raw_manifest.shards for s in raw_reader.read(shard)}
    same = [key for key, sample in read.items() if np.array_equal(sample.keep, raw[key].keep)]
    assert same                # the mask follows the teacher's pixels: where it kept the same patches, compare them
    for key in same:           # the same views, within JPEG's error of the rendered pixels
        err = np.abs(read[key].pixels.astype(int) - raw[key].pixels.astype(int))
        assert 0 < err.mean() < 8


def test_the_pixels_a_batch_carries_are_the_pixels_the_teacher_ran_on(compact):
    store = Store(compact / "full")
    manifest = store.manifest
    S, P = manifest.layout.image_size, manifest.layout.patch_size
    g = S // P
    teacher = build_teachers(PrecomputeConfig(**manifest.config), "cpu")["mae"]
    batch = next(iter(store.loader(4, mask="none", lanes=1)))
    patches = batch["pixels"]                                                          # [B, N, P, P, 3], patch order
    assert torch.equal(batch["keep"], torch.arange(g * g).expand(4, -1))
    views = patches.reshape(4, g, g, P, P, 3).permute(0, 1, 3, 2, 4, 5).reshape(4, S, S, 3)
    _, relations, _, _ = reference_forward(teacher, views)
    for block in (1, 2):
        stored = batch["targets"][f"rel.mae.b{block}"].float()
        torch.testing.assert_close(stored, relations[block], rtol=2e-3, atol=2e-3)
    # pixels a few levels off give the teacher other relations: the comparison can fail
    blurred = (views.float() + torch.randint(-3, 4, views.shape)).clamp(0, 255).to(torch.uint8)
    _, other, _, _ = reference_forward(teacher, blurred)
    assert not torch.allclose(batch["targets"]["rel.mae.b1"].float(), other[1], rtol=2e-3, atol=2e-3)


def test_a_full_int4_store_is_decoded_then_cut_by_token(compact):
    """A --tokens full store's int4 target cannot be cut packed: the loader decodes it, then takes the rows and
    columns of the patches the mask chose; here against a decode by hand (int4_by_hand's inverse) and a cut by hand."""
    store = Store(compact / "full4")
    manifest = store.manifest
    reader = StoreReader(compact / "full4", manifest)
    stored = {s.key: s.stored for shard in manifest.shards for s in reader.read(shard)}
    for batch in store.loader(4, mask="random", lanes=1):
        assert batch["targets"]["rel.mae.b1"].dtype == torch.float16
        for i, key in enumerate(batch["keys"]):
            tokens = np.concatenate([[0], batch["keep"][i].numpy() + 1])                 # CLS, then the chosen patches
            for name in ("feat.clip", "rel.mae.b1"):
                packed, scale = stored[key][name], stored[key][f"scale.{name}"]
                width = manifest.target(name).shape[-1]
                q = np.stack([packed & 15, packed >> 4], -1).reshape(*packed.shape[:-1], -1)[..., :width]
                values = (q.astype(np.float32) - 8) * np.repeat(scale.astype(np.float32), 32, -1)[..., :width]
                expected = values[tokens] if name == "feat.clip" else values[:, tokens][:, :, tokens]
                np.testing.assert_array_equal(batch["targets"][name][i].numpy(), expected.astype(np.float16))


def off_by_one(decode):
    """A JPEG decoder that gives other pixels than `decode`: its first pixel's lowest bit flipped."""
    def other(data, where="a JPEG"):
        image = decode(data, where).copy()
        image[0, 0, 0] ^= 1
        return image
    return other


def test_a_decoder_that_gives_other_pixels_stops_the_loader_and_fails_verify(compact, monkeypatch):
    import hdistill.shards.pixels as pixels
    for name, (decode_jpeg, describe) in list(pixels.DECODERS.items()):
        monkeypatch.setitem(pixels.DECODERS, name, (off_by_one(decode_jpeg), describe))
    with pytest.raises(HdistillError, match=r"view0-000000.tar: its JPEG pixels decode here \(TorchCodec .*: CRC32C "
                                            r"[0-9a-f]{8}; Pillow .*\) to other pixels than the teacher saw"):
        next(iter(Store(compact / "small").loader(4, lanes=1)))
    _, problems = verify_store(compact / "small")
    assert len(problems) == len(read_manifest(compact / "small").shards)
    assert all("to other pixels than the teacher saw" in p for p in problems)
    monkeypatch.undo()
    assert verify_store(compact / "small")[1] == []


def test_the_loader_decodes_with_pillow_where_the_faster_decoder_gives_other_pixels(compact, monkeypatch):
    import hdistill.shards.pixels as pixels
    decode_jpeg, describe = pixels.DECODERS["torchcodec"]
    monkeypatch.setitem(pixels.DECODERS, "torchcodec", (off_by_one(decode_jpeg), describe))
    manifest = read_manifest(compact / "small")
    reader = StoreReader(compact / "small", manifest)
    read = {s.key: s.pixels for shard in manifest.shards for s in reader.read(shard)}
    assert reader.jpeg_decoder == "pillow"
    by_hand = plain_samples(compact / "small")
    assert all(np.array_equal(pixels, by_hand[key]["pixels"]) for key, pixels in read.items())
    batch = next(iter(Store(compact / "small").loader(4, lanes=1)))
    for key, patches in zip(batch["keys"], batch["pixels"]):
        np.testing.assert_array_equal(patches.numpy(), by_hand[key]["pixels"])
    assert verify_store(compact / "small")[1] == []


def test_a_process_without_torchcodec_reads_with_pillow(compact, monkeypatch):
    import hdistill.shards.pixels as pixels
    monkeypatch.setitem(sys.modules, "torchcodec.decoders", None)           # import torchcodec.decoders fails
    pixels.loader_decoders.cache_clear()
    try:
        manifest = read_manifest(compact / "small")
        reader = StoreReader(compact / "small", manifest)
        read = {s.key: s.pixels for s in reader.read(manifest.shards[0])}
        assert reader.jpeg_decoder == "pillow"
        by_hand = plain_samples(compact / "small")
        assert all(np.array_equal(p, by_hand[key]["pixels"]) for key, p in read.items())
    finally:
        pixels.loader_decoders.cache_clear()


def test_jpeg_pixels_are_refused_in_zarr(tmp_path):
    cfg = PrecomputeConfig(data=str(tmp_path), **{**TINY, "pixels": "jpeg", "formats": ["zarr"]})
    with pytest.raises(HdistillError, match=r"--pixels jpeg \(the default\) is written in --format wds only"):
        cfg.validate()


def test_dry_run_prints_the_size_and_writes_nothing(compact, tmp_path):
    out = tmp_path / "store"
    models = CLI_TINY[:CLI_TINY.index("--encoding")]                       # the tiny teachers; the store's defaults
    cmd = [sys.executable, "-m", "hdistill", "precompute", "--data", str(compact / "photos"), "--out", str(out),
           "--workers", "0", "--device", "cpu", *models, "--views", "16", "--dry-run"]
    result = subprocess.run(cmd, capture_output=True, text=True, env=precompute_env(), timeout=300)
    assert result.returncode == 0, result.stderr
    assert not out.exists()
    assert "6 images x 16 views x" in result.stderr and "kB per view" in result.stderr
    assert "pixels.jpg" in result.stderr and "(estimated from 6 views)" in result.stderr
    assert "feat.clip.npy.zst" in result.stderr and "reads" in result.stderr
    inspected = subprocess.run([sys.executable, "-m", "hdistill", "inspect", str(compact / "small")],
                               capture_output=True, text=True, env=precompute_env(), timeout=120)
    assert "pixels     jpeg quality 80" in inspected.stdout and "rel.mae.b1.npy.zst" in inspected.stdout


def test_online_renders_the_jpeg_pixels_the_store_holds(compact, tmp_path):
    """--online renders each view again and gives the teacher its JPEG's pixels, as precompute did: the same losses
    as the stored targets, up to their float16 rounding."""
    from helpers import config, online, runtime
    from hdistill.train.run import run_train
    cfg = config(compact / "full", steps=6, mask="random")
    run_train(cfg, str(tmp_path / "off"), runtime(log_every=1))
    run_train(cfg, str(tmp_path / "on"), runtime(log_every=1), source=online())
    off, on = ([json.loads(line) for line in (tmp_path / r / "metrics.jsonl").read_text().splitlines() if "loss" in line]
               for r in ("off", "on"))
    assert len(off) == len(on) == 6
    for a, b in zip(off, on):
        assert b["loss"] == pytest.approx(a["loss"], rel=2e-3), a["step"]

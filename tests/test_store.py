"""The target store: round trip through plain webdataset and zarr against targets recomputed here,
kept vs full, bad inputs, refusal of a changed configuration, full disk, verify."""
import hashlib
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
import zarr
from click.testing import CliRunner
from PIL import Image
from torchvision.transforms import InterpolationMode

from helpers import precompute, wds_samples, write_photos
from reference import loop_mask, reference_forward
from hdistill.cli import cli
from hdistill.common.errors import HdistillError
from hdistill.precompute.teachers import build_teachers

@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("photos")
    write_photos(folder, 6)
    return folder


# every kind of target, from both teachers (the defaults are tested in test_teachers and test_inputs_cli)
EVERY_KIND = ["mae:feat", "clip:feat", "mae:rel@1,2", "mae:feat@2", "mae:msa@1", "clip:msa@0", "clip:rel@-1"]


@pytest.fixture(scope="module")
def kept_store(photos, tmp_path_factory):
    out = tmp_path_factory.mktemp("stores") / "kept"
    manifest, cfg = precompute(photos, out, views=2, targets=EVERY_KIND, formats=["wds", "zarr"])
    return out, manifest, cfg


def expected_view(meta):
    """The view rebuilt from its recorded crop box and flip, with torchvision."""
    img = Image.open(meta["source"]).convert("RGB")
    c = meta["crop"]
    view = TF.resized_crop(img, c["top"], c["left"], c["height"], c["width"], [meta["size"]] * 2,
                           InterpolationMode.BICUBIC)
    return np.asarray(TF.hflip(view) if meta["flip"] else view)


def patch_of(view, p, size):
    g = view.shape[0] // size
    r, c = divmod(int(p), g)
    return view[r * size:(r + 1) * size, c * size:(c + 1) * size]


def assert_fp16_close(stored, reference):
    ref = reference.numpy()
    assert stored.dtype == np.float16
    np.testing.assert_allclose(stored.astype(np.float32), ref, rtol=2e-3, atol=2e-3 * np.abs(ref).max())


def test_round_trip_against_recomputed_targets(kept_store):
    store, manifest, cfg = kept_store
    assert manifest.complete and manifest.samples == 12 and manifest.skipped == []
    teachers = build_teachers(cfg, "cpu")
    samples = wds_samples(store)
    assert len(samples) == 12
    assert {k.rsplit("-v", 1)[1] for k in samples} == {"0", "1"}
    assert "class0/img_000-v0" in samples, "dots in file names must not reach the keys"
    for key, s in samples.items():
        meta = s["json"]
        view = expected_view(meta)
        ref = {role: reference_forward(teacher, torch.from_numpy(view.copy())[None])
               for role, teacher in teachers.items()}
        stage, kept = loop_mask([ref["mae"][2][b][0].numpy() for b in (0, 1, 2)], ratio_tenths=3, normalized=True)
        np.testing.assert_array_equal(s["stage.npy"], stage)
        np.testing.assert_array_equal(s["keep.npy"], kept)
        assert s["keep.npy"].dtype == np.int16 and len(kept) == 7  # 16 -> 12 -> 9 -> 7
        for i, p in enumerate(kept):
            np.testing.assert_array_equal(s["pixels.npy"][i], patch_of(view, p, 16))
        tokens = [0] + [int(p) + 1 for p in kept]
        rows = lambda t: t[0][tokens]  # noqa: E731
        square = lambda t: t[0][:, tokens][:, :, tokens]  # noqa: E731
        expected = {"feat.mae": rows(ref["mae"][0]), "feat.clip": rows(ref["clip"][0]),
                    "rel.mae.b1": square(ref["mae"][1][1]), "rel.mae.b2": square(ref["mae"][1][2]),
                    "feat.mae.b2": rows(ref["mae"][2][2]), "msa.mae.b1": rows(ref["mae"][3][1]),
                    "msa.clip.b0": rows(ref["clip"][3][0]), "rel.clip.b2": square(ref["clip"][1][2])}
        assert sorted(t.name for t in manifest.targets) == sorted(expected)
        assert {e[:-4] for e in s if e.endswith(".npy")} == {"stage", "keep", "pixels", *expected}
        for name, value in expected.items():
            assert_fp16_close(s[f"{name}.npy"], value)


def test_zarr_holds_the_same_arrays(kept_store):
    store, manifest, _ = kept_store
    samples = wds_samples(store)
    group = zarr.open_group(store / "targets.zarr", mode="r")
    valid = group["valid"][:]
    assert valid.sum() == 12
    for slot in np.flatnonzero(valid):
        key = f"{group['image_id'][slot]}-v{group['view'][slot]}"
        s = samples[key]
        c = s["json"]["crop"]
        assert group["box"][slot].tolist() == [c["top"], c["left"], c["height"], c["width"]]
        assert bool(group["flip"][slot]) == s["json"]["flip"]
        entries = [e for e in s if e.endswith(".npy")]
        assert len(entries) == 3 + len(manifest.targets)
        for entry in entries:
            np.testing.assert_array_equal(group[entry[:-4]][slot], s[entry])


def test_kept_store_is_full_store_sliced_by_keep(kept_store, photos, tmp_path):
    store, _, _ = kept_store
    precompute(photos, tmp_path / "full", views=2, tokens="full", targets=EVERY_KIND)
    kept, full = wds_samples(store), wds_samples(tmp_path / "full")
    assert kept.keys() == full.keys()
    for key, k in kept.items():
        f = full[key]
        np.testing.assert_array_equal(f["keep.npy"], np.arange(16))
        np.testing.assert_array_equal(f["stage.npy"], k["stage.npy"])
        idx = k["keep.npy"]
        np.testing.assert_array_equal(f["pixels.npy"][idx], k["pixels.npy"])
        tokens = np.concatenate([[0], idx + 1])
        for name in ("feat.mae", "feat.clip", "feat.mae.b2", "msa.mae.b1", "msa.clip.b0"):
            np.testing.assert_array_equal(f[f"{name}.npy"][tokens], k[f"{name}.npy"])
        for name in ("rel.mae.b1", "rel.mae.b2", "rel.clip.b2"):
            np.testing.assert_array_equal(f[f"{name}.npy"][:, tokens][:, :, tokens], k[f"{name}.npy"])


def encoded(img, fmt, **kw):
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def test_bad_inputs_are_recorded_and_do_not_stop_the_run(tmp_path):
    folder = tmp_path / "mixed"
    write_photos(folder, 3)
    rgb = Image.fromarray(np.random.default_rng(1).integers(0, 256, (50, 70, 3), dtype=np.uint8))
    good = encoded(rgb, "JPEG")
    bad = {"truncated.jpg": good[: len(good) // 3], "empty.jpg": b"", "notes.jpg": b"plain text, not a JPEG",
           "bomb.png": encoded(Image.new("1", (20000, 20000)), "PNG")}
    odd = {"gray.jpg": encoded(rgb.convert("L"), "JPEG"), "cmyk.jpg": encoded(rgb.convert("CMYK"), "JPEG"),
           "palette.png": encoded(rgb.convert("P"), "PNG"), "alpha.png": encoded(rgb.convert("RGBA"), "PNG"),
           "tiny.png": encoded(Image.new("RGB", (1, 1), (200, 10, 10)), "PNG"),
           "large.jpg": encoded(Image.new("RGB", (6000, 4000), (10, 120, 200)), "JPEG")}
    for name, data in {**bad, **odd}.items():
        (folder / name).write_bytes(data)
    manifest, _ = precompute(folder, tmp_path / "store")
    skipped = {Path(s["source"]).name: s["reason"] for s in manifest.skipped}
    assert set(skipped) == set(bad)
    assert "empty file" in skipped["empty.jpg"] and "not a readable image" in skipped["notes.jpg"]
    assert manifest.samples == 3 + len(odd)
    stored = {s["json"]["image_id"] for s in wds_samples(tmp_path / "store").values()}
    assert {Path(n).stem for n in odd} <= stored
    result = CliRunner().invoke(cli, ["inspect", str(tmp_path / "store")])
    assert "skipped    4 inputs" in result.output and "truncated.jpg" in result.output


def test_changed_configuration_is_refused(kept_store, photos, tmp_path):
    store, _, _ = kept_store
    copy = tmp_path / "copy"
    shutil.copytree(store, copy)
    with pytest.raises(HdistillError, match="another configuration.*--mask-ratio"):
        precompute(photos, copy, views=2, mask_ratio=0.5, targets=EVERY_KIND, formats=["wds", "zarr"])
    assert json.loads((copy / "manifest.json").read_text()) == json.loads((store / "manifest.json").read_text())
    # the same configuration finds everything committed and leaves the store as it was
    manifest, _ = precompute(photos, copy, views=2, targets=EVERY_KIND, formats=["wds", "zarr"])
    assert manifest.to_dict() == json.loads((store / "manifest.json").read_text())


def test_full_disk_fails_clearly_and_keeps_committed_shards(photos, tmp_path, monkeypatch):
    import errno
    import tarfile
    real_addfile, calls = tarfile.TarFile.addfile, []

    def addfile(self, info, fileobj=None):
        calls.append(info.name)
        if len(calls) > 40:  # well into the second shard
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_addfile(self, info, fileobj)

    monkeypatch.setattr(tarfile.TarFile, "addfile", addfile)
    with pytest.raises(HdistillError, match=r"cannot write .*view0-000001.tar.*disk is full"):
        precompute(photos, tmp_path / "store", formats=["wds"])
    monkeypatch.setattr(tarfile.TarFile, "addfile", real_addfile)
    wds_dir = tmp_path / "store" / "wds"
    assert sorted(p.name for p in wds_dir.iterdir()) == ["view0-000000.tar"], "no temporary or partial shard left"
    committed = json.loads((tmp_path / "store" / "commits" / "view0-000000.json").read_text())
    assert hashlib.sha256((wds_dir / "view0-000000.tar").read_bytes()).hexdigest() == committed["sha256"]
    manifest, _ = precompute(photos, tmp_path / "store", formats=["wds"])
    assert manifest.complete and manifest.samples == 6


def test_verify_names_a_shard_with_a_flipped_byte(kept_store, tmp_path):
    store, _, _ = kept_store
    copy = tmp_path / "copy"
    shutil.copytree(store, copy)
    runner = CliRunner()
    ok = runner.invoke(cli, ["verify", str(copy)])
    assert ok.exit_code == 0, ok.output
    shard = copy / "wds" / "view1-000001.tar"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    bad = runner.invoke(cli, ["verify", str(copy)])
    assert bad.exit_code != 0
    assert "BAD  wds/view1-000001.tar: sha256 differs" in bad.output
    assert "view0-000000" not in bad.output


def test_manifest_is_typed_and_round_trips(kept_store):
    from hdistill.shards.manifest import Manifest, read_manifest
    store, manifest, _ = kept_store
    on_disk = json.loads((store / "manifest.json").read_text())
    assert on_disk["format_version"] == 7
    assert Manifest.from_dict(on_disk) == manifest == read_manifest(store)
    # the token layout, per teacher and per target: MAE and the CLIP tower have CLS and no registers
    assert [t["layout"] for t in on_disk["teachers"]] == [{"cls": True, "registers": 0}] * 2
    assert all(t["cls"] for t in on_disk["targets"])
    assert [t["name"] for t in on_disk["targets"]] == [t.name for t in manifest.targets]
    assert on_disk["mask"] == {"rule": "cosine-to-mean", "strategy": "progressive", "role": "mae", "ratio": 0.3,
                               "blocks": [0, 1, 2], "stages": None, "mean": "normalized", "forward": "full",
                               "rounding": "floor(ratio * kept) per progressive stage"}


def test_an_older_store_is_refused_with_what_to_do(kept_store, tmp_path):
    """An older store (v2: no token layout, no zarr chunk checksums) is refused rather than misread."""
    store, _, _ = kept_store
    old = tmp_path / "v2"
    shutil.copytree(store, old)
    manifest = json.loads((old / "manifest.json").read_text())
    (old / "manifest.json").write_text(json.dumps({**manifest, "format_version": 2}))
    for command in (["inspect", str(old)], ["verify", str(old)],
                    ["train", "--shards", str(old), "--out", str(tmp_path / "run"), "--steps", "1"]):
        result = CliRunner().invoke(cli, command)
        assert result.exit_code == 1
        assert "store format version 2; this hdistill reads version 7 only. Make the store again" in result.output


def test_verify_checks_a_zarr_only_store(photos, tmp_path):
    manifest, _ = precompute(photos, tmp_path / "store", formats=["zarr"], shard_size=2)
    runner = CliRunner()
    ok = runner.invoke(cli, ["verify", str(tmp_path / "store")])
    assert ok.exit_code == 0 and "3 shards, 6 samples verified in zarr" in ok.output, ok.output
    assert not (tmp_path / "store" / "wds").exists() and all(s.zarr_sha256 for s in manifest.shards)
    # damage the feature array of store shard 1 (slots 2-3: zarr shard file c/1/0 of feat.clip)
    chunk = tmp_path / "store" / "targets.zarr" / "feat.clip" / "c" / "1" / "0" / "0"
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0x40
    chunk.write_bytes(bytes(data))
    bad = runner.invoke(cli, ["verify", str(tmp_path / "store")])
    assert bad.exit_code == 1
    assert "BAD  targets.zarr shard view0-000001" in bad.output, bad.output
    assert "view0-000000" not in bad.output and "view0-000002" not in bad.output

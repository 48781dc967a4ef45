"""G2SD's generic distillation from a store: the `dec@B` target of an MAE teacher with its decoder, on the view's
teacher mask, against a hand-written forward of the official layout (facebookresearch/mae models_mae.py, random
masking by argsort of the view's noise) on a tiny checkpoint saved here; the student seeing those patches and its
decoder's loss at every token; online equals offline; resume and 2 ranks; refusals."""
import hashlib
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from helpers import config, online, precompute, read_metrics, resumed_on_two_ranks, runtime, wds_samples, write_photos
from reference import OfficialMae
import hdistill
from hdistill.common.errors import HdistillError
from hdistill.shards.manifest import read_manifest
from hdistill.shards.reader import StoreReader
from hdistill.train.run import run_train, solo

MAE = dict(patch_size=16, embed_dim=24, depth=2, num_heads=2, decoder_embed_dim=16, decoder_depth=3,
           decoder_num_heads=2)
G2SD = dict(mask="none", losses=["mae:dec@1=1"], decoder_depth=1, decoder_width=16, decoder_heads=2, drop_path=0.0)
IMAGENET = (torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225]))


@pytest.fixture(scope="module")
def g2sd(tmp_path_factory):
    """A tiny official MAE checkpoint with its decoder (64 px, 16 patches) and a full store of its dec@1 target (and
    its encoder's features at block 1 and after its norm) over 12 photos x 2 views."""
    root = tmp_path_factory.mktemp("g2sd")
    write_photos(root / "photos", 12, seed=11)
    torch.manual_seed(3)
    official = OfficialMae(size=64, p=16).eval()
    torch.save({"model": official.state_dict()}, root / "mae_pretrain_tiny_full.pth")
    precompute(root / "photos", root / "store", teachers=["mae"], models={"mae": "mae:vit_base_patch16_dec512d8b"},
               model_args={"mae": MAE}, random_init=False, weights={"mae": str(root / "mae_pretrain_tiny_full.pth")},
               views=2, formats=["wds", "zarr"], tokens="full", targets=["mae:dec@1", "mae:feat", "mae:feat@1"])
    return official, root


def view_noise(seed: int, image_id: str, view: int, patches: int) -> np.ndarray:
    """docs/FORMAT.md's rule: uniform noise from SeedSequence([seed, *sha256(image id)'s first 4 little-endian uint32,
    view, 1])."""
    words = np.frombuffer(hashlib.sha256(image_id.encode()).digest()[:16], "<u4").tolist()
    return np.random.default_rng(np.random.SeedSequence([seed, *words, view, 1])).random(patches)


def image_of(patches: np.ndarray) -> torch.Tensor:
    """Stored patches [16, 16, 16, 3] (raster order) -> the MAE-normalised image [1, 3, 64, 64]."""
    image = patches.reshape(4, 4, 16, 16, 3).transpose(0, 2, 1, 3, 4).reshape(64, 64, 3)
    x = torch.from_numpy(image).float().div(255)
    return ((x - IMAGENET[0]) / IMAGENET[1]).permute(2, 0, 1)[None]


def test_the_stored_target_is_maes_decoder_on_the_views_own_mask(g2sd):
    official, root = g2sd
    manifest = read_manifest(root / "store")
    assert manifest.layout.teacher_visible == 4 and manifest.target("dec.mae.b1").shape == (17, 16)
    samples = wds_samples(root / "store")
    assert len(samples) == 24
    for key, sample in samples.items():
        record = sample["json"]
        noise = torch.from_numpy(view_noise(0, record["image_id"], record["view"], 16))[None]
        with torch.no_grad():            # models_mae.py: random_masking keeps argsort(noise)[:int(16 * (1 - 0.75))]
            latent, ids_restore, ids_keep = official.forward_encoder(image_of(sample["pixels.npy"]), noise, 0.75)
            expected = official.decoder_hidden(latent, ids_restore, 1)[0]             # [17, 16], before decoder_norm
        assert sample["visible.npy"].dtype == np.int16
        assert sample["visible.npy"].tolist() == sorted(ids_keep[0].tolist()), key
        stored = torch.from_numpy(sample["dec.mae.b1.npy"].astype(np.float32))
        torch.testing.assert_close(stored, expected, rtol=2e-3, atol=2e-3)      # float16 rounding
    # zarr holds the same teacher masks, and the public loader hands them over with a dec target
    stored = {k: s["visible.npy"].tolist() for k, s in samples.items()}
    zarr = {s.key: s.visible for shard in manifest.shards
            for s in StoreReader(root / "store", manifest, "zarr").read(shard)}
    assert {k: v.tolist() for k, v in zarr.items()} == stored
    for batch in hdistill.open_store(str(root / "store")).loader(batch_size=4, targets=["dec.mae.b1"], mask="none"):
        assert [v.tolist() for v in batch["visible"]["teacher"]] == [stored[k] for k in batch["keys"]]
    assert "visible" not in next(iter(hdistill.open_store(str(root / "store")).loader(4, ["feat.mae"], mask="none")))


def test_the_student_sees_the_teachers_patches_and_its_decoder_meets_every_token(g2sd):
    _, root = g2sd
    loop = solo(config(root / "store", steps=1, **G2SD), str(root / "x"), runtime())
    member = loop.members["train"]
    batch = member.source.prepare(next(loop.batches()))
    stored = {k: s["visible.npy"].tolist() for k, s in wds_samples(root / "store").items()}
    visible = batch["visible"]["teacher"]                                      # [B, 4]
    assert [visible[i].tolist() for i in range(4)] == [stored[k] for k in batch["keys"]]
    seen = {}
    member.student.register_forward_pre_hook(lambda module, args: seen.update(pixels=args[0], keep=args[1]))
    model, targets = member.model.eval(), batch["targets"]
    with torch.no_grad():
        terms = model(batch["pixels"], batch["keep"], targets, batch["visible"])
        assert torch.equal(seen["keep"], visible)
        assert torch.equal(seen["pixels"], torch.stack([batch["pixels"][i, visible[i]] for i in range(4)]))
        # G2SD's engine_distill.py: SmoothL1 (beta 2) of the projected decoder output against the target under a
        # LayerNorm without affine, averaged over every token (CLS too)
        decoded = model.decoder(model.student(seen["pixels"], seen["keep"]).tokens, visible)     # [4, 17, 16]
        target = targets["dec.mae.b1"].float()
        expected = F.smooth_l1_loss(model.loss_fn.proj["dec_mae_b1"](decoded),
                                    torch.nn.LayerNorm(16, eps=1e-6, elementwise_affine=False)(target), beta=2.0)
    torch.testing.assert_close(terms["loss/dec.mae.b1"], expected, rtol=1e-5, atol=1e-6)


def test_online_gives_the_stored_losses(g2sd, tmp_path):
    _, root = g2sd
    cfg = config(root / "store", steps=8, **G2SD)
    run_train(cfg, str(tmp_path / "on"), runtime(log_every=1), source=online())
    # offline, with the store as its own held-out store: validation reads the teacher's patches too
    run_train(replace(cfg, val_shards=str(root / "store"), val_every=4), str(tmp_path / "off"), runtime(log_every=1))
    metrics, on = read_metrics(tmp_path / "off"), read_metrics(tmp_path / "on")
    off, held_out = [r for r in metrics if "loss" in r], [r["val/loss"] for r in metrics if "val/loss" in r]
    assert len(off) == len(on) == 8 and off[-1]["loss"] < off[0]["loss"]
    assert len(held_out) == 3 and held_out[-1] < held_out[0]          # at steps 0, 4 and 8
    for a, b in zip(off, on):
        assert b["loss"] == pytest.approx(a["loss"], rel=2e-3, abs=1e-6), a["step"]


def test_a_resume_on_two_ranks_continues_one_process_exactly(g2sd, tmp_path):
    _, root = g2sd
    one, two = resumed_on_two_ranks(root / "store", tmp_path, **{k: v for k, v in G2SD.items() if k != "drop_path"})
    assert [r["step"] for r in two] == list(range(1, 7))
    for a, b in zip(one, two):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4), a["step"]


def test_refusals_name_the_target_or_option(g2sd, tmp_path):
    _, root = g2sd
    photos, weights = root / "photos", {"mae": str(root / "mae_pretrain_tiny_full.pth")}
    made = dict(teachers=["mae"], models={"mae": "mae:vit_base_patch16_dec512d8b"}, model_args={"mae": MAE},
                random_init=False, weights=weights)
    with pytest.raises(HdistillError, match=r"--target mae:dec@1: the decoder's states are at every patch.*give "
                                            r"--tokens full"):
        precompute(photos, tmp_path / "kept", targets=["mae:dec@1"], **made)
    with pytest.raises(HdistillError, match=r"--target mae:dec@1: teacher 'mae' \(timm:vit_base_patch16_224\) has no "
                                            r"decoder"):
        precompute(photos, tmp_path / "timm", targets=["mae:dec@1"], tokens="full", teachers=["mae"],
                   models={"mae": "vit_base_patch16_224"}, model_args={"mae": dict(depth=2, embed_dim=24, num_heads=2)})
    with pytest.raises(HdistillError, match=r"--target mae:dec@3: block 3 is out of range for a 3-block model"):
        precompute(photos, tmp_path / "deep", targets=["mae:dec@3"], tokens="full", **made)
    assert not any((tmp_path / name).exists() for name in ("kept", "timm", "deep"))
    store = root / "store"
    cases = [(dict(G2SD, decoder_depth=0), r"--loss mae:dec@1: the decoder predicts the patches the encoder does not "
                                           r"see; give --decoder-depth"),
             (dict(G2SD, reconstruct=0.75), r"--reconstruct 0.75 and --loss mae:dec@1: a dec term's student sees the "
                                            r"patches its teacher saw"),
             (dict(G2SD, losses=["mae:dec@1=1", "mae:feat@1=1"]), r"--loss mae:dec@1 trains its terms at the "
                                                                    r"decoder's output; mae:feat@1 read the encoder"),
             (dict(G2SD, losses=["mae:dec@2=1"]), r"the store holds no dec.mae.b2")]
    for overrides, message in cases:
        with pytest.raises(HdistillError, match=message):
            solo(config(store, **overrides), str(tmp_path / "run"), runtime())
    assert not (tmp_path / "run").exists()

"""Masked feature reconstruction (dBOT, the paper's Fig. 3(b)): the student's light decoder against a hand-written
forward of MAE's (facebookresearch/mae models_mae.py), the encoder seeing only the visible patches, the loss on the
masked tokens only, and exact resume, ranks and sweeps with --reconstruct."""
import zlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from click.testing import CliRunner
from safetensors.torch import load_file

from helpers import config, resumed_on_two_ranks, runtime
from reference import mae_sincos
from hdistill.cli import cli
from hdistill.common.errors import HdistillError
from hdistill.train.data import StreamSpec
from hdistill.train.decoder import Decoder
from hdistill.train.loader import Store, StoreLoader
from hdistill.train.run import run_train, solo

RECONSTRUCT = dict(mask="none", losses=["clip:feat=1"], decoder_depth=1, decoder_width=16, decoder_heads=2,
                   reconstruct=0.75, drop_path=0.0)


def test_the_decoder_is_maes_forward_decoder():
    torch.manual_seed(0)
    decoder = Decoder(encoder_width=24, num_patches=16, width=16, depth=2, heads=2).eval()
    np.testing.assert_allclose(decoder.pos_embed[0].numpy(), mae_sincos(16, 4), rtol=0, atol=1e-6)
    # MAE: random_masking keeps ids_shuffle[:, :len_keep] of argsort(noise); forward_decoder appends mask tokens and
    # unshuffles with ids_restore
    noise = torch.rand(3, 16)
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :4]
    encoded = torch.randn(3, 1 + 4, 24)                                  # CLS + the kept patches, MAE's order
    x = decoder.embed(encoded)
    mask_tokens = decoder.mask_token.repeat(3, 16 + 1 - x.shape[1], 1)
    x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)
    x_ = torch.gather(x_, dim=1, index=ids_restore.unsqueeze(-1).repeat(1, 1, x.shape[2]))
    x = torch.cat([x[:, :1, :], x_], dim=1) + torch.from_numpy(mae_sincos(16, 4)).float()[None]
    for block in decoder.blocks:
        x = block(x)
    expected = decoder.norm(x)
    with torch.no_grad():
        torch.testing.assert_close(decoder(encoded, ids_keep), expected.detach(), rtol=1e-5, atol=1e-5)


def test_the_encoder_sees_the_visible_patches_and_the_loss_counts_the_masked_ones(stores, tmp_path):
    loop = solo(config(stores / "full", steps=1, **RECONSTRUCT), str(tmp_path / "run"), runtime())
    member = loop.members["train"]
    batch = member.source.prepare(next(loop.batches()))
    visible = batch["visible"][0.75]                                     # [B, 16 - int(16 * 0.75)]
    assert visible.shape == (4, 4)
    key = batch["keys"][1]               # drawn from (seed, epoch, sample): MAE's argsort of uniform noise
    noise = np.random.default_rng([0, 0, zlib.crc32(key.encode()), 1]).random(16)
    assert visible[1].tolist() == sorted(np.argsort(noise)[:4].tolist())
    seen = {}
    member.student.register_forward_pre_hook(lambda module, args: seen.update(pixels=args[0], keep=args[1]))
    model, targets = member.model.eval(), batch["targets"]
    with torch.no_grad():
        terms = model(batch["pixels"], batch["keep"], targets, batch["visible"])
    assert torch.equal(seen["keep"], visible) and seen["pixels"].shape[1] == 4
    assert torch.equal(seen["pixels"], torch.stack([batch["pixels"][i, visible[i]] for i in range(4)]))
    # by hand: SmoothL1 (beta 2) of the projected decoder output against the standardised target, per token, on the
    # 12 masked patches of each sample (not CLS, not the visible ones)
    with torch.no_grad():
        decoded = model.decoder(model.student(seen["pixels"], seen["keep"]).tokens, visible)
        predicted = model.loss_fn.proj["feat_clip"](decoded)
        target = F.layer_norm(targets["feat.clip"].float(), (targets["feat.clip"].shape[-1],), eps=1e-6)
        per_token = F.smooth_l1_loss(predicted, target, beta=2.0, reduction="none").mean(-1)    # [B, 17]
        masked = [[t for t in range(1, 17) if t - 1 not in visible[i].tolist()] for i in range(4)]
        expected = torch.stack([per_token[i, masked[i]] for i in range(4)]).mean()
    torch.testing.assert_close(terms["loss/feat.clip"], expected, rtol=1e-5, atol=1e-6)
    # the visible tokens' targets and the CLS target do not count; a masked token's does
    changed = targets["feat.clip"].clone()
    for i in range(4):
        changed[i, 0] = 1e3
        changed[i, visible[i] + 1] = 1e3
    with torch.no_grad():
        assert model(batch["pixels"], batch["keep"], {"feat.clip": changed}, batch["visible"])["loss"] == terms["loss"]
        changed[0, masked[0][0]] = 1e3
        assert model(batch["pixels"], batch["keep"], {"feat.clip": changed}, batch["visible"])["loss"] != terms["loss"]
    # --reconstruct-tokens all: every token counts
    every = solo(config(stores / "full", steps=1, reconstruct_tokens="all", **RECONSTRUCT), str(tmp_path / "all"),
                 runtime()).members["train"]
    every.model.load_state_dict(model.state_dict())
    with torch.no_grad():
        whole = every.model.eval()(batch["pixels"], batch["keep"], targets, batch["visible"])["loss"]
    torch.testing.assert_close(whole, per_token.mean(), rtol=1e-5, atol=1e-6)


def test_two_ranks_draw_the_visible_patches_of_one(stores):
    """The draw depends on the seed, the epoch and the sample alone: each rank's share of a global batch carries the
    visible patches a single process gives those samples."""
    store = Store(str(stores / "full"))
    targets = tuple(t for t in store.manifest.targets if t.name == "feat.clip")

    def batches(rank, world_size):
        spec = StreamSpec(targets, "none", seed=5, lanes=2, batch_size=4, buffer_mb=0.02, rank=rank,
                          world_size=world_size, reconstruct=(0.75, 0.5))
        loader = StoreLoader(store.stream(spec), 0, "cpu", epoch=1)
        return [(b["keys"], {r: v.tolist() for r, v in b["visible"].items()}) for b in loader]
    one, halves = batches(0, 1), [batches(r, 2) for r in (0, 1)]
    joined = [(k0 + k1, {r: v0[r] + v1[r] for r in v0}) for (k0, v0), (k1, v1) in zip(*halves)]
    assert joined == one and len(one[0][1][0.5][0]) == 8


def test_a_reconstruction_run_resumed_on_two_ranks_continues_one_process_exactly(stores, tmp_path):
    one, two = resumed_on_two_ranks(stores / "full", tmp_path,
                                    **{k: v for k, v in RECONSTRUCT.items() if k != "drop_path"})
    assert [r["step"] for r in two] == list(range(1, 7))
    for a, b in zip(one, two):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4), a["step"]


def test_a_reconstruction_run_resumes_exactly_and_exports_its_decoder_apart(stores, tmp_path):
    import shutil
    cfg = config(stores / "full", steps=6, **RECONSTRUCT)
    whole = tmp_path / "whole"
    run_train(cfg, str(whole), runtime(log_every=1, checkpoint_every=3, keep_checkpoints=2))
    interrupted = tmp_path / "interrupted"              # the run as a kill after its step-3 checkpoint left it
    interrupted.mkdir()
    shutil.copyfile(whole / "checkpoints" / "step-000000003.pt", interrupted / "checkpoint.pt")
    shutil.copyfile(whole / "metrics.jsonl", interrupted / "metrics.jsonl")
    assert torch.load(interrupted / "checkpoint.pt", weights_only=True)["step"] == 3
    run_train(cfg, str(interrupted), runtime(log_every=1, checkpoint_every=3))
    read = lambda run: [{k: v for k, v in r.items() if k != "samples_per_s"}  # noqa: E731
                        for r in map(yaml.safe_load, (run / "metrics.jsonl").read_text().splitlines())]
    assert read(interrupted) == read(whole) and len(read(interrupted)) == 6
    for name in ("student.safetensors", "decoder.safetensors"):
        a, b = load_file(interrupted / name), load_file(whole / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    decoder, backbone = load_file(whole / "decoder.safetensors"), load_file(whole / "student.safetensors")
    assert {"mask_token", "embed.weight", "norm.weight", "blocks.0.attn.qkv.weight"} <= set(decoder)
    assert "mask_token" not in backbone and "embed.weight" not in backbone and "patch_embed.proj.weight" in backbone


def test_direct_and_reconstructed_distillation_as_one_sweep_each_as_alone(stores, tmp_path):
    """The paper's Fig. 3(b) comparison from one store: FD (clip:feat on the encoder) against dBOT-style
    reconstruction (clip:feat at the decoder, 75% masked), as members of one sweep, each as its run alone."""
    shared = dict(shards=str(stores / "full"), steps=4, batch_size=4, lr=1e-3, lane_buffer_mb=0.02, workers=0,
                  device="cpu", quiet=True, log_every=1, mask="none", loss=["clip:feat=1"], drop_path=0.0,
                  student_arg=["depth=3", "embed_dim=24", "num_heads=6"])
    members = [{"name": "direct"}, {"name": "reconstructed", "decoder_depth": 1, "decoder_width": 16,
                                    "decoder_heads": 2, "reconstruct": 0.75}]
    (tmp_path / "s.yaml").write_text(yaml.safe_dump({**shared, "members": members}))
    result = CliRunner().invoke(cli, ["train", "--sweep", str(tmp_path / "s.yaml"), "--out", str(tmp_path / "sweep")])
    assert result.exit_code == 0, result.output
    for member in members:
        name = member["name"]
        alone = CliRunner().invoke(cli, ["train", "--config", str(tmp_path / "sweep" / name / "config.yaml"),
                                         "--out", str(tmp_path / name)])
        assert alone.exit_code == 0, alone.output
        assert (tmp_path / name / "metrics.jsonl").read_text().count("\n") == 4
        swept = [{k: v for k, v in r.items() if k != "samples_per_s"} for r in
                 map(yaml.safe_load, (tmp_path / "sweep" / name / "metrics.jsonl").read_text().splitlines())]
        own = [{k: v for k, v in r.items() if k != "samples_per_s"} for r in
               map(yaml.safe_load, (tmp_path / name / "metrics.jsonl").read_text().splitlines())]
        assert swept == own, name


def test_reconstruction_refusals_name_the_option(stores, tmp_path):
    cases = [(dict(RECONSTRUCT, decoder_depth=0), r"--reconstruct 0.75: the decoder predicts the patches the encoder "
                                                   r"does not see; give --decoder-depth"),
             (dict(RECONSTRUCT, mask="random"), r"--decoder-depth 1: the decoder predicts every patch, so the batch "
                                                 r"must hold every patch: give --mask none"),
             (dict(RECONSTRUCT, losses=["clip:feat=1", "mae:rel@1=1"]), r"--reconstruct 0.75 trains its terms at the "
                                                                         r"decoder's output; mae:rel@1"),
             (dict(RECONSTRUCT, decoder_width=18), r"--decoder-width 18: a multiple of 4")]
    for overrides, message in cases:
        with pytest.raises(HdistillError, match=message):
            solo(config(stores / "full", **overrides), str(tmp_path / "x"), runtime())
    assert not (tmp_path / "x").exists()

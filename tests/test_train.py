"""The student trainer: student forward, loss and head grouping against hand computations, the loader's
mask strategies, resume after SIGKILL, the timm export round trip, and clear errors."""
import fcntl
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from helpers import STUDENT, config, online, precompute, read_metrics, runtime, train_command, write_photos
from hdistill.cli import cli
from hdistill.common.errors import HdistillError
from hdistill.common.targets import TargetSpec
from hdistill.train.data import AllSamples, StreamSpec
from hdistill.train.loader import Store
from hdistill.train.loss import DistillLoss, LossConfig, LossTerm, group_heads, parse_losses, plan_losses
from hdistill.train.run import run_train, solo
from hdistill.train.student import build_student

def default_targets(manifest):
    return tuple(manifest.target(n) for n in ("feat.clip", "rel.mae.b1", "rel.mae.b2"))


def first_batch(store, mask="progressive"):
    opened = Store(store)
    stream = opened.stream(StreamSpec(default_targets(opened.manifest), mask, seed=0))
    return next(iter(AllSamples(stream, batch_size=4)))


def smooth_l1(x, y, beta):
    d = (x - y).abs()
    return torch.where(d < beta, 0.5 * d * d / beta, d - 0.5 * beta).mean()


def test_student_sees_kept_patches_like_a_full_forward_restricted_to_them():
    student = build_student("vit_base_patch16_224", 64, dict(depth=3, embed_dim=24, num_heads=6)).eval()
    m = student.model
    g = torch.Generator().manual_seed(0)
    image = torch.randint(0, 256, (2, 64, 64, 3), dtype=torch.uint8, generator=g)
    keep = torch.tensor([[0, 3, 5, 6, 9, 15], [1, 2, 4, 8, 10, 11]])
    patches = image.reshape(2, 4, 16, 4, 16, 3).permute(0, 1, 3, 2, 4, 5).reshape(2, 16, 16, 16, 3)
    kept_pixels = torch.stack([patches[b, keep[b]] for b in range(2)])
    taps = [("rel", 1), ("rel", 2), ("feat", 0), ("msa", 2)]
    with torch.no_grad():
        student.capture(taps)
        out = student(kept_pixels, keep)
        x = (image.permute(0, 3, 1, 2).float() / 255 - student.mean.view(1, 3, 1, 1)) / student.std.view(1, 3, 1, 1)
        tokens = m.patch_embed(x) + m.pos_embed[:, 1:]                    # conv over the whole image
        tokens = torch.stack([tokens[b, keep[b]] for b in range(2)])
        x = torch.cat([m.cls_token.expand(2, -1, -1) + m.pos_embed[:, :1], tokens], 1)
        expected = {}
        for i, blk in enumerate(m.blocks):
            h = blk.norm1(x)
            q, k, v = (t.reshape(2, 7, 6, 4) for t in (h @ blk.attn.qkv.weight.T + blk.attn.qkv.bias).split(24, dim=-1))
            expected[("rel", i)] = torch.einsum("bqhd,bkhd->bhqk", q, k)
            attn = torch.softmax(expected[("rel", i)] / 2.0, dim=-1)          # 1 / sqrt(head dim 4)
            expected[("msa", i)] = torch.einsum("bhqk,bkhd->bqhd", attn, v).reshape(2, 7, 24)   # Eq. 2, before W_O
            x = x + blk.attn.proj(expected[("msa", i)])
            x = x + blk.mlp(blk.norm2(x))
            expected[("feat", i)] = x
        final = m.norm(x)
    torch.testing.assert_close(out.tokens, final, rtol=1e-5, atol=1e-5)
    assert sorted(out.taps) == sorted(taps)
    for tap in taps:
        torch.testing.assert_close(out.taps[tap], expected[tap], rtol=1e-5, atol=1e-5)


def test_student_relations_are_float32_under_bf16_autocast():
    student = build_student("vit_base_patch16_224", 64, dict(depth=2, embed_dim=24, num_heads=6))
    student.capture([("rel", 1)])
    qkv_dtype = []
    student.model.blocks[1].attn.qkv.register_forward_hook(lambda _m, _a, out: qkv_dtype.append(out.dtype))
    keep = torch.arange(16).expand(2, -1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = student(torch.zeros(2, 16, 16, 16, 3, dtype=torch.uint8), keep)
    assert qkv_dtype == [torch.bfloat16], "the projection itself runs in bf16"
    assert out.taps[("rel", 1)].dtype == torch.float32


def test_grouped_heads_equal_the_product_of_concatenated_heads():
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(2, 6, 5, 4, generator=g), torch.randn(2, 6, 5, 4, generator=g)
    per_head = q @ k.transpose(-2, -1)                                     # [B, 6, T, T]
    for groups in (1, 2, 3, 6):
        size = 6 // groups
        for j in range(groups):
            qj = torch.cat([q[:, h] for h in range(j * size, (j + 1) * size)], dim=-1)  # one wide head
            kj = torch.cat([k[:, h] for h in range(j * size, (j + 1) * size)], dim=-1)
            torch.testing.assert_close(group_heads(per_head, groups)[:, j], qj @ kj.transpose(-2, -1))


def test_loss_equals_hand_written_reference_on_a_fixed_batch():
    g = torch.Generator().manual_seed(2)
    tokens = torch.randn(3, 8, 24, generator=g)
    taps = {("rel", 1): 4 * torch.randn(3, 6, 8, 8, generator=g), ("rel", 2): 4 * torch.randn(3, 6, 8, 8, generator=g),
            ("msa", 2): torch.randn(3, 8, 24, generator=g), ("feat", 1): torch.randn(3, 8, 24, generator=g)}
    targets = {"feat.clip": 3 * torch.randn(3, 8, 32, generator=g) + 1, "msa.mae.b10": torch.randn(3, 8, 16, generator=g),
               "feat.mae.b8": 2 * torch.randn(3, 8, 16, generator=g) - 1,
               "rel.mae.b9": 4 * torch.randn(3, 4, 8, 8, generator=g), "rel.mae.b10": 4 * torch.randn(3, 4, 8, 8, generator=g)}
    terms = [LossTerm(TargetSpec("feat", "clip", None, (8, 32)), None, 1.0),
             LossTerm(TargetSpec("rel", "mae", 9, (4, 8, 8)), 1, 0.35), LossTerm(TargetSpec("rel", "mae", 10, (4, 8, 8)), 2, 0.35),
             LossTerm(TargetSpec("msa", "mae", 10, (8, 16)), 2, 0.2), LossTerm(TargetSpec("feat", "mae", 8, (8, 16)), 1, 0.1)]
    loss_fn = DistillLoss(terms, 24, 6, LossConfig(beta=2.0))
    got = loss_fn(tokens, taps, targets)

    def feature(student, target, proj):
        mean, var = target.mean(-1, keepdim=True), target.var(-1, unbiased=False, keepdim=True)
        return smooth_l1(student @ proj.weight.T + proj.bias, (target - mean) / torch.sqrt(var + 1e-6), 2.0)

    def relation(student, teacher):
        # gcd(6, 4) = 2 relation heads: student heads {0,1,2} and {3,4,5}, teacher heads {0,1} and {2,3}
        return smooth_l1(torch.stack([student[:, :3].sum(1), student[:, 3:].sum(1)], 1),
                         torch.stack([teacher[:, :2].sum(1), teacher[:, 2:].sum(1)], 1), 2.0)

    expected = {"loss/feat.clip": feature(tokens, targets["feat.clip"], loss_fn.proj["feat_clip"]),
                "loss/rel.mae.b9": relation(taps[("rel", 1)], targets["rel.mae.b9"]),
                "loss/rel.mae.b10": relation(taps[("rel", 2)], targets["rel.mae.b10"]),
                "loss/msa.mae.b10": feature(taps[("msa", 2)], targets["msa.mae.b10"], loss_fn.proj["msa_mae_b10"]),
                "loss/feat.mae.b8": feature(taps[("feat", 1)], targets["feat.mae.b8"], loss_fn.proj["feat_mae_b8"])}
    assert set(got) == {"loss", *expected}
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value)
    weights = [1.0, 0.35, 0.35, 0.2, 0.1]
    torch.testing.assert_close(got["loss"], sum(w * v for w, v in zip(weights, expected.values())))


def test_default_objective_is_eq1_and_loss_options_pick_stored_targets(stores):
    manifest = Store(stores / "kept").manifest
    terms = plan_losses(manifest, None, student_depth=3, alpha=0.6)
    assert [(t.name, t.student_block, t.weight) for t in terms] == \
        [("feat.clip", None, 1.0), ("rel.mae.b1", 0, 0.3), ("rel.mae.b2", 1, 0.3)]   # 4-block teacher, 3-block student
    chosen = plan_losses(manifest, parse_losses(["mae:rel@-2=2", "mae:msa@1=0.5", "mae:feat@2=0.25"]), 3,
                         student_blocks={1: 2})
    assert [(t.name, t.student_block, t.weight) for t in chosen] == \
        [("rel.mae.b2", 1, 2.0), ("msa.mae.b1", 2, 0.5), ("feat.mae.b2", 1, 0.25)]


def test_a_target_without_cls_meets_the_students_patch_tokens_only():
    """SigLIP has no CLS: its feat target holds the n patches; the student's CLS is left out of that term (and of a
    relation's rows and columns)."""
    g = torch.Generator().manual_seed(4)
    tokens, rel = torch.randn(2, 1 + 5, 24, generator=g), torch.randn(2, 6, 1 + 5, 1 + 5, generator=g)
    targets = {"feat.clip": torch.randn(2, 5, 16, generator=g), "rel.clip.b1": torch.randn(2, 3, 5, 5, generator=g)}
    terms = [LossTerm(TargetSpec("feat", "clip", None, (5, 16), cls=False), None, 1.0),
             LossTerm(TargetSpec("rel", "clip", 1, (3, 5, 5), cls=False), 1, 1.0)]
    loss_fn = DistillLoss(terms, 24, 6, LossConfig(beta=2.0))
    got = loss_fn(tokens, {("rel", 1): rel}, targets)
    proj = loss_fn.proj["feat_clip"]
    target = targets["feat.clip"]
    standardised = (target - target.mean(-1, keepdim=True)) / torch.sqrt(target.var(-1, unbiased=False, keepdim=True)
                                                                         + 1e-6)
    torch.testing.assert_close(got["loss/feat.clip"], smooth_l1(tokens[:, 1:] @ proj.weight.T + proj.bias,
                                                                standardised, 2.0))
    grouped = torch.stack([rel[:, 2 * j:2 * j + 2, 1:, 1:].sum(1) for j in range(3)], 1)   # gcd(6, 3) = 3 groups
    torch.testing.assert_close(got["loss/rel.clip.b1"], smooth_l1(grouped, targets["rel.clip.b1"], 2.0))


def test_teachers_without_cls_and_with_registers_store_and_train_by_their_layout(tmp_path):
    """A SigLIP-like feature teacher (no CLS) and a ViT with 4 registers beside MAE: the manifest records each
    layout, the stored targets hold CLS only where the teacher has one and never the registers, and the targets
    computed online agree with the stored ones through training."""
    write_photos(tmp_path / "photos", 8, seed=3)
    manifest, _ = precompute(
        tmp_path / "photos", tmp_path / "store", teachers=["mae", "clip", "dino"], formats=["wds"],
        models={"mae": "vit_base_patch16_224", "clip": "vit_base_patch16_siglip_224", "dino": "vit_base_patch16_224"},
        model_args={"mae": dict(depth=4, embed_dim=32, num_heads=4), "clip": dict(depth=2, embed_dim=24, num_heads=3),
                    "dino": dict(depth=2, embed_dim=24, num_heads=3, reg_tokens=4)},
        targets=["clip:feat", "clip:rel@1", "dino:feat", "mae:rel@2"])
    layouts = {t.role: (t.layout.cls, t.layout.registers) for t in manifest.teachers}
    assert layouts == {"mae": (True, 0), "clip": (False, 0), "dino": (True, 4)}
    n = manifest.layout.stored_patches
    shapes = {t.name: (t.shape, t.cls) for t in manifest.targets}
    assert shapes == {"feat.clip": ((n, 24), False), "feat.dino": ((1 + n, 24), True),
                      "rel.clip.b1": ((3, n, n), False), "rel.mae.b2": ((4, 1 + n, 1 + n), True)}
    losses = ["clip:feat=1", "clip:rel@1=0.5", "dino:feat=0.5", "mae:rel@2=0.5"]
    cfg = config(tmp_path / "store", steps=3, losses=losses, lanes=1)
    run_train(cfg, str(tmp_path / "off"), runtime(log_every=1))
    run_train(cfg, str(tmp_path / "on"), runtime(log_every=1), source=online())
    off, on = ([json.loads(line) for line in (tmp_path / r / "metrics.jsonl").read_text().splitlines()]
               for r in ("off", "on"))
    for a, b in zip(off, on):
        for key in ("loss/feat.clip", "loss/rel.clip.b1", "loss/feat.dino", "loss/rel.mae.b2"):
            assert b[key] == pytest.approx(a[key], rel=2e-3, abs=1e-6), (a["step"], key)


def test_every_loss_kind_trains_offline_and_online_alike(stores, tmp_path):
    losses = ["clip:feat=1", "mae:rel@1,2=0.5", "mae:msa@1=0.3", "mae:feat@2=0.2"]
    cfg = config(stores / "kept", steps=4, losses=losses)
    run_train(cfg, str(tmp_path / "off"), runtime(log_every=1))
    run_train(cfg, str(tmp_path / "on"), runtime(log_every=1), source=online())
    off, on = ([json.loads(line) for line in (tmp_path / r / "metrics.jsonl").read_text().splitlines()]
               for r in ("off", "on"))
    keys = {"loss", "loss/feat.clip", "loss/rel.mae.b1", "loss/rel.mae.b2", "loss/msa.mae.b1", "loss/feat.mae.b2"}
    assert keys <= set(off[0])
    for a, b in zip(off, on):
        for key in keys:
            assert b[key] == pytest.approx(a[key], rel=2e-3, abs=1e-6), (a["step"], key)
    assert off[-1]["loss"] == pytest.approx(sum(w * off[-1][f"loss/{n}"] for n, w in [
        ("feat.clip", 1), ("rel.mae.b1", 0.5), ("rel.mae.b2", 0.5), ("msa.mae.b1", 0.3), ("feat.mae.b2", 0.2)]), rel=1e-6)


def test_mask_strategies_from_a_full_store(stores):
    kept, full = first_batch(stores / "kept"), first_batch(stores / "full")
    for name in ("pixels", "keep"):
        torch.testing.assert_close(full[name], kept[name], rtol=0, atol=0)
    assert kept["targets"].keys() == {"feat.clip", "rel.mae.b1", "rel.mae.b2"}
    for name, value in kept["targets"].items():
        torch.testing.assert_close(full["targets"][name], value, rtol=0, atol=0)
    none = first_batch(stores / "full", "none")
    assert none["keep"].shape == (4, 16) and (none["keep"] == torch.arange(16)).all()
    random_mask = first_batch(stores / "full", "random")
    assert random_mask["keep"].shape == kept["keep"].shape
    assert (random_mask["keep"].diff(dim=1) > 0).all() and not torch.equal(random_mask["keep"], kept["keep"])


def test_export_loads_in_timm_with_strict_keys(stores, tmp_path):
    import timm
    path = run_train(config(stores / "kept", steps=2), str(tmp_path / "run"), runtime())
    trained = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)["student"]
    model = timm.create_model("vit_base_patch16_224", pretrained=True, img_size=64, num_classes=0,
                              pretrained_cfg_overlay=dict(file=str(path), num_classes=0), **STUDENT["student_args"])
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, trained[f"model.{name}"], rtol=0, atol=0)


def readme_fine_tune(path) -> dict:
    """The README's fine-tune snippet, run on `path`: its variables."""
    import re
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    snippet = next(b for b in re.findall(r"```python\n(.*?)```", readme, re.S) if "load_state_dict" in b)
    scope = {}
    exec(snippet.replace('"runs/vitb-mae-clip/student.safetensors"', repr(str(path))), scope)
    return scope


def test_input_normalisation_is_explicit_and_travels_with_the_export(stores, tmp_path):
    import timm
    from safetensors import safe_open

    mean, std = (0.1, 0.2, 0.3), (0.6, 0.5, 0.4)
    loop = solo(config(stores / "kept", steps=1, student_mean=mean, student_std=std), str(tmp_path / "run"),
                runtime())
    student = loop.members["train"].student
    pixels = torch.full((1, 1, 16, 16, 3), 51, dtype=torch.uint8)            # 0.2 in every channel
    normalised = (pixels.permute(0, 1, 4, 2, 3).float() / 255 - student.mean) / student.std
    torch.testing.assert_close(normalised[0, 0, :, 0, 0], torch.tensor([(0.2 - m) / s for m, s in zip(mean, std)]))
    loop.run()
    path = tmp_path / "run" / "student.safetensors"
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    assert json.loads(meta["mean"]) == list(mean) and json.loads(meta["std"]) == list(std)
    assert (meta["timm_model"], json.loads(meta["model_args"]), meta["img_size"]) == \
        ("vit_base_patch16_224", STUDENT["student_args"], "64")
    # the README's fine-tune: the recorded model with a new head, the backbone loaded strictly, and the view size and
    # normalisation as trained (timm's own config of the architecture would say 224)
    model = readme_fine_tune(path)["model"]
    trained = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["student"]
    for name, value in model.state_dict().items():
        if not name.startswith("head."):
            torch.testing.assert_close(value, trained[f"model.{name}"], rtol=0, atol=0)
    assert model.head.out_features == 1000
    config_ = timm.data.resolve_data_config({}, model=model)
    assert (config_["mean"], config_["std"], config_["input_size"]) == (mean, std, (3, 64, 64))
    # its check stops a file that does not hold the whole backbone
    from safetensors.torch import load_file, save_file
    partial = {k: v for k, v in load_file(str(path)).items() if not k.startswith("blocks.2.")}
    save_file(partial, str(tmp_path / "partial.safetensors"), metadata=meta)
    with pytest.raises(AssertionError, match="blocks.2.attn.qkv.weight"):
        readme_fine_tune(tmp_path / "partial.safetensors")


def test_stochastic_depth_and_fp16_with_a_gradient_scaler(stores, tmp_path):
    loop = solo(config(stores / "kept", steps=3, drop_path=0.3, precision="fp16"), str(tmp_path / "run"),
                runtime(log_every=1))
    blocks = loop.members["train"].student.model.blocks                                       # timm: linear in depth, 0 to the rate
    rates = [getattr(b.drop_path1, "drop_prob", 0.0) for b in blocks]          # rate 0: an Identity
    assert rates == pytest.approx([0.0, 0.15, 0.3])
    loop.run()
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 3 and all(np.isfinite(r["loss"]) for r in records)
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)
    assert state["scaler"]["scale"] > 0 and state["config"]["precision"] == "fp16"


def test_sigkill_then_resume_reaches_the_same_losses(stores, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(train_command(stores / "kept", tmp_path / "ref", 10), check=True, env=env, capture_output=True)
    reference = [json.loads(line) for line in (tmp_path / "ref" / "metrics.jsonl").read_text().splitlines()]

    out = tmp_path / "run"
    proc = subprocess.Popen(train_command(stores / "kept", out, 10), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline:
        lines = (out / "metrics.jsonl").read_text().splitlines() if (out / "metrics.jsonl").exists() else []
        if len(lines) >= 5:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    steps_done = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines() if line]
    assert max(steps_done) < 10, "the kill should land before the end"
    assert (out / "student.safetensors").exists(), "every checkpoint exports the backbone"
    subprocess.run(train_command(stores / "kept", out, 10), check=True, env=env, capture_output=True)
    resumed = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in resumed] == list(range(1, 11))
    for a, b in zip(resumed, reference):
        assert {k: v for k, v in a.items() if k != "samples_per_s"} == {k: v for k, v in b.items() if k != "samples_per_s"}


def test_sigterm_writes_a_checkpoint_at_the_next_step_and_the_resume_is_exact(stores, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(train_command(stores / "kept", tmp_path / "ref", 10), check=True, env=env, capture_output=True)
    reference = read_metrics(tmp_path / "ref")
    out = tmp_path / "run"
    # as SLURM does: SIGTERM to every process of the job, loader workers included; no checkpoint is due before the end
    proc = subprocess.Popen(train_command(stores / "kept", out, 10, "--workers", "2", "--checkpoint-every", "100"),
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and not ((out / "metrics.jsonl").exists() and
                                          len((out / "metrics.jsonl").read_text().splitlines()) >= 3):
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 143, stderr.decode()
    stopped_at = torch.load(out / "checkpoint.pt", weights_only=True)["step"]
    assert 3 <= stopped_at < 10
    assert f"train: SIGTERM at step {stopped_at} of 10: checkpoint written to {out / 'checkpoint.pt'}" in stderr.decode()
    assert "Traceback" not in stderr.decode()
    subprocess.run(train_command(stores / "kept", out, 10, "--workers", "2"), check=True, env=env, capture_output=True)
    strip = lambda records: [{k: v for k, v in r.items() if k != "samples_per_s"} for r in records]  # noqa: E731
    assert strip(read_metrics(out)) == strip(reference)


def test_loader_workers_die_with_a_killed_train(stores, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen(train_command(stores / "kept", out, 200, "--workers", "2"),
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and not ((out / "metrics.jsonl").exists() and
                                          len((out / "metrics.jsonl").read_text().splitlines()) >= 2):
        time.sleep(0.01)
    children = [int(c) for c in open(f"/proc/{proc.pid}/task/{proc.pid}/children").read().split()]
    assert len(children) == 2, "two loader workers"
    proc.send_signal(signal.SIGKILL)
    _, stderr = proc.communicate(timeout=30)     # the pipe closes once the workers are gone too
    time.sleep(0.5)
    alive = [c for c in children if os.path.exists(f"/proc/{c}") and
             open(f"/proc/{c}/stat").read().split(")")[-1].split()[0] != "Z"]
    assert not alive and b"Traceback" not in stderr, stderr.decode()


def test_clear_errors_before_any_step(stores, tmp_path):
    kept, full = stores / "kept", stores / "full"
    cases = [
        (config(kept, mask="random"), "--mask random needs a store made with --tokens full"),
        (config(kept, feature_teacher="deit"), "--feature-teacher deit: the store holds features of clip"),
        (config(kept, relation_blocks=[0]), r"--relation-blocks 0: the store holds relations of mae at blocks \[1, 2\]"),
        (config(kept, student_args=dict(depth=3, embed_dim=24, num_heads=6, patch_size=8)),
         "patch grid mismatch.*student vit_base_patch16_224 cuts 64px views into 8x8"),
        (config(full, steps=None), "exactly one of --steps and --epochs"),
        (config(kept, student_args=dict(depth=3, embed_dim=24, num_heads=6, img_size=224)),
         "--student-arg img_size: the store's views are 64 px"),
        (config(kept, student_args=dict(depth=2, embed_dim=24, num_heads=6)),
         r"rel.mae.b1: teacher block 1 pairs with student block -1 by the same offset from the end \(-3\), outside "
         r"a 2-block student; give --student-blocks 1=S"),
        (config(kept, student_blocks={2: 3}), r"--student-blocks 2=3, outside a 3-block student"),
        (config(kept, losses=["mae:rel@0=1"]), r"--loss mae:rel@0: the store holds no rel.mae.b0 \(it holds feat.clip, "
         r"feat.mae.b2, rel.mae.b1, rel.mae.b2, msa.mae.b1\); add it with precompute --target"),
        (config(kept, losses=["mae:feat=1"]), r"the store holds no feat.mae"),
        (config(kept, losses=["clip:feat=1"], feature_teacher="clip"), "--loss names every term"),
        (config(kept, losses=["clip:feat"]), r"--loss 'clip:feat': expected ROLE:KIND\[@B\[,B...\]\]=WEIGHT"),
    ]
    for cfg, message in cases:
        with pytest.raises(HdistillError, match=message):
            solo(cfg, str(tmp_path / "x"), runtime())


def test_damaged_shard_and_nan_target_are_named(stores, tmp_path):
    import io
    import tarfile

    import google_crc32c
    store = tmp_path / "store"
    shutil.copytree(stores / "kept", store)
    shard = store / "wds" / "view0-000000.tar"
    shard.write_bytes(shard.read_bytes()[:3000] + b"\x00garbage" * 50)
    with pytest.raises(HdistillError, match="view0-000000.tar"):
        run_train(config(store, steps=3), str(tmp_path / "run1"), runtime())

    # one flipped bit inside a float16 target array: shapes and headers intact, the values still finite
    shutil.rmtree(store)
    shutil.copytree(stores / "kept", store)
    with tarfile.open(shard) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith(".feat.clip.npy"))
    data = bytearray(shard.read_bytes())
    data[member.offset_data + member.size - 100] ^= 0x01
    shard.write_bytes(bytes(data))
    with pytest.raises(HdistillError, match=r"view0-000000.tar: crc32c [0-9a-f]{8} differs from the [0-9a-f]{8} its "
                                            r"commit recorded"):
        run_train(config(store, steps=3), str(tmp_path / "run2"), runtime())

    # a NaN that the checksum does not catch (the shard rewritten and its crc32c recorded anew): found on the device
    shutil.rmtree(store)
    shutil.copytree(stores / "kept", store)
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    poisoned = next(m.name for m, _ in members if m.name.endswith(".feat.clip.npy"))
    with tarfile.open(shard, "w") as tar:
        for m, data in members:
            if m.name == poisoned:
                arr = np.load(io.BytesIO(data))
                arr[0, 0] = np.nan
                buf = io.BytesIO()
                np.save(buf, arr)
                data, m.size = buf.getvalue(), len(buf.getvalue())
            tar.addfile(m, io.BytesIO(data))
    manifest = json.loads((store / "manifest.json").read_text())
    for record in manifest["shards"]:
        if record["name"] == "view0-000000":
            record["crc32c"] = f"{google_crc32c.value(shard.read_bytes()):08x}"
    (store / "manifest.json").write_text(json.dumps(manifest))
    loop = solo(config(store, steps=9, lanes=1), str(tmp_path / "run3"), runtime(log_every=3, checkpoint_every=3))
    member = loop.members["train"]
    with pytest.raises(HdistillError, match=r"the batch of step (\d) holds NaN or Inf in feat.clip: the store is "
                                            r"damaged; check it with hdistill verify \(its update was not applied") as err:
        loop.run()
    bad_step = int(err.value.args[0].split("step ")[1].split(" ")[0])
    # the first step is checked too (its terms are described), then every log step
    assert member.steps_done == (1 if bad_step == 1 else -(-bad_step // 3) * 3), "it stops at the first check after it"
    assert all(torch.isfinite(p).all() for p in member.model.parameters()), "the NaN update was skipped"
    saved = torch.load(tmp_path / "run3" / "checkpoint.pt", weights_only=True)["step"] if bad_step > 3 else None
    assert saved in (None, (bad_step - 1) // 3 * 3), "only the steps before the bad batch are checkpointed"


def test_train_cli(stores, tmp_path):
    result = CliRunner().invoke(cli, ["train", "--shards", str(stores / "full"), "--out", str(tmp_path / "r"),
                                      "--steps", "2", "--batch-size", "4", "--workers", "0", "--device", "cpu",
                                      "--student-arg", "depth=3", "--student-arg", "embed_dim=24",
                                      "--student-arg", "num_heads=6", "--mask", "none", "--log-every", "1"])
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    # not a terminal (as under SLURM): a plain progress line every --log-every steps
    assert "train: step 2/2 epoch 1/1 loss" in result.output and "samples/s eta 0:00:00" in result.output
    import yaml
    resolved = yaml.safe_load((tmp_path / "r" / "config.yaml").read_text())
    assert (resolved["mask"], resolved["steps"], resolved["student_arg"]) == ("none", 2, ["depth=3", "embed_dim=24",
                                                                                          "num_heads=6"])
    assert {"step", "loss", "loss/feat.clip", "loss/rel.mae.b1", "loss/rel.mae.b2", "lr", "samples_per_s"} \
        == set(records[0]) - {"epoch"}
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(tmp_path / "r" / "tensorboard"))
    events.Reload()
    # TensorBoard's tags are metrics.jsonl's keys
    assert [e.value for e in events.Scalars("loss")] == pytest.approx([r["loss"] for r in records])
    assert [e.value for e in events.Scalars("loss/feat.clip")] == pytest.approx([r["loss/feat.clip"] for r in records])


def test_two_ranks_take_the_global_batches_of_one(stores, tmp_path):
    """The epoch's order depends on (seed, epoch, lanes, batch) only: 2 ranks each take half of every global
    batch a single process takes; the losses agree to float reduction order. No stochastic depth (it draws
    per rank)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    no_drop = ("--drop-path", "0")
    alone = lambda out, steps: run_train(config(stores / "kept", steps=steps, drop_path=0.0), str(out),  # noqa: E731
                                         runtime(log_every=1, checkpoint_every=2))  # train_command's run, in-process
    alone(tmp_path / "one", 8)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    result = subprocess.run(torchrun + train_command(stores / "kept", tmp_path / "two", 8, *no_drop)[1:], env=env,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("train: finished") == 1
    one, two = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    assert [r["step"] for r in two] == list(range(1, 9)) and [r["lr"] for r in two] == [r["lr"] for r in one]
    for a, b in zip(one, two):
        for key in ("loss", "loss/feat.clip", "loss/rel.mae.b1", "loss/rel.mae.b2"):
            assert b[key] == pytest.approx(a[key], rel=1e-4), (a["step"], key)

    # killed on one rank, resumed on two: the same steps as an uninterrupted single-process run
    alone(tmp_path / "one15", 15)
    out = tmp_path / "moved"
    proc = subprocess.Popen(train_command(stores / "kept", out, 15, *no_drop), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "checkpoint.pt").exists():
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = torch.load(out / "checkpoint.pt", weights_only=True)["step"]
    assert 2 <= killed_at < 15, "the kill should land mid-run"
    result = subprocess.run(torchrun + train_command(stores / "kept", out, 15, *no_drop)[1:], env=env,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    moved, reference = read_metrics(out), read_metrics(tmp_path / "one15")
    assert [r["step"] for r in moved] == list(range(1, 16))
    for a, b in zip(reference, moved):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4), a["step"]
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert state["world_size"] == 2 and state["loader"] == {"epoch": 5, "batch": 0}   # 12 samples: 3 steps an epoch, 5 epochs


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (Linux /proc), children first."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if parent == pid:
            children.append(int(stat.parent.name))
    return children + [d for c in children for d in descendants(c)]


def ranks_alive(run) -> list[int]:
    """Processes that still have the run's files open (a rank killed a moment ago may take a while to go)."""
    alive = []
    for fd in Path("/proc").glob("[0-9]*/fd/*"):
        try:
            if os.readlink(fd).startswith(str(run)):
                alive.append(int(fd.parent.parent.name))
        except OSError:
            continue
    return alive


def test_each_rank_draws_its_own_stochastic_depth_and_a_two_rank_kill_resumes_exactly(stores, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    command = lambda out: torchrun + train_command(stores / "kept", out, 12, "--drop-path", "0.3")[1:]  # noqa: E731
    result = subprocess.run(command(tmp_path / "ref"), env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = torch.load(tmp_path / "ref" / "checkpoint.pt", weights_only=True)["rng"]
    assert len(ranks) == 2
    draws = []
    for rank in ranks:      # the next stochastic-depth draw of each rank, for the same local samples
        torch.set_rng_state(rank["torch"])
        draws.append(torch.rand(2, 3))
    assert not torch.equal(*draws), "the ranks must not draw the same drop-path pattern"

    out = tmp_path / "run"
    proc = subprocess.Popen(command(out), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "checkpoint.pt").exists():
        time.sleep(0.005)
    for pid in [proc.pid, *descendants(proc.pid)]:     # torchrun starts each rank in a session of its own
        os.kill(pid, signal.SIGKILL)
    proc.wait()
    while any(Path(f"/proc/{pid}").exists() for pid in ranks_alive(out)):
        time.sleep(0.01)
    killed_at = torch.load(out / "checkpoint.pt", weights_only=True)["step"]
    assert 2 <= killed_at < 12, "the kill should land mid-run"
    shutil.copytree(out, tmp_path / "one")
    result = subprocess.run(command(out), env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    strip = lambda records: [{k: v for k, v in r.items() if k != "samples_per_s"} for r in records]  # noqa: E731
    assert strip(read_metrics(out)) == strip(read_metrics(tmp_path / "ref"))

    # the same checkpoint on one rank: it resumes, and says that the stochastic-depth stream restarts
    result = subprocess.run(train_command(stores / "kept", tmp_path / "one", 12, "--drop-path", "0.3"), env=env,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"holds the stochastic-depth RNG of 2 rank(s), this run has 1: each rank's stochastic-depth stream " \
           f"restarts at step {killed_at}" in result.stderr
    assert [r["step"] for r in read_metrics(tmp_path / "one")] == list(range(1, 13))


def test_ranks_exit_when_their_launcher_dies_and_free_the_run(stores, tmp_path):
    """SIGKILL of torchrun's process group does not reach the ranks (torch starts each in a session of its own): each
    sees its launcher gone and exits, so the run's lock frees and the same command can resume."""
    out = tmp_path / "run"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    proc = subprocess.Popen(torchrun + train_command(stores / "kept", out, 100_000)[1:], start_new_session=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "checkpoint.pt").exists():
        time.sleep(0.01)
    ranks = descendants(proc.pid)
    assert len(ranks) >= 2, "the ranks are running"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 15
    while time.time() < deadline and any(Path(f"/proc/{pid}").exists() for pid in ranks):
        time.sleep(0.05)
    alive = [pid for pid in ranks if Path(f"/proc/{pid}").exists()]
    for pid in alive:                              # (so that a failing test leaves no process behind)
        os.kill(pid, signal.SIGKILL)
    assert not alive, "ranks outlived their launcher by 15 s"
    with open(out / ".lock", "a+") as lock:       # what the next run takes first
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] < 100_000


@pytest.mark.parametrize("loss, untouched", [
    # teacher blocks 1, 2 of 4 pair with student blocks 0, 1 of 3: Q K^T of block 1 needs nothing after its qkv
    ("mae:rel@1,2=0.5", ("blocks.1.attn.proj.", "blocks.1.norm2.", "blocks.1.mlp.", "blocks.2.", "norm.")),
    # the residual stream after student block 1 needs nothing after block 1
    ("mae:feat@2=1", ("blocks.2.", "norm."))])
def test_objectives_that_reach_part_of_the_student_train_under_two_ranks(stores, tmp_path, loss, untouched):
    import random

    from safetensors.torch import load_file
    run_train(config(stores / "kept", steps=4, losses=[loss], drop_path=0.0), str(tmp_path / "one"),
              runtime(log_every=1))
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    result = subprocess.run(torchrun + train_command(stores / "kept", tmp_path / "two", 4, "--drop-path", "0",
                                                     "--loss", loss)[1:],
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "keep their initial values and are left out of the optimiser and of DDP" in result.stderr
    one, two = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    assert [r["step"] for r in two] == [1, 2, 3, 4]
    for a, b in zip(one, two):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4), a["step"]
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    initial = build_student(STUDENT["student"], 64, STUDENT["student_args"]).model.state_dict()
    trained = load_file(str(tmp_path / "two" / "student.safetensors"))
    for name, value in initial.items():
        if name.startswith(untouched):
            assert torch.equal(trained[name], value), f"{name} is reached by no term and must keep its value"
        elif name.startswith("blocks.0."):
            assert not torch.equal(trained[name], value), f"{name} trains"


@pytest.mark.parametrize("store,mask", [("kept", "progressive"), ("full", "random")])
def test_online_and_offline_give_the_same_losses(stores, tmp_path, store, mask):
    cfg = config(stores / store, steps=20, mask=mask)
    run_train(cfg, str(tmp_path / "off"), runtime(log_every=1))
    run_train(cfg, str(tmp_path / "on"), runtime(log_every=1), source=online())
    off, on = ([json.loads(line) for line in (tmp_path / r / "metrics.jsonl").read_text().splitlines()]
               for r in ("off", "on"))
    assert len(off) == len(on) == 20
    for a, b in zip(off, on):
        for term in ("loss", "loss/feat.clip", "loss/rel.mae.b1", "loss/rel.mae.b2"):
            # stored targets are float16 (relative rounding 4.9e-4), online ones float32
            assert b[term] == pytest.approx(a[term], rel=2e-3, abs=1e-6), (a["step"], term)


def epoch_keys(stream, epoch: int, start: int = 0) -> list[list[str]]:
    """The keys of every global batch of an epoch, batch by batch, in lane order (samples before collation)."""
    stream.set_epoch(epoch, start)
    plan = stream.plan()
    lanes = {lane: stream._lane(plan, lane) for lane in range(plan.lanes)}
    return [[next(lanes[lane]).key for lane in range(plan.lanes) for _ in range(plan.per_lane)]
            for _ in range(start, plan.steps)]


def test_epoch_order_views_lanes_and_a_resume_that_skips(stores, monkeypatch):
    opened = Store(stores / "kept")
    stream = opened.stream(StreamSpec(default_targets(opened.manifest), "progressive", seed=0, lanes=2, batch_size=4,
                                      buffer_mb=0.02))
    assert 1 < stream.buffer < 12
    batches = {epoch: epoch_keys(stream, epoch) for epoch in range(3)}
    for epoch, keys in batches.items():
        flat = [k for batch in keys for k in batch]
        assert len(flat) == 12 and len(set(flat)) == 12, "every sample of the epoch once"
        assert {k.rsplit("-v", 1)[1] for k in flat} == {str(epoch % 2)}, "epoch e reads view e mod V"
    assert {k[:-3] for b in batches[0] for k in b} == {k[:-3] for b in batches[1] for k in b}
    assert batches[0] != batches[2], "view 0 again, in another order"
    assert epoch_keys(stream, 0) == batches[0], "a function of (seed, epoch) alone"
    # two lanes: each global batch takes 2 samples from each half of the epoch's shard sequence
    plan = stream.plan()
    assert plan.bounds == [0, 6, 12] and plan.per_lane == 2 and plan.steps == 3

    # resuming at batch 2 gives the remaining batches and decodes only the 4 samples they hold, not the 8 before
    from hdistill.shards.reader import StoreReader
    decoded = []
    real_sample = StoreReader._sample
    monkeypatch.setattr(StoreReader, "_sample", lambda self, where, key, *args, **kw: (
        decoded.append(key), real_sample(self, where, key, *args, **kw))[1])
    assert epoch_keys(stream, 0, start=2) == batches[0][2:]
    assert sorted(decoded) == sorted(k for b in batches[0][2:] for k in b)
    from hdistill.train.run import total_steps
    assert total_steps(config(stores / "kept", steps=None, epochs=1.5, batch_size=4), opened.manifest) == 3 + 1


def test_compiled_training_gives_the_eager_losses(stores, tmp_path):
    cfg = config(stores / "kept", steps=3, drop_path=0.0)   # compiled code draws other random numbers
    run_train(cfg, str(tmp_path / "eager"), runtime(log_every=1))
    run_train(cfg, str(tmp_path / "compiled"), runtime(log_every=1, compile=True))
    eager, compiled = ([json.loads(line)["loss"] for line in (tmp_path / r / "metrics.jsonl").read_text().splitlines()]
                       for r in ("eager", "compiled"))
    assert compiled == pytest.approx(eager, rel=1e-5)


def test_zarr_reader_gives_the_webdataset_losses(tmp_path):
    write_photos(tmp_path / "photos", 10, seed=5)
    precompute(tmp_path / "photos", tmp_path / "store", views=2, tokens="full", formats=["wds", "zarr"])
    losses = {}
    for reader in ("wds", "zarr"):
        cfg = config(tmp_path / "store", steps=6, mask="random")
        run_train(cfg, str(tmp_path / reader), runtime(log_every=1, format=reader, workers=1))
        losses[reader] = [json.loads(line) for line in (tmp_path / reader / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in losses["zarr"]] == [r["loss"] for r in losses["wds"]]
    # a zarr-only store is read from zarr without being told
    precompute(tmp_path / "photos", tmp_path / "zarr-only", views=2, tokens="full", formats=["zarr"])
    run_train(config(tmp_path / "zarr-only", steps=6, mask="random"), str(tmp_path / "default"),
              runtime(log_every=1, workers=1))
    default = [json.loads(line)["loss"] for line in (tmp_path / "default" / "metrics.jsonl").read_text().splitlines()]
    assert default == [r["loss"] for r in losses["zarr"]]
    precompute(tmp_path / "photos", tmp_path / "wds-only", formats=["wds"])
    with pytest.raises(HdistillError, match="--format zarr: the store .* holds only wds"):
        Store(tmp_path / "wds-only", "zarr")


def test_validation_is_the_mean_loss_over_every_held_out_sample(stores, tmp_path):
    import webdataset as wds
    write_photos(tmp_path / "held-out", 5, seed=99)
    precompute(tmp_path / "held-out", tmp_path / "val", crop="center", shard_size=2,
               targets=["clip:feat", "mae:rel@1,2", "mae:msa@1", "mae:feat@2", "mae:feat"])   # a superset
    losses = ["clip:feat=1", "mae:rel@2=0.5", "mae:msa@1=0.3"]
    cfg = config(stores / "kept", steps=4, losses=losses, val_shards=str(tmp_path / "val"), val_every=3)
    run_train(cfg, str(tmp_path / "run"), runtime(log_every=1))
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in records if "val/loss" in r]
    assert [r["step"] for r in val] == [0, 3, 4]

    # by hand: the final student and projections on every held-out sample, read with plain webdataset
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)
    student = build_student(STUDENT["student"], 64, STUDENT["student_args"]).eval()
    student.load_state_dict(state["student"])
    student.capture([("rel", 1), ("msa", 0)])                 # teacher blocks 2 and 1 of 4 -> student 1 and 0
    samples = list(wds.WebDataset(sorted(str(p) for p in (tmp_path / "val" / "wds").glob("*.tar")),
                                  shardshuffle=False).decode())
    assert len(samples) == 5 and all(not s["json"]["flip"] for s in samples)
    per_sample = {"feat.clip": [], "rel.mae.b2": [], "msa.mae.b1": []}
    with torch.no_grad():
        for s in samples:
            out = student(torch.from_numpy(s["pixels.npy"])[None], torch.from_numpy(s["keep.npy"].astype(np.int64))[None])

            def feature(x, target, name):
                t = torch.from_numpy(target).float()[None]
                t = (t - t.mean(-1, keepdim=True)) / torch.sqrt(t.var(-1, unbiased=False, keepdim=True) + 1e-6)
                w, b = state["loss"][f"proj.{name}.weight"], state["loss"][f"proj.{name}.bias"]
                return smooth_l1(x @ w.T + b, t, 2.0)

            per_sample["feat.clip"].append(feature(out.tokens, s["feat.clip.npy"], "feat_clip"))
            per_sample["msa.mae.b1"].append(feature(out.taps[("msa", 0)], s["msa.mae.b1.npy"], "msa_mae_b1"))
            # student 6 heads, teacher 4: compared at 2 summed head groups
            r_s, r_t = out.taps[("rel", 1)], torch.from_numpy(s["rel.mae.b2.npy"]).float()[None]
            per_sample["rel.mae.b2"].append(smooth_l1(torch.stack([r_s[:, :3].sum(1), r_s[:, 3:].sum(1)], 1),
                                                      torch.stack([r_t[:, :2].sum(1), r_t[:, 2:].sum(1)], 1), 2.0))
    means = {name: float(np.mean(values)) for name, values in per_sample.items()}
    for name, value in means.items():
        assert val[-1][f"val/loss/{name}"] == pytest.approx(value, rel=1e-5)
    assert val[-1]["val/loss"] == pytest.approx(means["feat.clip"] + 0.5 * means["rel.mae.b2"]
                                                + 0.3 * means["msa.mae.b1"], rel=1e-5)


def test_validation_store_must_hold_the_run_targets(stores, tmp_path):
    write_photos(tmp_path / "held-out", 3, seed=98)
    precompute(tmp_path / "held-out", tmp_path / "val", crop="center", targets=["clip:feat", "mae:rel@1"])
    cfg = config(stores / "kept", val_shards=str(tmp_path / "val"))
    with pytest.raises(HdistillError, match=r"--val-shards .*val: no target rel.mae.b2, which the loss uses"):
        solo(cfg, str(tmp_path / "run"), runtime())
    with pytest.raises(HdistillError, match="--crop center gives one view per image"):
        precompute(tmp_path / "held-out", tmp_path / "val2", crop="center", views=2)


def test_a_held_out_store_must_come_from_the_training_stores_teachers(stores, tmp_path, capsys):
    write_photos(tmp_path / "held-out", 3, seed=97)
    make = lambda name, **kw: precompute(tmp_path / "held-out", tmp_path / name, **{"crop": "center", **kw})  # noqa: E731
    make("other-weights", seed=1)             # random teachers of another seed: the same models, other weights
    make("bf16", precision="bf16")
    for name, field in [("other-weights", "weights"), ("bf16", "precision")]:
        with pytest.raises(HdistillError, match=rf"--val-shards .*{name}: teacher '(mae|clip)' differs from the "
                                                rf"training store's in its {field} "):
            solo(config(stores / "kept", val_shards=str(tmp_path / name)), str(tmp_path / "run"), runtime())
    # used, with a warning: the training store itself, random crops, another mask
    make("random-crops", crop="random")
    make("other-mask", mask_ratio=0.5)
    expected = {str(stores / "kept"): "is the training store: val/loss measures the fit to the training views",
                str(tmp_path / "random-crops"): "was made with --crop random: its views are random crops",
                str(tmp_path / "other-mask"): "its mask (progressive mae K=0.5 blocks [0, 1, 2] mean=normalized "
                                              "forward=full) is not the training store's (progressive mae K=0.3 "}
    for val, warning in expected.items():
        loop = solo(config(stores / "kept", val_shards=val), str(tmp_path / "run"), runtime())
        assert len(loop.plan.warnings) == 1 and warning in loop.plan.warnings[0], loop.plan.warnings
    loop.run()
    assert f"train: warning: --val-shards {tmp_path / 'other-mask'}: its mask" in capsys.readouterr().err


def test_checkpoint_history_weights_only_and_a_longer_run(stores, tmp_path):
    base = dict(steps=4, lr=1e-3, warmup_steps=None)
    run_train(config(stores / "kept", **base), str(tmp_path / "run"),
              runtime(log_every=1, checkpoint_every=2, keep_checkpoints=2))
    history = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert history == ["step-000000002.pt", "step-000000004.pt"]
    for name, step in zip(history, (2, 4)):
        state = torch.load(tmp_path / "run" / "checkpoints" / name, weights_only=True)
        assert state["step"] == step and state["warmup"] == 1           # 5% of 4 steps, at least 1
    with pytest.raises(HdistillError, match="is at step 4; --steps/--epochs give 3, which is behind it"):
        run_train(config(stores / "kept", **{**base, "steps": 3}), str(tmp_path / "run"), runtime())
    with pytest.raises(HdistillError, match=r"other options \(--alpha\)"):
        run_train(config(stores / "kept", **{**base, "alpha": 0.5}), str(tmp_path / "run"), runtime())

    run_train(config(stores / "kept", **{**base, "steps": 8}), str(tmp_path / "run"),
              runtime(log_every=1, checkpoint_every=2, keep_checkpoints=2))
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 9))
    # the step k record holds the lr of step k: warm-up kept at 1 step, cosine decay now over 8 steps
    for r in records[4:]:
        assert r["lr"] == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * (r["step"] - 2) / 7)), rel=1e-9)
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step-000000006.pt",
                                                                                    "step-000000008.pt"]


def test_fresh_views_match_the_store_until_its_views_run_out(stores, tmp_path):
    """A 2-view store: epochs 0 and 1 render the stored views (same losses as offline, up to float16),
    epoch 2 renders view 2, which no store holds."""
    cfg = config(stores / "kept", steps=9, drop_path=0.0)                  # 12 images, batch 4: 3 steps per epoch
    run_train(cfg, str(tmp_path / "off"), runtime(log_every=1))
    run_train(cfg, str(tmp_path / "fresh"), runtime(log_every=1), source=online(fresh_views=True))
    off, fresh = ([json.loads(line) for line in (tmp_path / r / "metrics.jsonl").read_text().splitlines()]
                  for r in ("off", "fresh"))
    for a, b in zip(off[:6], fresh[:6]):
        assert b["loss/feat.clip"] == pytest.approx(a["loss/feat.clip"], rel=2e-3), a["step"]
    # view 2 is another crop: its losses differ well beyond the float16 rounding of the stored ones (about 1e-5)
    assert all(abs(b["loss/feat.clip"] - a["loss/feat.clip"]) > 1e-3 * a["loss/feat.clip"]
               for a, b in zip(off[6:], fresh[6:]))
    refused = CliRunner().invoke(cli, ["train", "--shards", str(stores / "kept"), "--out", str(tmp_path / "x"),
                                       "--steps", "1", "--fresh-views"])
    assert refused.exit_code != 0 and "--fresh-views and --data render views with the teachers: they need --online" \
        in refused.output


def test_a_one_shard_store_gives_every_rank_its_half_of_each_global_batch(tmp_path):
    write_photos(tmp_path / "photos", 8, seed=12)
    precompute(tmp_path / "photos", tmp_path / "store", shard_size=8)                 # one shard, 8 samples
    opened = Store(tmp_path / "store")
    assert len(opened.manifest.shards) == 1
    make = lambda rank, world: opened.stream(StreamSpec(  # noqa: E731
        default_targets(opened.manifest), "progressive", seed=3, lanes=2, batch_size=4, buffer_mb=0.02, rank=rank,
        world_size=world))
    whole = epoch_keys(make(0, 1), 0)
    assert len(whole) == 2 and all(len(b) == 4 for b in whole)
    halves = []
    for rank in (0, 1):
        stream = make(rank, 2)
        stream.set_epoch(0)
        pieces = list(stream)
        assert [p["lanes"] for p in pieces] == [[rank], [rank]] and [p["batch"] for p in pieces] == [0, 1]
        assert all(p["samples"]["count"] == 2 for p in pieces)
        halves.append([p["samples"]["pixels"] for p in pieces])
    single = make(0, 1)
    single.set_epoch(0)
    pieces = list(single)
    assert [p["lanes"] for p in pieces] == [[0, 1], [0, 1]]
    for b in range(2):   # rank r's piece of batch b is lane r's share of the single process's batch b
        for rank in (0, 1):
            expected = pieces[b]["samples"]["pixels"][2 * rank:2 * rank + 2]
            assert torch.equal(halves[rank][b], expected)


def test_a_run_killed_between_its_checkpoint_and_its_export_completes_them_when_opened(stores, tmp_path, monkeypatch):
    """A checkpoint is committed in two phases (checkpoint.pt.pending-<step>; then the export, and the pending file in
    place): a run killed after the write has, when opened again, the checkpoint in place and the student exported
    from it."""
    from safetensors.torch import load_file
    from hdistill.train.checkpoint import RunFolder

    class Killed(BaseException):
        pass
    cfg = config(stores / "kept", steps=4)
    run_train(cfg, str(tmp_path / "whole"), runtime(checkpoint_every=2))
    publish = RunFolder.publish

    def dies_before_exporting_step_4(folder, member, step, keep):
        if step == 4:
            raise Killed()
        publish(folder, member, step, keep)
    monkeypatch.setattr(RunFolder, "publish", dies_before_exporting_step_4)
    killed = tmp_path / "killed"
    with pytest.raises(Killed):
        run_train(cfg, str(killed), runtime(checkpoint_every=2))
    monkeypatch.setattr(RunFolder, "publish", publish)
    assert torch.load(killed / "checkpoint.pt", weights_only=True)["step"] == 2
    assert (killed / "checkpoint.pt.pending-4").exists()
    run_train(cfg, str(killed), runtime(checkpoint_every=2))      # finished: it only completes the commit
    assert torch.load(killed / "checkpoint.pt", weights_only=True)["step"] == 4
    assert not list(killed.glob("checkpoint.pt.pending-*"))
    exported, whole = load_file(killed / "student.safetensors"), load_file(tmp_path / "whole" / "student.safetensors")
    assert exported.keys() == whole.keys() and all(torch.equal(exported[k], whole[k]) for k in whole)

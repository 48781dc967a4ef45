"""Helpers shared by the test modules: tiny teachers and their stores, photos, a train config, plain reads."""
import glob
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image

from hdistill.precompute.config import EXACT, PrecomputeConfig, Runtime
from hdistill.common.options import option_name
from hdistill.precompute.run import run_precompute
from hdistill.train.config import OnlineConfig, TrainConfig, TrainRuntime
from hdistill.train.run import run_train

TINY = dict(
    teachers=["mae", "clip"],
    models={"mae": "vit_base_patch16_224", "clip": "vit_base_patch16_clip_quickgelu_224"},
    model_args={"mae": dict(depth=4, embed_dim=32, num_heads=4), "clip": dict(depth=3, embed_dim=24, num_heads=3)},
    random_init=True, image_size=64, batch_size=4, shard_size=4,
    **EXACT,                # float16 targets and the pixels as rendered: what the tests compare with references
)
CLI_TINY = ["--random-init", "--image-size", "64", "--batch-size", "4", "--shard-size", "4",
            "--model", "mae=vit_base_patch16_224", "--model-arg", "mae.depth=4", "--model-arg", "mae.embed_dim=32",
            "--model-arg", "mae.num_heads=4", "--model", "clip=vit_base_patch16_clip_quickgelu_224",
            "--model-arg", "clip.depth=3", "--model-arg", "clip.embed_dim=24", "--model-arg", "clip.num_heads=3",
            "--encoding", "fp16", "--pixels", "raw", "--compress", "none"]


def write_photos(folder: Path, count: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    for i in range(count):
        h, w = rng.integers(40, 200, size=2)
        base = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
        img = Image.fromarray(base).resize((int(w), int(h)), Image.BILINEAR)
        noise = rng.integers(-20, 20, (int(h), int(w), 3))
        img = Image.fromarray(np.clip(np.asarray(img) + noise, 0, 255).astype(np.uint8))
        sub = folder / f"class{i % 2}"
        sub.mkdir(parents=True, exist_ok=True)
        img.save(sub / f"img.{i:03d}.jpg" if i == 0 else sub / f"img{i:03d}.jpg", quality=90)


def precompute(data, out, workers=0, **overrides):
    cfg = PrecomputeConfig(data=str(data), **{**TINY, **overrides})
    return run_precompute(cfg, str(out), Runtime(workers=workers, quiet=True)), cfg


def wds_samples(store):
    urls = sorted(glob.glob(str(store / "wds" / "*.tar")))
    return {s["__key__"]: s for s in wds.WebDataset(urls, shardshuffle=False).decode()}


STUDENT = dict(student="vit_base_patch16_224", student_args=dict(depth=3, embed_dim=24, num_heads=6))


def config(store, **overrides):
    return TrainConfig(shards=str(store), **{**STUDENT, "steps": 6, "batch_size": 4, "lr": 1e-3,
                                             "lane_buffer_mb": 0.02, **overrides})


def runtime(**overrides):
    """A quiet CPU TrainRuntime with no loader processes unless `overrides` say otherwise."""
    return TrainRuntime(**{"device": "cpu", "workers": 0, "quiet": True, **overrides})


def online(fresh_views=False):
    """The --online source (as `hdistill train --online [--fresh-views]` makes it)."""
    from hdistill.online import live_targets
    return live_targets(OnlineConfig(online=True, fresh_views=fresh_views))


def precompute_command(data, out, *extra):
    return [sys.executable, "-m", "hdistill", "precompute", "--data", str(data), "--out", str(out),
            "--workers", "0", "--device", "cpu", "--quiet", "--format", "wds,zarr", *CLI_TINY, *extra]


def precompute_env():
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def train_command(store, out, steps=8, *extra):
    return [sys.executable, "-m", "hdistill", "train", "--shards", str(store), "--out", str(out), "--steps", str(steps),
            "--batch-size", "4", "--lr", "1e-3", "--workers", "0", "--device", "cpu", "--log-every", "1",
            "--checkpoint-every", "2", "--lane-buffer-mb", "0.02", "--student", "vit_base_patch16_224",
            "--student-arg", "depth=3", "--student-arg", "embed_dim=24", "--student-arg", "num_heads=6", "--quiet",
            *extra]


def read_metrics(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line]


def resumed_on_two_ranks(store, tmp_path, **options) -> tuple[list[dict], list[dict]]:
    """The metrics of a one-process run of 6 steps with `options` (TrainConfig fields; run in this process, as
    train_command's run), and of the same run resumed on 2 ranks (torchrun, train_command) from its step-4
    checkpoint."""
    whole, moved = tmp_path / "whole", tmp_path / "moved"
    run_train(config(store, steps=6, drop_path=0.0, **options), str(whole),
              runtime(log_every=1, checkpoint_every=2, keep_checkpoints=2))
    moved.mkdir()
    shutil.copyfile(whole / "checkpoints" / "step-000000004.pt", moved / "checkpoint.pt")
    shutil.copyfile(whole / "metrics.jsonl", moved / "metrics.jsonl")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    result = subprocess.run(torchrun + train_command(store, moved, 6, "--drop-path", "0", *train_flags(options))[1:],
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    return read_metrics(whole), read_metrics(moved)


def train_flags(options: dict) -> list[str]:
    """TrainConfig fields -> `hdistill train` flags (a list repeats its flag)."""
    return [word for key, value in options.items() for item in (value if isinstance(value, list) else [value])
            for word in (option_name(TrainConfig, key), str(item))]

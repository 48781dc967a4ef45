"""Student training speed: offline (stored targets) against online (live teachers), and the loader alone.

One run, one device, the same student, batch and store:
  loader     batches of stored targets per second, no student step
  offline    student steps per second reading the store
  online     student steps per second with the teachers computing the same targets live

    python benchmarks/train.py                        # ViT-S/16 student, ViT-S/16 MAE + CLIP teachers
    python benchmarks/train.py --preset base --device cuda --precision bf16 --batch-size 256 --workers 10

A store is made first (random teacher weights; speed does not depend on them) from the real
ImageNet sample of ../shared/assets when present, else generated images.
"""
from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import torch

from hdistill.online import live_targets
from hdistill.precompute.config import EXACT, PrecomputeConfig, Runtime
from hdistill.precompute.run import run_precompute
from hdistill.train.config import OnlineConfig, TrainConfig, TrainRuntime
from hdistill.train.run import solo

SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "assets" / "imagenet-sample-100"
PRESETS = {  # teachers, student
    "base": ({}, "vit_base_patch16_224"),
    "small": ({"mae": "vit_small_patch16_224", "clip": "vit_small_patch16_224"}, "vit_small_patch16_224"),
}


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def rate(fn, device, warmup: int, steps: int) -> float:
    for _ in range(warmup):
        fn()
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    sync(device)
    return steps / (time.perf_counter() - start)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=PRESETS, default="small")
    ap.add_argument("--data", default=str(SAMPLE) if SAMPLE.is_dir() else "synthetic:100")
    ap.add_argument("--images", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--workers", type=int, default=None,
                    help="loader processes (default: 0 on the CPU, where a worker takes cores from the student; 8 on CUDA)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                    help="teachers' forward precision, for the store and the online run")
    args = ap.parse_args()
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    workers = args.workers if args.workers is not None else (8 if device.startswith("cuda") else 0)
    teachers, student = PRESETS[args.preset]

    with tempfile.TemporaryDirectory() as tmp:
        store = f"{tmp}/store"
        run_precompute(PrecomputeConfig(data=args.data, limit=args.images, teachers=["mae", "clip"], models=teachers,
                                        random_init=True, batch_size=args.batch_size, shard_size=25,
                                        precision=args.precision, formats=["wds"], **EXACT),
                       store, Runtime(device=device, workers=workers, quiet=True))
        cfg = TrainConfig(shards=store, student=student, steps=10_000, batch_size=args.batch_size)
        rt = TrainRuntime(device=device, quiet=True, workers=workers)
        name = torch.cuda.get_device_name() if device.startswith("cuda") else \
            f"{platform.processor() or 'cpu'}, {torch.get_num_threads()} threads"
        print(f"device: {device} ({name}); torch {torch.__version__}; preset {args.preset}: student {student}, "
              f"teachers mae+clip {teachers or 'ViT-B/16 defaults'}; batch {args.batch_size}; workers {workers}; "
              f"teacher precision {args.precision}; student autocast {'bf16' if device.startswith('cuda') else 'off'}")

        offline_loop = solo(cfg, f"{tmp}/offline", rt)
        offline, batches = offline_loop.members["train"], offline_loop.batches()
        loader = rate(lambda: next(batches), device, args.warmup, args.steps * 3) * args.batch_size
        offline_steps = rate(lambda: offline.step(next(batches)), device, args.warmup, args.steps)
        online_loop = solo(cfg, f"{tmp}/online", rt, source=live_targets(OnlineConfig(online=True)))
        online, live = online_loop.members["train"], online_loop.batches()
        online_steps = rate(lambda: online.step(online.source.prepare(next(live))), device, args.warmup, args.steps)

    print(f"loader alone   : {loader:9.1f} samples/s  ({loader / (offline_steps * args.batch_size):.1f}x "
          f"the offline student's {offline_steps * args.batch_size:.1f} samples/s)")
    print(f"offline student: {offline_steps:9.3f} steps/s")
    print(f"online student : {online_steps:9.3f} steps/s")
    print(f"offline / online: {offline_steps / online_steps:.2f}x")


if __name__ == "__main__":
    main()

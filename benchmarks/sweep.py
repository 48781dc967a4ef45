"""A sweep of K students from one pass over the store against K solo runs, side by side in one process.

    python benchmarks/sweep.py                      # 4 small students, 256 generated images, CPU
    python benchmarks/sweep.py --device cuda --student vit_base_patch16_224 --images 2048 --batch-size 256

Prints, for the K solo runs and the sweep of the same K members:
  bytes read   the process's read(2) bytes (/proc/self/io rchar) over the run: a local shard is read once by the
               checksum's preads (its memory map adds none), so this counts the store's bytes the loader took in
  wall time    seconds of each run; the sweep's against the sum of the solos'
  loader share the loader's seconds (the same batches iterated alone) over the run's
and the loader processes per GPU a sweep of K ViT-B students would need, from the measured loader rate per
process and the student rates in BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import math
import platform
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from hdistill.precompute.config import EXACT, PrecomputeConfig, Runtime
from hdistill.precompute.run import run_precompute
from hdistill.train.config import TrainConfig, TrainRuntime
from hdistill.train.loader import StoreLoader
from hdistill.train.loop import Loop
from hdistill.train.run import solo
from hdistill.train.sweep import build_sweep

TEACHERS = dict(models={"mae": "vit_base_patch16_224", "clip": "vit_base_patch16_clip_quickgelu_224"},
                model_args={"mae": dict(depth=4, embed_dim=64, num_heads=4), "clip": dict(depth=4, embed_dim=64,
                                                                                         num_heads=4)})
MEMBERS = {"hybrid": {}, "alpha-0.5": {"alpha": 0.5}, "feat-only": {"losses": ["clip:feat=1"]},
           "init-seed-1": {"init_seed": 1, "drop_path": 0.0}}
VIT_B_RATES = (6000, 11000)      # samples/s of one ViT-B student on 69 tokens per H100 (README, BENCHMARKS.md)
VIT_B_LOADER = 4443              # samples/s of one loader process on the MAE + CLIP ViT-B store shapes (fp16 kept,
#                                  checksum on, BENCHMARKS.md "Loader bandwidth", benchmarks/loader.py, 2 vCPUs)


def read_bytes() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise RuntimeError("no rchar in /proc/self/io")


def measured(fn):
    """(seconds, bytes read) of fn()."""
    before, start = read_bytes(), time.perf_counter()
    fn()
    return time.perf_counter() - start, read_bytes() - before


def loader_seconds(loop: Loop, steps: int) -> float:
    loader = StoreLoader(loop.loader.stream, loop.rt.workers, loop.rt.device)
    batches = iter(loader)
    start = time.perf_counter()
    for _ in range(steps):
        try:
            next(batches)
        except StopIteration:
            batches = iter(loader)
            next(batches)
    return time.perf_counter() - start


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--steps", type=int, default=48)
    ap.add_argument("--student", default="vit_base_patch16_224")
    ap.add_argument("--student-arg", action="append", default=None,
                    help="KEY=VALUE for the students (default: depth=4 embed_dim=96 num_heads=3)")
    args = ap.parse_args()
    student_args = dict(depth=4, embed_dim=96, num_heads=3) if args.student_arg is None else \
        {k: int(v) if v.isdigit() else v for k, _, v in (a.partition("=") for a in args.student_arg)}
    with tempfile.TemporaryDirectory() as tmp:
        store = f"{tmp}/store"
        run_precompute(PrecomputeConfig(data=f"synthetic:{args.images}", teachers=["mae", "clip"], random_init=True,
                                        image_size=args.image_size, batch_size=32, shard_size=32, **TEACHERS,
                                        **EXACT),
                       store, Runtime(device=args.device, workers=0, quiet=True))
        configs = [(name, TrainConfig(shards=store, student=args.student, student_args=student_args,
                                      steps=args.steps, batch_size=args.batch_size, lr=1e-3, **overrides))
                   for name, overrides in MEMBERS.items()]
        rt = TrainRuntime(device=args.device, workers=0, quiet=True, checkpoint_every=10 ** 9, log_every=10 ** 9)
        device = torch.cuda.get_device_name() if args.device.startswith("cuda") else \
            f"{platform.processor() or 'cpu'}, {torch.get_num_threads()} threads"
        print(f"device: {args.device} ({device}); torch {torch.__version__}; {len(configs)} students {args.student} "
              f"{student_args}; {args.steps} steps of batch {args.batch_size}; store of {args.images} generated "
              f"images at {args.image_size}px (MAE + CLIP teachers, fp16 kept, wds)")
        solo(replace(configs[0][1], steps=4), f"{tmp}/warm-up", rt).run()      # imports, first allocations
        alone = {}
        for name, cfg in configs:
            loop = solo(cfg, f"{tmp}/solo-{name}", rt)
            seconds, nbytes = measured(loop.run)
            alone[name] = (seconds, nbytes, loader_seconds(loop, args.steps))
        sweep = build_sweep(configs, f"{tmp}/sweep", rt)
        sweep_seconds, sweep_bytes = measured(sweep.run)
        sweep_loader = loader_seconds(sweep, args.steps)
    one_bytes = statistics.median(b for _, b, _ in alone.values())
    print(f"\n{'run':22s} {'wall s':>8s} {'MB read':>9s} {'loader s':>9s} {'loader share':>13s}")
    for name, (seconds, nbytes, loader) in alone.items():
        print(f"{'solo ' + name:22s} {seconds:8.2f} {nbytes / 1e6:9.1f} {loader:9.2f} {loader / seconds:13.1%}")
    total = sum(s for s, _, _ in alone.values())
    solo_bytes = sum(b for _, b, _ in alone.values())
    print(f"{'4 solos together':22s} {total:8.2f} {solo_bytes / 1e6:9.1f} "
          f"{sum(x for _, _, x in alone.values()):9.2f} {sum(x for _, _, x in alone.values()) / total:13.1%}")
    print(f"{'sweep of 4':22s} {sweep_seconds:8.2f} {sweep_bytes / 1e6:9.1f} {sweep_loader:9.2f} "
          f"{sweep_loader / sweep_seconds:13.1%}")
    print(f"\nbytes read: sweep {sweep_bytes / one_bytes:.3f}x one solo run (the median; goal <= 1.05x), 4 solos "
          f"{solo_bytes / one_bytes:.2f}x")
    print(f"wall time: sweep {sweep_seconds / total:.3f}x the sum of the 4 solo runs (goal <= 1)")
    samples_per_s = args.steps * args.batch_size / sweep_loader
    bytes_per_view = sweep_bytes / (args.steps * args.batch_size)
    print(f"loader: {samples_per_s:.0f} samples/s in one process here, {bytes_per_view / 1e3:.1f} kB read per view")
    for k in (1, 2, 4, 8):
        low, high = (rate / k for rate in VIT_B_RATES)
        print(f"GPU estimate: a sweep of {k} ViT-B students consumes {low:,.0f}-{high:,.0f} samples/s per H100 "
              f"(each sample stepped by {k}); at {VIT_B_LOADER:,} samples/s per loader process (ViT-B store "
              f"shapes) that is {math.ceil(low / VIT_B_LOADER)}-{math.ceil(high / VIT_B_LOADER)} process(es) per GPU")


if __name__ == "__main__":
    main()

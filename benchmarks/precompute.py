"""Precompute throughput against the teachers' forward pass alone, and bytes per view.

Same teachers, batch size and device for both measurements:
  teachers-only   each teacher's plain forward on ready uint8 batches already on the device
  precompute      the full run (decode, views, forward + hooks, mask, gather, fp16, encode, write)
Then bytes per view, all files of the store included (shards, zarr arrays, commit records, manifest,
locks), for each --store mode, encoding and format.

    python benchmarks/precompute.py                          # ViT-B/16 MAE + CLIP, auto device
    python benchmarks/precompute.py --preset small --device cpu
    python benchmarks/precompute.py --device cuda --precision bf16 --images 2048 --batch-size 256 --workers 12

Teachers carry random weights (no download); speed and sizes do not depend on the weights, except the sizes of
zstd-compressed targets (--compress zstd), which depend on their values: benchmarks/encodings.py measures zstd on
the real ViT-S/14's targets.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from hdistill.precompute.config import EXACT, PrecomputeConfig, Runtime
from hdistill.precompute.run import run_precompute
from hdistill.precompute.teachers import build_teachers
from hdistill.shards.format import store_bytes

SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "assets" / "imagenet-sample-100"
PRESETS = {
    "base": {},  # the roles' default models: ViT-B/16 MAE, ViT-B/16 CLIP
    "small": {"models": {"mae": "vit_small_patch16_224", "clip": "vit_small_patch16_224"}},
}


def sync(device: str):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


# (label, precompute options, formats)
COMPACT = {"encodings": ["int4"], "compress": "zstd", "pixels": "jpeg"}
ENCODINGS = [("fp16", {}, ["wds"]), ("fp16", {}, ["zarr"]), ("int8 rel", {"encodings": ["rel=int8"]}, ["wds"]),
             ("int8", {"encodings": ["int8"]}, ["wds"]), ("int8", {"encodings": ["int8"]}, ["zarr"]),
             ("bf16", {"encodings": ["bf16"]}, ["zarr"]), ("int4", {"encodings": ["int4"]}, ["wds"]),
             ("int4 jpeg", {"encodings": ["int4"], "pixels": "jpeg"}, ["wds"]), ("compact", COMPACT, ["wds"])]


@torch.inference_mode()
def teachers_only(teachers, cfg, device, images: int) -> float:
    g = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (cfg.batch_size, cfg.image_size, cfg.image_size, 3), dtype=torch.uint8,
                           generator=g).to(device)
    autocast = torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16")

    def step():
        with autocast:
            for teacher in teachers.values():
                teacher.tokens(teacher.preprocess(pixels))

    step()  # warm-up
    sync(device)
    steps = max(1, images // cfg.batch_size)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    return steps * cfg.batch_size / (time.perf_counter() - start)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=PRESETS, default="base")
    ap.add_argument("--teachers", default="mae,clip")
    ap.add_argument("--data", default=str(SAMPLE) if SAMPLE.is_dir() else None,
                    help="images to precompute (default: the 100 real ImageNet JPEGs of ../shared/assets when "
                         "present, else generated images)")
    ap.add_argument("--images", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--workers", type=int, default=None,
                    help="decoding processes (default: 0 on the CPU, where a worker competes with the teachers "
                         "for the same cores; 8 on CUDA)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved measurements; medians are reported")
    ap.add_argument("--size-images", type=int, default=16, help="images for the bytes-per-view table")
    ap.add_argument("--bytes-only", action="store_true", help="only the bytes-per-view table")
    args = ap.parse_args()
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if args.workers is None:
        args.workers = 8 if device.startswith("cuda") else 0

    cfg = PrecomputeConfig(data=args.data or f"synthetic:{args.images}", limit=args.images, teachers=args.teachers.split(","), random_init=True,
                           image_size=args.image_size, batch_size=args.batch_size, shard_size=args.batch_size * 4,
                           precision=args.precision, **PRESETS[args.preset])
    teachers = build_teachers(cfg, device)
    rt = Runtime(device=device, workers=args.workers, quiet=True)
    name = torch.cuda.get_device_name() if device.startswith("cuda") else f"{platform.processor() or 'cpu'}, " \
        f"{torch.get_num_threads()} threads"
    print(f"device: {device} ({name}); torch {torch.__version__}; teachers {cfg.teachers} preset {args.preset}; "
          f"batch {cfg.batch_size}; {cfg.image_size}px; precision {cfg.precision}; workers {args.workers}; "
          f"data {cfg.data} (first {args.images})")

    if not args.bytes_only:
        speed(cfg, teachers, rt, device, args)
    bytes_per_view(cfg, teachers, rt, args)


def speed(cfg, teachers, rt, device, args):
    forward, full_run = [], []
    with tempfile.TemporaryDirectory() as tmp:
        warm = PrecomputeConfig(**{**cfg.__dict__, "limit": cfg.batch_size})
        run_precompute(warm, f"{tmp}/warmup", rt, teachers)
        for r in range(args.repeats):  # interleaved, so drifts of a shared machine hit both alike
            forward.append(teachers_only(teachers, cfg, device, args.images))
            sync(device)
            start = time.perf_counter()
            manifest = run_precompute(cfg, f"{tmp}/store{r}", rt, teachers)
            sync(device)
            full_run.append(manifest.samples / (time.perf_counter() - start))
    fwd, pre = statistics.median(forward), statistics.median(full_run)
    runs = lambda xs: ", ".join(f"{x:.2f}" for x in xs)  # noqa: E731
    print(f"teachers-only forward : {fwd:8.2f} images/s  (median of {runs(forward)})")
    print(f"precompute end to end : {pre:8.2f} images/s  (median of {runs(full_run)})")
    print(f"precompute / teachers-only: {100 * pre / fwd:.0f}%")


def bytes_per_view(cfg, teachers, rt, args):
    print(f"\nbytes per view, all files of the store ({args.size_images} images, {cfg.image_size}px, default targets):")
    print(f"{'store':6s} {'encoding':9s} {'format':6s} {'bytes/view':>12s}")
    for mode in ("kept", "full"):
        for label, options, formats in ENCODINGS:
            with tempfile.TemporaryDirectory() as tmp:
                sized = PrecomputeConfig(**{**cfg.__dict__, "limit": args.size_images, "tokens": mode,
                                            "shard_size": args.size_images, "formats": formats, **EXACT,
                                            **options})
                m = run_precompute(sized, tmp, rt, teachers)
                print(f"{mode:6s} {label:9s} {formats[0]:6s} {store_bytes(tmp) / m.samples / 1000:10.1f} kB")


if __name__ == "__main__":
    main()

"""The mask rules on a real teacher: how far their kept sets lie apart, and what --mask-forward drop costs.

The real ViT-S/14 of ../shared/assets is the mask teacher over view 0 of each of the real ImageNet images
(224 px, 16 x 16 patches, blocks 0, 4, 8, K = 0.3: 256 -> 180 -> 126 -> 89 kept). For every pair of rules
(--mask-mean normalized|raw x --mask-forward full|drop, and --mask-strategy direct) it prints the mean
Jaccard index of the final kept sets over the views. Then it times the teacher's part of precompute for
the paper's MIM targets (Q K^T at blocks 9 and 10) with each forward, side by side in one process.

    python benchmarks/mask_rules.py
    python benchmarks/mask_rules.py --device cuda --precision bf16
"""
from __future__ import annotations

import argparse
import time
from itertools import combinations
from pathlib import Path

import numpy as np
import torch

from hdistill.common.targets import parse_targets
from hdistill.precompute.targets import compute_targets, plan_mask, plan_targets

ASSETS = Path(__file__).resolve().parents[2] / "shared" / "assets"
WEIGHTS = ASSETS / "vit_small_patch14_dinov2.imgfocus_fp16.safetensors"
IMAGES = ASSETS / "imagenet-sample-100"
RULES = {   # label -> plan_mask options
    "normalized/full": dict(mean="normalized", forward="full"),
    "raw/full": dict(mean="raw", forward="full"),
    "normalized/drop": dict(mean="normalized", forward="drop"),
    "raw/drop": dict(mean="raw", forward="drop"),
    "direct normalized": dict(mean="normalized", strategy="direct"),
    "direct raw": dict(mean="raw", strategy="direct"),
}


def load_views(limit: int, device: str) -> torch.Tensor:
    from PIL import Image

    from hdistill.precompute.view import make_view
    files = sorted(IMAGES.glob("*.JPEG"))[:limit]
    return torch.stack([torch.from_numpy(make_view(Image.open(f).convert("RGB"), f.stem, 0, 0, 224)[0])
                        for f in files]).to(device)


def real_teacher_and_views(images: int, device: str):
    """The real ViT-S/14 as the mae teacher, and view 0 of the first `images` real ImageNet images."""
    from hdistill.precompute.teachers import WeightSource, build_teacher
    if not WEIGHTS.exists():
        raise SystemExit(f"needs the real ViT-S/14 at {WEIGHTS}")
    teacher = build_teacher("mae", WeightSource("file", path=str(WEIGHTS)), 224, "vit_small_patch14_dinov2")
    return teacher.to(device), load_views(images, device)


def kept_sets(teacher, pixels, mask, precision, batch) -> list[set[int]]:
    out = []
    for i in range(0, len(pixels), batch):
        m = compute_targets({"mae": teacher}, pixels[i:i + batch], [], mask, precision).mask
        out += [set(row.tolist()) for row in m.keep_idx.cpu()]
    return out


def jaccard(a: list[set[int]], b: list[set[int]]) -> float:
    return float(np.mean([len(x & y) / len(x | y) for x, y in zip(a, b)]))


def time_targets(teacher, pixels, specs, mask, precision, repeats) -> float:
    """Median seconds per view of compute_targets over the batch."""
    compute_targets({"mae": teacher}, pixels, specs, mask, precision)      # warm-up
    times = []
    for _ in range(repeats):
        if pixels.is_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        compute_targets({"mae": teacher}, pixels, specs, mask, precision)
        if pixels.is_cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return float(np.median(times)) / len(pixels)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=100)
    ap.add_argument("--ratio", type=float, default=0.3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--batch", type=int, default=25, help="views per teacher forward")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    teacher, pixels = real_teacher_and_views(args.images, args.device)
    masks = {label: plan_mask({"mae": teacher}, args.ratio, **options) for label, options in RULES.items()}
    counts = masks["normalized/full"].kept_counts(teacher.info.grid.num_patches)
    print(f"mask rules: real ViT-S/14, {len(pixels)} ImageNet views, K={args.ratio}, blocks "
          f"{list(masks['normalized/full'].blocks)}, kept {' -> '.join(map(str, counts))}; direct ranks at block "
          f"{masks['direct normalized'].blocks[0]} and keeps {masks['direct normalized'].kept_counts(counts[0])[-1]}")
    sets = {label: kept_sets(teacher, pixels, mask, args.precision, args.batch) for label, mask in masks.items()}
    print("\nmean Jaccard index of the final kept sets")
    for a, b in combinations(RULES, 2):
        print(f"  {a:18s} vs {b:18s} {jaccard(sets[a], sets[b]):.3f}")

    specs = plan_targets({"mae": teacher}, parse_targets(["mae:rel@9,10"]), teacher.info.grid.num_patches)
    batch = pixels[:args.batch]
    full = time_targets(teacher, batch, specs, masks["normalized/full"], args.precision, args.repeats)
    drop = time_targets(teacher, batch, specs, masks["normalized/drop"], args.precision, args.repeats)
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU, {torch.get_num_threads()} threads"
    print(f"\nteacher time for mae:rel@9,10 + mask, batch {len(batch)}, {args.precision}, {name}")
    print(f"  --mask-forward full  {1e3 * full:7.2f} ms/view  {1 / full:8.1f} views/s")
    print(f"  --mask-forward drop  {1e3 * drop:7.2f} ms/view  {1 / drop:8.1f} views/s  ({drop / full:.2f}x full)")


if __name__ == "__main__":
    main()

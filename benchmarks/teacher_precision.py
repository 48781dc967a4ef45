"""What --precision bf16 does to the targets: the real ViT-S/14 of ../shared/assets under bf16 autocast
against the same teacher in float32, on view 0 of the real ImageNet images, over all tokens.

For every kind of target it prints the mean absolute error relative to the mean magnitude (the measure
of docs/FORMAT.md's encoding table), the max error relative to the max magnitude, the same figures for
storing the float32 targets as fp16, and how far the two precisions' final kept sets lie apart.

    python benchmarks/teacher_precision.py
    python benchmarks/teacher_precision.py --device cuda
"""
from __future__ import annotations

import argparse

import torch

from hdistill.common.targets import parse_targets
from hdistill.precompute.targets import compute_targets, plan_mask, plan_targets

from mask_rules import jaccard, real_teacher_and_views

TARGETS = ["mae:feat", "mae:feat@8", "mae:rel@9,10", "mae:msa@9"]


def relative(got: torch.Tensor, want: torch.Tensor) -> tuple[float, float]:
    err = (got.double() - want.double()).abs()
    return (err.mean() / want.double().abs().mean()).item(), (err.max() / want.double().abs().max()).item()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=100)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=25)
    args = ap.parse_args()
    teacher, pixels = real_teacher_and_views(args.images, args.device)
    specs = plan_targets({"mae": teacher}, parse_targets(TARGETS), teacher.info.grid.num_patches)
    mask = plan_mask({"mae": teacher})
    runs = {p: [compute_targets({"mae": teacher}, pixels[i:i + args.batch], specs, mask, p)
                for i in range(0, len(pixels), args.batch)] for p in ("fp32", "bf16")}
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    print(f"teacher precision: real ViT-S/14, {len(pixels)} ImageNet views, all 257 tokens, on {name}; "
          "errors against the float32 teacher")
    print(f"{'target':12s} {'bf16 mean/mean|x|':>18s} {'bf16 max/max|x|':>16s} {'fp16 mean/mean|x|':>18s} "
          f"{'fp16 max/max|x|':>16s}")
    for spec in specs:
        want = torch.cat([v.values[spec.name] for v in runs["fp32"]]).cpu()
        got = torch.cat([v.values[spec.name] for v in runs["bf16"]]).cpu()
        bf16, fp16 = relative(got, want), relative(want.half().float(), want)
        print(f"{spec.tap:12s} {bf16[0]:18.2e} {bf16[1]:16.2e} {fp16[0]:18.2e} {fp16[1]:16.2e}")
    kept = {p: [set(row.tolist()) for v in runs[p] for row in v.mask.keep_idx.cpu()] for p in runs}
    differ = sum(a != b for a, b in zip(kept["fp32"], kept["bf16"]))
    print(f"final kept sets that differ between fp32 and bf16: {differ} of {len(pixels)} views, mean Jaccard "
          f"{jaccard(kept['fp32'], kept['bf16']):.3f}")


if __name__ == "__main__":
    main()

"""Masked feature reconstruction (dBOT; the paper's Fig. 3(b)) against direct feature distillation (FD), both from
one `--tokens full` store of the real ViT-S/14, over paired seeds: do their held-out losses fall?

The real ViT-S/14 of ../shared/assets is the feature teacher (its final features at every token, fp16, raw pixels,
4 views per image) of the first --train-images of the 100 real ImageNet images; the rest make a held-out store
(--crop center). Each seed trains two students from that store, the same seed (initialisation and data order) for
both:

    direct         --mask none --loss mae:feat=1 (the student's final tokens against the teacher's, every token)
    reconstructed  --mask none --loss mae:feat=1 --decoder-depth D --reconstruct 0.75 (the encoder sees 25% of
                   the patches, the decoder's output is compared at the masked 75%)

The two held-out losses measure different tasks (all tokens from the whole image; masked tokens from a quarter of
it), so the script compares each with its own start: the held-out loss at step 0 and at the end, and the mean and
standard deviation over seeds of its relative fall; then the paired differences of the two falls, seed by seed.

    python benchmarks/reconstruction.py             # 112 px, 200 steps, 3 seeds: about 10 minutes on 2 cores
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from hdistill.precompute.config import EXACT, PrecomputeConfig, Runtime
from hdistill.precompute.run import run_precompute
from hdistill.train.config import TrainConfig, TrainRuntime
from hdistill.train.run import run_train

ASSETS = Path(__file__).resolve().parents[2] / "shared" / "assets"
WEIGHTS = ASSETS / "vit_small_patch14_dinov2.imgfocus_fp16.safetensors"
IMAGES = ASSETS / "imagenet-sample-100"
TEACHER = "vit_small_patch14_dinov2"
STUDENT = ("vit_small_patch14_dinov2", {"depth": 4, "embed_dim": 192, "num_heads": 3})


def make_store(args, out: Path, files: list[Path], **options):
    listing = out.with_suffix(".txt")
    listing.write_text("".join(f"{f}\n" for f in files))
    cfg = PrecomputeConfig(data=str(listing), teachers=["mae"], models={"mae": TEACHER}, weights={"mae": str(WEIGHTS)},
                           targets=["mae:feat"], tokens="full", image_size=args.image_size, batch_size=16,
                           shard_size=20, **{**EXACT, **options})
    run_precompute(cfg, str(out), Runtime(device=args.device, workers=0, quiet=True))


def held_out(args, store: Path, val: Path, out: Path, seed: int, student=STUDENT, **objective) -> tuple[float, float]:
    """The held-out loss of a student trained `args.steps` from `store` (--mask none, `objective`'s options; the
    final features by default) at step 0 and at the end."""
    objective = {"losses": ["mae:feat=1"], **objective}
    cfg = TrainConfig(shards=str(store), student=student[0], student_args=student[1], steps=args.steps,
                      batch_size=args.batch_size, lr=args.lr, mask="none", drop_path=0.0, val_shards=str(val),
                      val_every=args.steps, seed=seed, **objective)
    run_train(cfg, str(out), TrainRuntime(device=args.device, log_every=args.steps, quiet=True, workers=0))
    vals = [r["val/loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "val/loss" in r]
    return vals[0], vals[-1]


def training_options(doc: str) -> argparse.ArgumentParser:
    """The options of a small paired-seed training run on the real images (this script's and g2sd.py's)."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--image-size", type=int, default=112)
    ap.add_argument("--train-images", type=int, default=80)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seeds", default="0,1,2")
    return ap


def main():
    ap = training_options(__doc__)
    ap.add_argument("--decoder-depth", type=int, default=2)
    args = ap.parse_args()
    if not WEIGHTS.exists():
        raise SystemExit(f"{ASSETS} is absent: this benchmark needs the real ViT-S/14 and images")
    configs = {"direct": {},
               "reconstructed": dict(decoder_depth=args.decoder_depth, decoder_width=128, decoder_heads=4,
                                     reconstruct=0.75)}
    seeds = [int(s) for s in args.seeds.split(",")]
    files = sorted(IMAGES.glob("*.JPEG"))
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_store(args, tmp / "train", files[:args.train_images], views=4)
        make_store(args, tmp / "val", files[args.train_images:], crop="center")
        results = {name: [held_out(args, tmp / "train", tmp / "val", tmp / f"{name}-{seed}", seed, **objective)
                          for seed in seeds] for name, objective in configs.items()}
    print(f"device {args.device}; student {STUDENT[0]} {STUDENT[1]}; {args.image_size} px, {args.steps} steps of "
          f"batch {args.batch_size}, lr {args.lr}; store: ViT-S/14 final features at every token, 4 views of "
          f"{args.train_images} images; held out: {len(files) - args.train_images} images; seeds {seeds}; "
          f"{time.perf_counter() - start:.0f} s")
    print(f"{'':15s} {'held-out at step 0':>20s} {'at the end':>16s} {'fall, % (mean +- sd over seeds)':>34s}   "
          "per seed")
    falls = {}
    for name, pairs in results.items():
        first, last = np.array(pairs).T
        falls[name] = fall = 100 * (first - last) / first
        print(f"{name:15s} {first.mean():20.4f} {last.mean():16.4f} {fall.mean():24.1f} +- {fall.std(ddof=1):.1f}   "
              + " ".join(f"{f:.1f}" for f in fall))
    paired = falls["direct"] - falls["reconstructed"]              # the same seed in both: paired differences
    print(f"paired difference of the falls, direct - reconstructed, in points: {paired.mean():.1f} +- "
          f"{paired.std(ddof=1):.1f} (per seed: {' '.join(f'{d:.1f}' for d in paired)})")


if __name__ == "__main__":
    main()

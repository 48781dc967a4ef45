"""What offline distillation costs: held-out loss of students trained from fixed stored views against
students whose teachers see a fresh view of every image every epoch (the paper's regime).

The real ViT-S/14 of ../shared/assets is the MIM teacher (mask, Q K^T at blocks 9 and 10) and also
gives the final features (one teacher, so each fresh-view step runs one teacher forward). The first
--train-images of the 100 real ImageNet images train, the rest make a held-out store (--crop center,
fp16). Every student has the same architecture, seed and steps; the figure is the final validation
loss (and its terms) on the held-out store:

    fresh     --online --fresh-views: a new RandomResizedCrop + flip of every image every epoch
    V=1,2,4   offline from stores of 1, 2 and 4 fixed views per image (fp16)
    int8,bf16 offline from 4-view stores with the compact encodings

    python benchmarks/fidelity.py                      # 112 px views, 300 steps: a few minutes on 2 CPU cores
    python benchmarks/fidelity.py --image-size 224 --steps 2000 --device cuda
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from hdistill.online import live_targets
from hdistill.precompute.config import PrecomputeConfig, Runtime
from hdistill.precompute.run import run_precompute
from hdistill.train.config import OnlineConfig, TrainConfig, TrainRuntime
from hdistill.train.run import run_train

ASSETS = Path(__file__).resolve().parents[2] / "shared" / "assets"
WEIGHTS = ASSETS / "vit_small_patch14_dinov2.imgfocus_fp16.safetensors"
IMAGES = ASSETS / "imagenet-sample-100"
TEACHER = "vit_small_patch14_dinov2"
STUDENT = ("vit_small_patch14_dinov2", {"depth": 4, "embed_dim": 192, "num_heads": 3})
TARGETS = ["mae:feat", "mae:rel@9,10"]
LOSSES = ["mae:feat=1", "mae:rel@9,10=0.5"]


def image_list(folder: Path, files: list[Path]) -> str:
    listing = folder / "images.txt"
    listing.write_text("".join(f"{f}\n" for f in files))
    return str(listing)


def make_store(args, device, out: Path, data: str, **options) -> float:
    cfg = PrecomputeConfig(data=data, teachers=["mae"], models={"mae": TEACHER}, weights={"mae": str(WEIGHTS)},
                           targets=TARGETS, image_size=args.image_size, batch_size=16, shard_size=20,
                           precision=args.precision, **options)
    start = time.perf_counter()
    run_precompute(cfg, str(out), Runtime(device=device, workers=0, quiet=True))
    return time.perf_counter() - start


def train(args, device, store: Path, val: Path, out: Path, fresh: bool = False, reader: str | None = None) -> dict:
    cfg = TrainConfig(shards=str(store), student=STUDENT[0], student_args=STUDENT[1], steps=args.steps,
                      batch_size=args.batch_size, lr=args.lr, losses=LOSSES, drop_path=0.0,
                      val_shards=str(val), val_every=args.steps)
    start = time.perf_counter()
    source = {"source": live_targets(OnlineConfig(online=True, fresh_views=True))} if fresh else {}
    run_train(cfg, str(out), TrainRuntime(device=device, log_every=args.steps, quiet=True, workers=0, format=reader),
              **source)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_loss = next(r for r in records if "loss" in r and r["step"] == args.steps)["loss"]
    val = next(r for r in records if "val/loss" in r)
    return {"train": train_loss, "val": val["val/loss"], "val_feat": val["val/loss/feat.mae"],
            "val_rel": (val["val/loss/rel.mae.b9"] + val["val/loss/rel.mae.b10"]) / 2,
            "seconds": time.perf_counter() - start}


def run_arguments(doc: str) -> argparse.ArgumentParser:
    """The options of a run on the real assets (this benchmark's and benchmarks/small_batch.py's)."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="teachers' forward precision")
    ap.add_argument("--image-size", type=int, default=112)
    ap.add_argument("--train-images", type=int, default=80)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=16)
    return ap


def main():
    ap = run_arguments(__doc__)
    ap.add_argument("--lr", type=float, default=1e-3)
    args = ap.parse_args()
    if not WEIGHTS.exists():
        raise SystemExit(f"{WEIGHTS} is missing: this benchmark needs ../shared/assets")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    files = sorted(IMAGES.glob("*.JPEG"))
    epochs = args.steps * args.batch_size / args.train_images
    print(f"device {device}; torch {torch.__version__}; teacher {TEACHER} ({WEIGHTS.name}) at {args.image_size} px; "
          f"student {STUDENT[0]} {STUDENT[1]}; {args.steps} steps of {args.batch_size} = {epochs:.0f} epochs over "
          f"{args.train_images} images; held-out: {len(files) - args.train_images} images; loss {' + '.join(LOSSES)}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        train_data = image_list(tmp, files[:args.train_images])
        (tmp / "val-list").mkdir()
        make_store(args, device, tmp / "val", image_list(tmp / "val-list", files[args.train_images:]), crop="center")
        runs = {}
        for views in (1, 2, 4):
            seconds = make_store(args, device, tmp / f"v{views}", train_data, views=views)
            runs[f"V={views} fp16"] = train(args, device, tmp / f"v{views}", tmp / "val", tmp / f"run-v{views}")
            runs[f"V={views} fp16"]["precompute_s"] = seconds
        for enc, fmt in (("int8", "wds"), ("bf16", "zarr")):
            seconds = make_store(args, device, tmp / f"v4-{enc}", train_data, views=4, encodings=[enc], formats=[fmt])
            runs[f"V=4 {enc}"] = train(args, device, tmp / f"v4-{enc}", tmp / "val", tmp / f"run-{enc}", reader=fmt)
            runs[f"V=4 {enc}"]["precompute_s"] = seconds
        runs["fresh views"] = train(args, device, tmp / "v1", tmp / "val", tmp / "run-fresh", fresh=True)
    print(f"\n{'run':14s} {'train loss':>10s} {'val loss':>9s} {'val feat':>9s} {'val rel':>9s} {'seconds':>8s}")
    for name, r in runs.items():
        seconds = r["seconds"] + r.get("precompute_s", 0.0)
        print(f"{name:14s} {r['train']:10.4f} {r['val']:9.4f} {r['val_feat']:9.4f} {r['val_rel']:9.4f} {seconds:8.1f}")


if __name__ == "__main__":
    main()

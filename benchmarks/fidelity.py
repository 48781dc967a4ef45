"""What offline distillation costs, measured over paired seeds: held-out loss of students trained from fixed stored
views, in each encoding, against students whose teachers see a fresh view of every image every epoch (the paper's
regime).

The real ViT-S/14 of ../shared/assets is the MIM teacher (mask, Q K^T at blocks 9 and 10) and also gives the final
features (one teacher, so each fresh-view step runs one teacher forward). The first --train-images of the 100 real
ImageNet images train, the rest make a held-out store (--crop center, fp16, raw pixels). Every configuration trains
one student per seed of --seeds; seed s sets the student's initialisation and the data order, the same s in every
configuration (paired seeds), and every store holds the same views (view v of an image is the same in all). The
figure is the final held-out loss. For each configuration the script prints its mean and standard deviation over the
seeds, and the mean and standard deviation over seeds of its paired difference (in %) to the reference stores
(fp16 at 4 views, the same views) and to fresh views:

    fresh        --online --fresh-views: a new RandomResizedCrop + flip of every image every epoch
    fp16 xV      a store of V fixed views per image, float16 targets, raw pixels
    int8 xV      int8 targets
    compact xV   int4 targets, zstd members, JPEG pixels at quality 90 (--encoding int4 --compress zstd --pixels jpeg)

The default table is the equal-disk one: about 800 kB per image at ViT-B/16 shapes (fp16 x2, int8 x3, compact x8)
and about 1.6 MB (fp16 x4, int8 x7, compact x16), with compact x4 beside fp16 x4 on the same views.

    python benchmarks/fidelity.py                      # 112 px views, 300 steps, 5 seeds: about 40 minutes on 2 cores
    python benchmarks/fidelity.py --image-size 224 --steps 2000 --device cuda
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from hdistill.online import live_targets
from hdistill.precompute.config import EXACT, PrecomputeConfig, Runtime
from hdistill.precompute.run import run_precompute
from hdistill.shards.format import store_bytes
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


ENCODINGS = {"fp16": {}, "int8": {"encodings": ["int8"]},
             "compact": {"encodings": ["int4"], "compress": "zstd", "pixels": "jpeg"}}
EQUAL_DISK = ["fresh", "fp16 x4", "compact x4", "fp16 x2", "int8 x3", "compact x8", "int8 x7", "compact x16"]


def make_store(args, device, out: Path, data: str, **options) -> float:
    cfg = PrecomputeConfig(data=data, teachers=["mae"], models={"mae": TEACHER}, weights={"mae": str(WEIGHTS)},
                           targets=TARGETS, image_size=args.image_size, batch_size=16, shard_size=20,
                           precision=args.precision, **{**EXACT, **options})
    start = time.perf_counter()
    run_precompute(cfg, str(out), Runtime(device=device, workers=0, quiet=True))
    return time.perf_counter() - start


def train(args, device, store: Path, val: Path, out: Path, fresh: bool = False, reader: str | None = None,
          seed: int = 0) -> dict:
    cfg = TrainConfig(shards=str(store), student=STUDENT[0], student_args=STUDENT[1], steps=args.steps,
                      batch_size=args.batch_size, lr=args.lr, losses=LOSSES, drop_path=0.0,
                      val_shards=str(val), val_every=args.steps, seed=seed)
    start = time.perf_counter()
    source = {"source": live_targets(OnlineConfig(online=True, fresh_views=True))} if fresh else {}
    run_train(cfg, str(out), TrainRuntime(device=device, log_every=args.steps, quiet=True, workers=0, format=reader),
              **source)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_loss = next(r for r in records if "loss" in r and r["step"] == args.steps)["loss"]
    val = [r for r in records if "val/loss" in r][-1]             # the last validation (step 0 is validated too)
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


def paired(values: dict[int, float], reference: dict[int, float]) -> tuple[float, float]:
    """Mean and standard deviation over seeds of the paired difference, in % of the reference."""
    d = np.array([100 * (values[s] / reference[s] - 1) for s in sorted(values)])
    return float(d.mean()), float(d.std(ddof=1)) if len(d) > 1 else 0.0


def main():
    ap = run_arguments(__doc__)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seeds", default="0,1,2,3,4", help="paired seeds (init and data order), comma-separated")
    ap.add_argument("--configs", default=",".join(EQUAL_DISK), help="fresh and ENCODING xVIEWS, comma-separated")
    args = ap.parse_args()
    if not WEIGHTS.exists():
        raise SystemExit(f"{WEIGHTS} is missing: this benchmark needs ../shared/assets")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    seeds = [int(s) for s in args.seeds.split(",")]
    configs = args.configs.split(",")
    files = sorted(IMAGES.glob("*.JPEG"))
    epochs = args.steps * args.batch_size / args.train_images
    print(f"device {device}; torch {torch.__version__}; teacher {TEACHER} ({WEIGHTS.name}) at {args.image_size} px; "
          f"student {STUDENT[0]} {STUDENT[1]}; {args.steps} steps of {args.batch_size} = {epochs:.0f} epochs over "
          f"{args.train_images} images; held-out: {len(files) - args.train_images} images; loss {' + '.join(LOSSES)}; "
          f"seeds {seeds}", flush=True)
    losses: dict[str, dict[int, float]] = {}
    per_view: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        train_data = image_list(tmp, files[:args.train_images])
        (tmp / "val-list").mkdir()
        make_store(args, device, tmp / "val", image_list(tmp / "val-list", files[args.train_images:]), crop="center")
        for name in configs:
            if name == "fresh":
                store = tmp / "fp16 x1"
                if not store.exists():
                    make_store(args, device, store, train_data, views=1)
            else:
                encoding, views = name.split(" x")
                store = tmp / name
                make_store(args, device, store, train_data, views=int(views), **ENCODINGS[encoding])
                per_view[name] = store_bytes(store) / (int(views) * args.train_images)
            losses[name] = {}
            for seed in seeds:
                r = train(args, device, store, tmp / "val", tmp / f"run-{name}-{seed}", fresh=name == "fresh",
                          seed=seed)
                losses[name][seed] = r["val"]
                print(f"{name:12s} seed {seed}: held-out loss {r['val']:.4f} ({r['seconds']:.0f} s)", flush=True)
    reference = "fp16 x4" if "fp16 x4" in losses else None
    print(f"\n{'run':12s} {'kB/view':>8s} {'held-out loss':>17s} {'vs fp16 x4 (paired)':>20s} "
          f"{'vs fresh (paired)':>18s}")
    for name, values in losses.items():
        v = np.array(list(values.values()))
        to_ref = "%+.2f%% +- %.2f" % paired(values, losses[reference]) if reference and name != reference else ""
        to_fresh = "%+.2f%% +- %.2f" % paired(values, losses["fresh"]) if "fresh" in losses and name != "fresh" else ""
        size = f"{per_view[name] / 1e3:8.1f}" if name in per_view else f"{'':8s}"
        print(f"{name:12s} {size} {v.mean():9.4f} +- {v.std(ddof=1) if len(v) > 1 else 0:5.3f} {to_ref:>20s} "
              f"{to_fresh:>18s}")


if __name__ == "__main__":
    main()

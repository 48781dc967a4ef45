"""The learning rate at small batches: held-out loss of the default objective with the paper's linear scaling
against explicit learning rates, on the real ViT-S/14 of ../shared/assets.

The paper's recipe is lr 6e-4 at batch 1024, scaled linearly: at batch 16 that is 9.4e-6, which barely moves a
randomly initialised student in a few hundred steps, while its raw Q K^T terms (tens, against tenths for the
features) dominate the loss. This trains the same student with the default objective (Eq. 1: feat at 1 plus
rel@9,10 at --alpha 1, their mean) at several learning rates and prints the held-out loss every --val-every steps.
The stores are those of benchmarks/fidelity.py (80 training images, 20 held out, 112 px views).

    python benchmarks/small_batch.py                   # 112 px views, 300 steps of 16: a few minutes on 2 CPU cores
"""
from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import torch

from fidelity import IMAGES, STUDENT, WEIGHTS, image_list, make_store, run_arguments
from hdistill.train.config import TrainConfig, TrainRuntime
from hdistill.train.run import run_train


def train(args, device, store: Path, val: Path, out: Path, lr: float) -> tuple[list[dict], float]:
    cfg = TrainConfig(shards=str(store), student=STUDENT[0], student_args=STUDENT[1], steps=args.steps,
                      batch_size=args.batch_size, lr=lr, drop_path=0.0, val_shards=str(val),
                      val_every=args.val_every)
    start = time.perf_counter()
    run_train(cfg, str(out), TrainRuntime(device=device, log_every=args.val_every, quiet=True, workers=0))
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "val/loss" in r], time.perf_counter() - start


def main():
    ap = run_arguments(__doc__)
    ap.add_argument("--val-every", type=int, default=50)
    ap.add_argument("--lrs", default="linear,1e-4,3e-4,1e-3",
                    help="learning rates; 'linear' is the default 6e-4 x batch / 1024")
    args = ap.parse_args()
    if not WEIGHTS.exists():
        raise SystemExit(f"{WEIGHTS} is missing: this benchmark needs ../shared/assets")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    files = sorted(IMAGES.glob("*.JPEG"))
    linear = 6e-4 * args.batch_size / 1024
    lrs = [linear if v == "linear" else float(v) for v in args.lrs.split(",")]
    print(f"device {device}; torch {torch.__version__}; teacher {WEIGHTS.name} at {args.image_size} px (mask, "
          f"feat, rel@9,10); student {STUDENT[0]} {STUDENT[1]}; default objective (alpha 1); {args.steps} steps of "
          f"{args.batch_size}; held-out: {len(files) - args.train_images} images")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "val-list").mkdir()
        make_store(args, device, tmp / "val", image_list(tmp / "val-list", files[args.train_images:]), crop="center")
        make_store(args, device, tmp / "train", image_list(tmp, files[:args.train_images]), views=2)
        rows = {}
        for lr in lrs:
            rows[lr] = train(args, device, tmp / "train", tmp / "val", tmp / f"run-{lr:g}", lr)
    steps = [r["step"] for r in next(iter(rows.values()))[0]]
    print(f"\nheld-out loss (feat + mean rel) by step; the paper's linear scaling gives lr {linear:.3g} here")
    print(f"{'lr':>10s} " + " ".join(f"{s:>8d}" for s in steps) + f" {'feat':>8s} {'rel':>8s} {'seconds':>8s}")
    for lr, (records, seconds) in rows.items():
        last = records[-1]
        rel = (last["val/loss/rel.mae.b9"] + last["val/loss/rel.mae.b10"]) / 2
        print(f"{lr:10.3g} " + " ".join(f"{r['val/loss']:8.3f}" for r in records) +
              f" {last['val/loss/feat.mae']:8.4f} {rel:8.3f} {seconds:8.1f}")


if __name__ == "__main__":
    main()

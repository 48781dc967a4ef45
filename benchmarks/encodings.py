"""Lossy target encodings on a real teacher: their errors, and what they do to training.

Part 1 (errors): the real ViT-S/14 of ../shared/assets computes every kind of target on views of the
real ImageNet images (kept tokens, as a default store holds them); each encoding's decoded values are
compared with the float32 targets: max and mean absolute error, and both relative to the targets'
max and mean magnitude.

Part 2 (training): the same ViT-S/14 serves as the MIM teacher (mask + Q K^T at blocks 9, 10) and the
feature teacher; one store per encoding (fp16 and int8 as webdataset, bf16 as zarr) over the first
--train-images images, one held-out fp16 store over the rest. A small student trains the same steps,
same seed, from each store; the script prints the training loss curve of each, and the loss of each
final student on the held-out store (fp16 targets), the measure that says whether an encoding costs
quality.

    python benchmarks/encodings.py
    python benchmarks/encodings.py --steps 300 --device cuda --precision bf16
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import torch

from hdistill.common.targets import KINDS, TargetSpec, parse_targets
from hdistill.precompute.config import EXACT, PrecomputeConfig, Runtime
from hdistill.precompute.run import run_precompute
from hdistill.precompute.targets import compute_targets, plan_mask, plan_targets
from hdistill.shards.encoding import ENCODINGS, Int4
from hdistill.shards.format import npy_bytes, zstd_compress
from hdistill.train.data import AllSamples, StreamSpec
from hdistill.train.loader import Store
from hdistill.train.config import TrainConfig, TrainRuntime
from hdistill.train.member import Member
from hdistill.train.run import solo
from hdistill.train.validate import evaluate

ASSETS = Path(__file__).resolve().parents[2] / "shared" / "assets"
WEIGHTS = ASSETS / "vit_small_patch14_dinov2.imgfocus_fp16.safetensors"
IMAGES = ASSETS / "imagenet-sample-100"
TEACHER = "vit_small_patch14_dinov2"
STUDENT = ("vit_small_patch14_dinov2", {"depth": 4, "embed_dim": 192, "num_heads": 3})
TARGETS = ["dino:feat", "mae:rel@9,10", "mae:msa@9", "mae:feat@8"]


def bitround(values: np.ndarray) -> np.ndarray:
    """What the zarr BitRound filter stores for float16 values (keep bf16's mantissa bits)."""
    import numcodecs
    bitround = numcodecs.BitRound(keepbits=ENCODINGS["bf16"].keepbits)
    return bitround.decode(bitround.encode(values.astype(np.float16))).view(np.float16).reshape(values.shape)


def int4_blocks(width: int) -> dict[str, Int4]:
    """int4 with other block sizes than the registered one's, to show what the block size buys (the scales' bytes
    against the error): 16, 32, 64 values and a whole row."""
    out = {}
    for block in (16, 32, 64, width):
        enc = Int4()
        enc.block = block
        out["int4/row" if block == width else f"int4/{block}"] = enc
    return out


def zstd_bytes_per_value(arrays: dict[str, np.ndarray], spec: TargetSpec) -> float:
    """Bytes per value of a sample's arrays as --compress zstd stores them (each array's npy in a zstd frame)."""
    frames = [len(zstd_compress(npy_bytes(a[i]))) for a in arrays.values() for i in range(len(a))]
    return sum(frames) / (len(next(iter(arrays.values()))) * int(np.prod(spec.shape)))


def bytes_per_value(enc, spec: TargetSpec) -> float:
    arrays = enc.arrays(spec)
    total = sum(int(np.prod(shape)) * np.dtype(dtype).itemsize for shape, dtype in arrays.values())
    return total / int(np.prod(spec.shape))


def encoding_errors(args, device):
    from PIL import Image

    from hdistill.common.tokens import token_index
    from hdistill.precompute.teachers import WeightSource, build_teacher
    from hdistill.precompute.view import make_view

    teacher = build_teacher("mae", WeightSource("file", path=str(WEIGHTS)), 224, TEACHER).to(device)
    files = sorted(IMAGES.glob("*.JPEG"))[:args.error_images]
    pixels = torch.stack([torch.from_numpy(make_view(Image.open(f).convert("RGB"), f.stem, 0, 0, 224)[0])
                          for f in files]).to(device)
    mask = plan_mask({"mae": teacher})
    n = mask.kept_counts(teacher.info.grid.num_patches)[-1]
    specs = plan_targets({"mae": teacher}, parse_targets(["mae:feat", "mae:rel@9,10", "mae:msa@9", "mae:feat@8"]),
                         n)
    values = compute_targets({"mae": teacher}, pixels, specs, mask, args.precision)
    tokens = token_index(values.mask.keep_idx)
    print(f"\nencoding errors: real ViT-S/14 ({WEIGHTS.name}), {len(files)} ImageNet views, kept tokens "
          f"(1+{n}), against the float32 targets")
    print(f"{'target':12s} {'encoding':9s} {'bytes/value':>11s} {'zstd':>6s} {'max |err|':>10s} {'mean |err|':>11s} "
          f"{'max/max|x|':>11s} {'mean/mean|x|':>13s} {'rel. RMS':>9s}")
    for spec in specs:
        v = values.values[spec.name]
        x = KINDS[spec.kind].gather(v, tokens).float()
        ref = x.cpu().numpy()
        s = TargetSpec(spec.kind, spec.role, spec.block, spec.shape, "fp16")
        for name, enc in {**ENCODINGS, **int4_blocks(spec.shape[-1])}.items():
            arrays = {k: a.cpu().numpy() for k, a in enc.encode(s, x, who=str).items()}
            got = np.stack([enc.decode(s, {k: a[i] for k, a in arrays.items()}) for i in range(len(files))])
            if name == "bf16":
                got = bitround(got)
            err = np.abs(got.astype(np.float64) - ref)
            rms = np.sqrt((err ** 2).mean() / (ref.astype(np.float64) ** 2).mean())
            print(f"{spec.name:12s} {name:9s} {bytes_per_value(enc, s):11.3f} {zstd_bytes_per_value(arrays, s):6.3f} "
                  f"{err.max():10.3g} {err.mean():11.3g} "
                  f"{err.max() / np.abs(ref).max():11.2e} {err.mean() / np.abs(ref).mean():13.2e} {rms:9.2e}")


def make_store(args, device, out, encodings, formats, images: slice):
    cfg = PrecomputeConfig(data=str(IMAGES), teachers=["mae", "dino"], models={"mae": TEACHER, "dino": TEACHER},
                           weights={"mae": str(WEIGHTS), "dino": str(WEIGHTS)}, targets=TARGETS,
                           **{**EXACT, "encodings": encodings}, formats=formats, views=1, batch_size=16, shard_size=20,
                           limit=images.stop, precision=args.precision, seed=0)
    if images.start:
        list_file = Path(out).with_suffix(".txt")
        list_file.write_text("".join(f"{p}\n" for p in sorted(IMAGES.glob("*.JPEG"))[images]))
        cfg.data, cfg.limit = str(list_file), None
    return run_precompute(cfg, out, Runtime(device=device, workers=0, quiet=True))


def held_out_loss(member: Member, store: str) -> float:
    """Mean loss of the trained student and projection over every sample of the held-out store."""
    samples = AllSamples(Store(store).stream(StreamSpec(tuple(t.target for t in member.terms))), 16)
    return evaluate({"": member.evaluated()}, samples, 0, member.device, member.dist)[""]["val/loss"]


def training(args, device, tmp):
    train_images, all_images = slice(0, args.train_images), len(list(IMAGES.glob("*.JPEG")))
    stores = {"fp16": (["fp16"], ["wds"]), "int8": (["int8"], ["wds"]), "bf16": (["bf16"], ["zarr"])}
    val = make_store(args, device, f"{tmp}/val", [], ["wds"], slice(args.train_images, all_images))
    print(f"\ntraining: student {STUDENT[0]} {STUDENT[1]}, {args.steps} steps, batch {args.batch_size}, "
          f"{args.train_images} training images, {val.samples} held-out images (fp16 targets)")
    curves, held_out = {}, {}
    for name, (encodings, formats) in stores.items():
        make_store(args, device, f"{tmp}/{name}", encodings, formats, train_images)
        cfg = TrainConfig(shards=f"{tmp}/{name}", student=STUDENT[0], student_args=STUDENT[1], steps=args.steps,
                          batch_size=args.batch_size, lr=1e-3)
        loop = solo(cfg, f"{tmp}/run-{name}", TrainRuntime(device=device, log_every=10, quiet=True, workers=0,
                                                            format=formats[0], checkpoint_every=10 ** 9))
        loop.run()
        curves[name] = [json.loads(line) for line in Path(f"{tmp}/run-{name}/metrics.jsonl").read_text().splitlines()]
        held_out[name] = held_out_loss(loop.members["train"], f"{tmp}/val")
    print(f"{'step':>5s} " + " ".join(f"{n:>10s}" for n in curves))
    for i, record in enumerate(curves["fp16"]):
        print(f"{record['step']:5d} " + " ".join(f"{curves[n][i]['loss']:10.4f}" for n in curves))
    print("held-out loss " + " ".join(f"{n} {v:.4f}" for n, v in held_out.items()))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--error-images", type=int, default=32)
    ap.add_argument("--train-images", type=int, default=80)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--skip-training", action="store_true")
    args = ap.parse_args()
    if not WEIGHTS.exists():
        raise SystemExit(f"{WEIGHTS} is missing: this benchmark needs ../shared/assets")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    print(f"device {device}; torch {torch.__version__}; teachers' precision {args.precision}")
    encoding_errors(args, device)
    if not args.skip_training:
        with tempfile.TemporaryDirectory() as tmp:
            training(args, device, tmp)


if __name__ == "__main__":
    main()

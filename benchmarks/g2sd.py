"""G2SD's generic distillation from a store: does the held-out loss fall, and what does a view cost?

Part 1 (training, paired seeds): an MAE teacher with its decoder (`mae:vit_base_patch16_dec512d8b` at ViT-S/14
shapes) whose encoder is the real ViT-S/14 of ../shared/assets (its position embeddings resampled to the view size)
and whose decoder (4 blocks, 128 wide) has MAE's random init: no trained MAE checkpoint with a decoder is on this
machine. It computes its `dec@B` target (the decoder's hidden state after block B, every token, each view's own
75% teacher mask) on 4 views of the first --train-images of the 100 real ImageNet images; the rest make a held-out
store (--crop center). Each seed trains a small student with a light decoder on it (`--loss mae:dec@B=1`: its
encoder sees the teacher's 25% of the patches). The script prints the held-out loss at step 0 and at the end, the
mean and standard deviation over seeds of its relative fall, and, as the floor an image-blind student reaches, the
held-out loss of the training store's mean standardised target at each token (the part of the target that
positions and mask tokens alone give).

Part 2 (bytes per view): the real G2SD teacher's shapes (ViT-B/16 MAE, decoder 512 wide, 8 blocks; random weights)
at 224 px on --bytes-images real images, one store per encoding of the compact-store options: every entry's bytes
per view, measured on the written tar, and what 16 views of ImageNet-1k come to.

    python benchmarks/g2sd.py               # 112 px, 200 steps, 3 seeds; then the byte counts: a few minutes
"""
from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import webdataset as wds

from hdistill.precompute.config import EXACT, PrecomputeConfig, Runtime
from hdistill.precompute.run import run_precompute
from hdistill.shards.manifest import read_manifest
from hdistill.shards.size import store_view_bytes

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reconstruction import STUDENT, held_out, training_options  # noqa: E402

ASSETS = Path(__file__).resolve().parents[2] / "shared" / "assets"
IMAGES = ASSETS / "imagenet-sample-100"
MODEL = "mae:vit_base_patch16_dec512d8b"
WEIGHTS = ASSETS / "vit_small_patch14_dinov2.imgfocus_fp16.safetensors"
TEACHER = dict(patch_size=14, embed_dim=384, depth=12, num_heads=6, init_values=1.0, decoder_embed_dim=128,
               decoder_depth=4, decoder_num_heads=4)      # ViT-S/14 (LayerScale) with a light MAE decoder
ENCODINGS = {   # the compact-store options: the exact store, then fp16, int8 and int4 with JPEG pixels and zstd
    "fp16, raw pixels, no zstd": EXACT,
    "fp16, JPEG q90, zstd": dict(encodings=["fp16"], pixels="jpeg", compress="zstd"),
    "int8, JPEG q90, zstd": dict(encodings=["int8"], pixels="jpeg", compress="zstd"),
    "int4, JPEG q90, zstd (default)": dict(encodings=["int4"], pixels="jpeg", compress="zstd"),
}


def make_store(out: Path, files: list[Path], device: str, **options):
    listing = out.with_suffix(".txt")
    listing.write_text("".join(f"{f}\n" for f in files))
    cfg = PrecomputeConfig(data=str(listing), teachers=["mae"], models={"mae": MODEL}, tokens="full", mask_ratio=0.0,
                           batch_size=16, shard_size=20, **{"random_init": True, **options})
    run_precompute(cfg, str(out), Runtime(device=device, workers=0, quiet=True))


def real_encoder_checkpoint(out: Path, image_size: int) -> Path:
    """An official-layout {"model": ...} checkpoint: the real ViT-S/14 as the encoder (position embeddings resampled
    to `image_size`), a decoder of MAE's init (seeded)."""
    from safetensors.torch import load_file
    from timm.layers import resample_abs_pos_embed

    from hdistill.precompute.teachers import build_teacher
    from hdistill.precompute.weights import WeightSource
    mae = build_teacher("mae", WeightSource("random"), image_size, MODEL, dict(TEACHER)).mae
    state = {k.removeprefix("encoder."): v for k, v in mae.state_dict().items()}
    real = {k: v.float() for k, v in load_file(WEIGHTS).items()}
    grid = image_size // TEACHER["patch_size"]
    real["pos_embed"] = resample_abs_pos_embed(real["pos_embed"], [grid, grid], num_prefix_tokens=1)
    assert set(real) <= set(state), set(real) - set(state)
    torch.save({"model": {**state, **real}}, out)
    return out


def image_blind_loss(train: Path, val: Path, name: str) -> float:
    """The held-out loss (SmoothL1, beta 2, standardised targets) of predicting every view's target at each token by
    the training store's mean standardised target there."""
    def standardised(store):
        urls = sorted(str(p) for p in (store / "wds").glob("*.tar"))
        values = np.stack([s[f"{name}.npy"] for s in wds.WebDataset(urls, shardshuffle=False).decode()])
        return F.layer_norm(torch.from_numpy(values).float(), values.shape[-1:], eps=1e-6)    # [S, T, W]
    mean = standardised(train).mean(0, keepdim=True)
    held = standardised(val)
    return F.smooth_l1_loss(mean.expand_as(held), held, beta=2.0).item()


def training(args, files: list[Path], tmp: Path):
    seeds = [int(s) for s in args.seeds.split(",")]
    weights = real_encoder_checkpoint(tmp / "mae_vits14_full.pth", args.image_size)
    name = f"dec.mae.b{args.block}"
    common = dict(model_args={"mae": TEACHER}, weights={"mae": str(weights)}, random_init=False,
                  targets=[f"mae:dec@{args.block}"], image_size=args.image_size, **EXACT)
    start = time.perf_counter()
    make_store(tmp / "train", files[:args.train_images], args.device, views=4, **common)
    make_store(tmp / "val", files[args.train_images:], args.device, crop="center", **common)
    g2sd = dict(losses=[f"mae:dec@{args.block}=1"], decoder_depth=2, decoder_width=128, decoder_heads=4)
    pairs = np.array([held_out(args, tmp / "train", tmp / "val", tmp / f"run-{seed}", seed, **g2sd)
                      for seed in seeds])
    first, last = pairs.T
    fall = 100 * (first - last) / first
    blind = image_blind_loss(tmp / "train", tmp / "val", name)
    print(f"Part 1. device {args.device}; teacher {MODEL} {TEACHER}: the real ViT-S/14 encoder, a random MAE "
          f"decoder; target mae:dec@{args.block}, teacher mask 0.75; student {STUDENT[0]} {STUDENT[1]} + decoder 2 x "
          f"128; {args.image_size} px, {args.steps} steps of batch {args.batch_size}, lr {args.lr}; 4 views of "
          f"{args.train_images} images, held out: {len(files) - args.train_images} images; seeds {seeds}; "
          f"{time.perf_counter() - start:.0f} s")
    below = 100 * (blind - last) / blind          # each seed's student against the floor, which has no seed
    print(f"held-out loss at step 0 {first.mean():.4f}, at the end {last.mean():.4f} (per seed: "
          f"{' '.join(f'{v:.4f}' for v in last)}); fall {fall.mean():.1f}% +- {fall.std(ddof=1):.1f} (per seed: "
          f"{' '.join(f'{f:.1f}' for f in fall)}); image-blind floor (the training mean at each token): {blind:.4f}; "
          f"the students end {below.mean():.1f}% +- {below.std(ddof=1):.1f} below it (per seed: "
          f"{' '.join(f'{b:.1f}' for b in below)})")


def view_bytes(args, files: list[Path], tmp: Path):
    print(f"\nPart 2. {MODEL} at ViT-B shapes (random weights), target mae:dec@3 [197, 512], teacher mask 0.75 "
          f"(49 of 196 patches), --tokens full, 224 px, 1 view of {args.bytes_images} real images; bytes per view "
          "measured on the written tar (headers included)")
    for i, (name, options) in enumerate(ENCODINGS.items()):
        out = tmp / f"bytes-{i}"
        make_store(out, files[:args.bytes_images], args.device, targets=["mae:dec@3"], **options)
        per_view = store_view_bytes(out, read_manifest(out))
        total = sum(per_view.values())
        entries = ", ".join(f"{k} {v / 1e3:.1f}" for k, v in sorted(per_view.items(), key=lambda kv: -kv[1]))
        print(f"{name:32s} {total / 1e3:7.1f} kB per view; 16 views of ImageNet-1k {1_281_167 * 16 * total / 1e12:.2f} "
              f"TB  ({entries} kB)")


def main():
    ap = training_options(__doc__)
    ap.add_argument("--block", type=int, default=3, help="the teacher's decoder block (G2SD: 3, its 4th)")
    ap.add_argument("--bytes-images", type=int, default=20)
    args = ap.parse_args()
    if not WEIGHTS.exists():
        raise SystemExit(f"{ASSETS} is absent: this benchmark needs the real ViT-S/14 and images")
    files = sorted(IMAGES.glob("*.JPEG"))
    with tempfile.TemporaryDirectory() as tmp:
        training(args, files, Path(tmp))
        view_bytes(args, files, Path(tmp))


if __name__ == "__main__":
    main()

"""What a view's pixels cost the loader, per sample on one core, against their bytes: the three ways a store can
hold the student's input.

    raw      pixels.npy: the n stored patches as uint8 (a copy out of the loaded shard)
    jpeg     pixels.jpg: one 4:4:4 JPEG of the stored patches (--pixels jpeg), decoded and cut into patches: by
             Pillow (the reference) and by TorchCodec (the loader's decoder where its pixels are Pillow's; how many
             of the views it decodes to Pillow's pixels is printed)
    replay   no per-view pixels: the source JPEG once per image, decoded, cropped, resized and flipped again as the
             view's record says (precompute.view.render_view), then its stored patches taken; the bytes are the
             source file's shared by the store's views of that image

On the real ImageNet images of ../shared/assets at 224 px, patch 16, the 68 patches a kept store holds at K = 0.3
(a seeded choice here: the pixel cost does not depend on which). The rates are single-threaded, so they are per
loader process; a GPU at 11,000 samples/s needs 11,000 / rate cores for this part alone.

    python benchmarks/pixel_decode.py
    python benchmarks/pixel_decode.py --quality 95 --views 16
"""
from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from hdistill.common.tokens import patchify
from hdistill.precompute.image import decode_image
from hdistill.precompute.view import make_view, render_view
from hdistill.shards.pixels import decode_jpeg_torchcodec, decode_patches, encode_patches, round_trip

SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "assets" / "imagenet-sample-100"


def patches_of(view: np.ndarray, patch: int) -> np.ndarray:
    """uint8 [S, S, 3] -> [N, P, P, 3] in raster order."""
    return patchify(torch.from_numpy(view)[None], patch)[0].numpy()


def rate(fn, items, repeats: int) -> float:
    """Samples/s of fn over items, the best of `repeats` passes (a shared machine's speed drifts)."""
    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        for item in items:
            fn(item)
        best = max(best, len(items) / (time.perf_counter() - start))
    return best


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--patch", type=int, default=16)
    ap.add_argument("--kept", type=int, default=68)
    ap.add_argument("--quality", type=int, default=90)
    ap.add_argument("--views", type=int, default=16, help="views per image a replay store shares the source among")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    files = sorted(SAMPLE.glob("*.JPEG"))
    if not files:
        raise SystemExit(f"{SAMPLE} is missing: this benchmark needs ../shared/assets")
    P, S, n = args.patch, args.size, args.kept
    g = S // P
    rng = np.random.default_rng(0)
    samples = []
    for f in files:
        data = f.read_bytes()
        view, params = make_view(decode_image(data, f.name), f.stem, 0, 0, S)
        keep = np.sort(rng.choice(g * g, n, replace=False))
        seen = patches_of(round_trip(view, P, args.quality), P)[keep]
        jpeg = encode_patches(patches_of(view, P)[keep], g, args.quality)
        assert np.array_equal(decode_patches(jpeg, n, P, g), seen), f"{f.name}: the JPEG is not exact"
        raw = np.ascontiguousarray(patches_of(view, P)[keep])
        samples.append({"raw": raw, "jpeg": jpeg, "source": data, "params": params, "keep": keep})
    out = np.empty((n, P, P, 3), np.uint8)

    def replay(s):
        img = decode_image(s["source"], "source")
        return patches_of(render_view(img, s["params"]), P)[s["keep"]]

    for s in samples[:8]:                      # replaying a view's record gives its pixels, bit for bit
        assert np.array_equal(replay(s), s["raw"])
    rates = {"raw": rate(lambda s: np.copyto(out, s["raw"]), samples, args.repeats),
             "jpeg, Pillow": rate(lambda s: decode_patches(s["jpeg"], n, P, g), samples, args.repeats),
             "jpeg, TorchCodec": rate(lambda s: decode_patches(s["jpeg"], n, P, g, decode=decode_jpeg_torchcodec),
                                      samples, args.repeats),
             "replay": rate(replay, samples, args.repeats)}
    jpeg_bytes = np.mean([len(s["jpeg"]) for s in samples])
    sizes = {"raw": samples[0]["raw"].nbytes, "jpeg, Pillow": jpeg_bytes, "jpeg, TorchCodec": jpeg_bytes,
             "replay": np.mean([len(s["source"]) for s in samples]) / args.views}
    same = sum(np.array_equal(decode_patches(s["jpeg"], n, P, g, decode=decode_jpeg_torchcodec),
                              decode_patches(s["jpeg"], n, P, g)) for s in samples)
    source_px = np.mean([np.prod(Image.open(f).size) for f in files]) / 1e6
    print(f"machine: {platform.processor() or 'cpu'}, {os.cpu_count()} cpus; {len(files)} ImageNet images "
          f"(mean {source_px:.2f} MP, {np.mean([len(s['source']) for s in samples]) / 1e3:.1f} kB); {S} px views, "
          f"{n} of {g * g} patches of {P} px; JPEG quality {args.quality}, 4:4:4; replay shares a source among "
          f"{args.views} views")
    print(f"TorchCodec decodes {same} of {len(samples)} views to Pillow's pixels, bit for bit")
    print(f"{'pixels':17s} {'bytes/view':>11s} {'samples/s/core':>15s} {'cores at 11,000/s':>18s}")
    for name in rates:
        print(f"{name:17s} {sizes[name] / 1e3:9.1f} kB {rates[name]:15.0f} {11_000 / rates[name]:18.2f}")


if __name__ == "__main__":
    main()

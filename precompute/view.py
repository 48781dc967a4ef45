"""Deterministic views: RandomResizedCrop + horizontal flip (training), or a centre crop (validation).

crop "random": the crop box and flip of a view are drawn from a generator seeded by (seed, image
id, view index) only, so the same triple always gives the same box, flip and pixels, whatever
the batch, worker, rank or order the image is processed in. The sampling follows torchvision's
RandomResizedCrop.get_params (10 tries, then a centre crop).

crop "center": the centred square of side CENTER_CROP_PCT x the short side, no flip: timm's and
MAE's evaluation transform (resize the short side to S / 0.875, centre crop S) as one crop + resize.
"""
from __future__ import annotations

import hashlib
import math

import numpy as np
from PIL import Image

from hdistill.common.errors import HdistillError
from hdistill.common.tokens import random_masking
from hdistill.common.views import ViewParams

# MAE / dBOT pre-training augmentation (the paper builds on dBOT).
DEFAULT_SCALE = (0.2, 1.0)
DEFAULT_RATIO = (3 / 4, 4 / 3)
INTERPOLATIONS = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR}
CROPS = ("random", "center")
CENTER_CROP_PCT = 0.875


def view_rng(seed: int, image_id: str, view: int, *stream: int) -> np.random.Generator:
    """The generator of a view's crop and flip; with `stream` (words appended to the seed), another of the view's
    draws, independent of those."""
    digest = hashlib.sha256(image_id.encode("utf-8")).digest()
    id_words = np.frombuffer(digest[:16], dtype="<u4").tolist()
    return np.random.default_rng(np.random.SeedSequence([seed, *id_words, view, *stream]))


def teacher_visible(seed: int, image_id: str, view: int, num_patches: int, ratio: float) -> np.ndarray:
    """The patches an MAE teacher's encoder sees of a view for its dec targets (G2SD): MAE's random_masking on the
    view's own noise, drawn from (seed, image id, view) alone (shards.format.TEACHER_MASK_RULE); int16 [m], ascending.
    The student then sees the same patches."""
    return random_masking(view_rng(seed, image_id, view, 1).random(num_patches), ratio).astype(np.int16)


def sample_crop(height: int, width: int, rng: np.random.Generator,
                scale=DEFAULT_SCALE, ratio=DEFAULT_RATIO) -> tuple[int, int, int, int]:
    """(top, left, crop height, crop width) in source pixels."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w        # RandomResizedCrop's fallback: its floor division


def center_crop(height: int, width: int) -> tuple[int, int, int, int]:
    """(top, left, side, side): the centred square of CENTER_CROP_PCT x the short side, rounded as torchvision's
    CenterCrop rounds (RandomResizedCrop's fallback above floors instead: each follows its torchvision original,
    and the stored views depend on both)."""
    side = max(1, round(min(height, width) * CENTER_CROP_PCT))
    return int(round((height - side) / 2)), int(round((width - side) / 2)), side, side


def view_params(image_size: tuple[int, int], image_id: str, view: int, seed: int, size: int,
                scale=DEFAULT_SCALE, ratio=DEFAULT_RATIO, interpolation: str = "bicubic",
                crop: str = "random") -> ViewParams:
    """Crop box and flip of view `view` of the image `image_id`; image_size is (width, height)."""
    if interpolation not in INTERPOLATIONS:
        raise HdistillError(f"unknown interpolation {interpolation!r}; choose from {sorted(INTERPOLATIONS)}")
    if crop not in CROPS:
        raise HdistillError(f"--crop {crop!r}: choose one of {', '.join(CROPS)}")
    width, height = image_size
    if crop == "center":
        top, left, h, w = center_crop(height, width)
        return ViewParams(image_id=image_id, view=view, top=top, left=left, height=h, width=w,
                          flip=False, size=size, interpolation=interpolation)
    rng = view_rng(seed, image_id, view)
    top, left, h, w = sample_crop(height, width, rng, scale, ratio)
    flip = bool(rng.random() < 0.5)
    return ViewParams(image_id=image_id, view=view, top=top, left=left, height=h, width=w,
                      flip=flip, size=size, interpolation=interpolation)


def render_view(img: Image.Image, params: ViewParams) -> np.ndarray:
    """Crop, resize and flip as torchvision's RandomResizedCrop does on PIL -> uint8 [size, size, 3]."""
    box = (params.left, params.top, params.left + params.width, params.top + params.height)
    out = img.crop(box).resize((params.size, params.size), INTERPOLATIONS[params.interpolation])
    if params.flip:
        out = out.transpose(Image.FLIP_LEFT_RIGHT)
    return np.array(out, dtype=np.uint8)


def teacher_view(pixels: np.ndarray, patch: int, encoding: str, quality: int) -> np.ndarray:
    """The pixels the teacher runs on: the view as rendered, or, with --pixels jpeg, its patches' JPEG decoded
    (shards.pixels.round_trip), which is what the store gives the student."""
    if encoding != "jpeg":
        return pixels
    from hdistill.shards.pixels import round_trip
    return round_trip(pixels, patch, quality)


def make_view(img: Image.Image, image_id: str, view: int, seed: int, size: int,
              **kwargs) -> tuple[np.ndarray, ViewParams]:
    """The pixels of one view with the parameters that produced them."""
    params = view_params(img.size, image_id, view, seed, size, **kwargs)
    return render_view(img, params), params

"""Deterministic views and image decoding."""
import io
import math

import numpy as np
import pytest
from PIL import Image
import torchvision.transforms.functional as TF
from torchvision.transforms import InterpolationMode

from hdistill.common.errors import HdistillError
from hdistill.precompute.image import decode_image
from hdistill.precompute.view import make_view, view_params


def photo(width=320, height=240, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def test_same_seed_image_and_view_give_same_view():
    img = photo()
    a_pixels, a = make_view(img, "n01440764/img_1", view=2, seed=5, size=64)
    b_pixels, b = make_view(img.copy(), "n01440764/img_1", view=2, seed=5, size=64)
    assert a == b
    np.testing.assert_array_equal(a_pixels, b_pixels)
    others = {view_params(img.size, "n01440764/img_1", v, 5, 64) for v in range(8)}
    others |= {view_params(img.size, "n01440764/img_2", 2, 5, 64), view_params(img.size, "n01440764/img_1", 2, 6, 64)}
    assert len(others) == 10, "view index, image id and seed must each change the crop"


def test_view_pixels_equal_torchvision_resized_crop_and_flip():
    img = photo()
    flips = set()
    for v in range(12):
        pixels, p = make_view(img, "x", v, seed=0, size=48)
        expected = TF.resized_crop(img, p.top, p.left, p.height, p.width, [48, 48], InterpolationMode.BICUBIC)
        expected = np.asarray(TF.hflip(expected) if p.flip else expected)
        np.testing.assert_array_equal(pixels, expected)
        assert pixels.shape == (48, 48, 3) and pixels.dtype == np.uint8
        flips.add(p.flip)
    assert flips == {True, False}


def test_crop_parameters_follow_random_resized_crop():
    area = 320 * 240
    for v in range(200):
        p = view_params((320, 240), "y", v, seed=1, size=32)
        assert 0 <= p.top and p.top + p.height <= 240 and 0 <= p.left and p.left + p.width <= 320
        # the box was rounded to whole pixels, so scale and ratio hold up to that rounding
        assert 0.2 * 0.97 <= p.height * p.width / area <= 1.0
        assert math.log(3 / 4) - 0.05 <= math.log(p.width / p.height) <= math.log(4 / 3) + 0.05


def encode(img, fmt, **kw):
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


@pytest.mark.parametrize("mode,fmt", [("L", "JPEG"), ("CMYK", "JPEG"), ("P", "PNG"), ("RGBA", "PNG"), ("LA", "PNG")])
def test_non_rgb_images_become_rgb(mode, fmt):
    src = photo(40, 30).convert(mode)
    img = decode_image(encode(src, fmt), f"x.{fmt}")
    assert img.mode == "RGB" and img.size == (40, 30)


def test_unreadable_inputs_name_the_file():
    good = encode(photo(64, 64), "JPEG")
    with pytest.raises(HdistillError, match="empty.jpg: empty file"):
        decode_image(b"", "empty.jpg")
    with pytest.raises(HdistillError, match="notes.txt: not a readable image"):
        decode_image(b"hello, not an image", "notes.txt")
    with pytest.raises(HdistillError, match="cut.jpg: not a readable image"):
        decode_image(good[: len(good) // 2], "cut.jpg")


@pytest.mark.parametrize("width,height", [(450, 300), (300, 450), (257, 256)])
def test_center_crop_matches_timm_eval_transform(width, height):
    """timm / MAE evaluation: resize the short side to S / 0.875, centre crop S (torchvision, two steps)."""
    import torchvision.transforms as T
    base = np.random.default_rng(width).integers(0, 256, (12, 18, 3), dtype=np.uint8)
    img = Image.fromarray(base).resize((width, height), Image.BICUBIC)              # smooth, photo-like
    ours, params = make_view(img, "x", 3, seed=7, size=224, crop="center")
    reference = np.asarray(T.Compose([T.Resize(256, interpolation=InterpolationMode.BICUBIC), T.CenterCrop(224)])(img))
    diff = np.abs(ours.astype(int) - reference)
    assert diff.mean() < 1.5 and not params.flip                     # one crop + resize against two resamplings
    other = make_view(img, "y", 0, seed=0, size=224, crop="center")[1]  # no randomness: id, view, seed do not matter
    assert (other.top, other.left, other.height, other.width) == (params.top, params.left, params.height, params.width)

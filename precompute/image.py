"""Decode one image into RGB uint8 pixels, the way timm and torchvision loaders do."""
from __future__ import annotations

import io
import threading
import warnings
from contextlib import contextmanager

import numpy as np
from PIL import Image

from hdistill.common.errors import HdistillError


def decode_image(data: bytes, name: str, max_pixels: int | None = None) -> Image.Image:
    """Bytes of any PIL-readable image -> fully loaded RGB PIL image.

    Grayscale, CMYK, palette and alpha images are converted with PIL's convert("RGB"),
    as timm and torchvision do (alpha is dropped); 16-bit greyscale is scaled to 8 bits first
    (its high byte), where convert("RGB") would clip it to white. EXIF orientation tags are ignored, as
    torchvision's and timm's loaders ignore them. Raises HdistillError naming `name` for anything unreadable:
    empty, truncated or corrupt files, non-images, and images of more than `max_pixels` pixels (None: PIL's
    decompression-bomb limit, `PIL.Image.MAX_IMAGE_PIXELS`, about 89 megapixels).
    """
    if not data:
        raise HdistillError(f"{name}: empty file")
    try:
        with pixel_limit(max_pixels), warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                img.load()
                if img.mode in SIXTEEN_BIT:
                    img = _sixteen_to_eight(img)
                elif img.mode == "F":
                    raise HdistillError(f"{name}: a floating-point image has no defined 8-bit RGB conversion; "
                                        "convert it to 8 or 16 bits first")
                img = img.convert("RGB") if img.mode != "RGB" else img.copy()
    except Image.UnidentifiedImageError:
        raise HdistillError(f"{name}: not a readable image (PIL recognises no image format in it)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise HdistillError(f"{name}: {err} (PIL's guard against decompression bombs; give precompute "
                            "--max-image-pixels N to read larger images)") from None
    except (OSError, SyntaxError, ValueError) as err:
        raise HdistillError(f"{name}: not a readable image ({type(err).__name__}: {err})") from None
    return img


_LIMIT = threading.Lock()


@contextmanager
def pixel_limit(pixels: int | None):
    """PIL's decompression-bomb limit (a module global PIL reads as it opens an image) set to `pixels` for one
    decode, and restored after; None leaves PIL's own."""
    if pixels is None:
        yield
        return
    with _LIMIT:
        before = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = pixels
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = before


# 16-bit single-channel modes (PNG and TIFF greyscale); PIL's convert("RGB") would clip them at 255
SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def _sixteen_to_eight(img: Image.Image) -> Image.Image:
    """A 16-bit greyscale image as 8-bit greyscale by its high byte, as torchvision's to_dtype(uint8, scale=True)
    converts uint16 (v >> 8); mode I (32-bit) holds 16-bit samples when PIL widens them, so values are clipped to
    0..65535 first."""
    values = np.asarray(img).astype(np.int64).clip(0, 65535)
    return Image.fromarray((values >> 8).astype(np.uint8), mode="L")


def load_image(path: str) -> Image.Image:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as err:
        raise HdistillError(f"{path}: cannot read ({err.strerror})") from None
    return decode_image(data, path)


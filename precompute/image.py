"""Decode one image into RGB uint8 pixels, the way timm and torchvision loaders do."""
from __future__ import annotations

import io
import warnings

from PIL import Image

from hdistill.common.errors import HdistillError

# A 16k x 16k photo is legitimate; beyond that PIL's bomb check still applies.
MAX_IMAGE_PIXELS = 16384 * 16384


def decode_image(data: bytes, name: str) -> Image.Image:
    """Bytes of any PIL-readable image -> fully loaded RGB PIL image.

    Grayscale, CMYK, palette and alpha images are converted with PIL's convert("RGB"),
    as timm and torchvision do (alpha is dropped). Raises HdistillError naming `name`
    for anything unreadable: empty, truncated or corrupt files, non-images.
    """
    if not data:
        raise HdistillError(f"{name}: empty file")
    Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                img.load()
                if img.mode != "RGB":
                    img = img.convert("RGB")
                else:
                    img = img.copy()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError,
            Image.DecompressionBombWarning) as err:
        raise HdistillError(f"{name}: not a readable image ({type(err).__name__}: {err})") from None
    return img


def load_image(path: str) -> Image.Image:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as err:
        raise HdistillError(f"{path}: cannot read ({err.strerror})") from None
    return decode_image(data, path)


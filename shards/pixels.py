"""A view's pixels in a store: the stored patches as they are (`raw`), or one JPEG of them (`jpeg`) that decodes to
exactly the pixels the teacher ran on.

jpeg: each P x P patch sits at the top-left of a C x C cell, C = P rounded up to a multiple of 8 (the cell's extra
rows and columns repeat the patch's last row and column); the cells are laid row-major, `columns` to a row (the
width of the patch grid), and the mosaic is one baseline JPEG without chroma subsampling (4:4:4) at quality Q,
written by PIL. With 4:4:4 and cells on JPEG's 8 x 8 blocks, the encoder and the decoder treat every block alone
(colour conversion per pixel, DCT and quantisation per block; no chroma upsampling, which would mix neighbours),
so a patch decodes to the same pixels in any mosaic that holds it. Precompute therefore gives the teacher the
decoded mosaic of all N patches of the view (`round_trip`) and stores the mosaic of the stored patches only; it
decodes every stored mosaic again and stops if a patch differs from what the teacher saw. JPEG decoders are not
bit-exact across libraries and versions, so the manifest names the decoder and each shard's commit records the
CRC32C of its decoded pixels, which the reader checks (see docs/FORMAT.md).
"""
from __future__ import annotations

import functools
import io
from dataclasses import asdict, dataclass

import google_crc32c
import numpy as np
import torch
from PIL import Image, features

from hdistill.common.errors import HdistillError
from hdistill.common.tokens import patchify

PIXELS = ("raw", "jpeg")
MEMBERS = {"raw": "pixels.npy", "jpeg": "pixels.jpg"}     # the webdataset entry of a sample's pixels


def decoder() -> dict:
    """The reference JPEG decoder of this process, whose pixels the teacher sees: PIL's version and its libjpeg."""
    return {"library": "Pillow", "version": Image.__version__, "libjpeg": features.version("jpg"),
            "libjpeg_turbo": bool(features.check_feature("libjpeg_turbo"))}


@dataclass(frozen=True)
class PixelSpec:
    """How a store holds its pixels (the manifest's "pixels")."""

    encoding: str = "raw"                 # raw | jpeg
    quality: int | None = None            # jpeg: PIL's quality
    decoder: dict | None = None           # jpeg: the decoder whose pixels the teacher saw (decoder())

    @property
    def member(self) -> str:
        return MEMBERS[self.encoding]

    def to_dict(self) -> dict:
        d = asdict(self)
        if self.encoding == "jpeg":
            d["layout"] = ("each PxP patch at the top-left of a CxC cell (C = P rounded up to a multiple of 8, the "
                           "rest repeating the patch's last row and column), cells row-major, grid-width cells to a "
                           "row; one baseline JPEG, 4:4:4")
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "PixelSpec":
        if d["encoding"] not in PIXELS:
            raise HdistillError(f"unknown pixel encoding {d['encoding']!r} (this hdistill knows {', '.join(PIXELS)})")
        return cls(d["encoding"], d.get("quality"), d.get("decoder"))


def cell(patch: int) -> int:
    return -(-patch // 8) * 8


def to_mosaic(patches: np.ndarray, columns: int) -> np.ndarray:
    """uint8 [n, P, P, 3] -> the mosaic [rows * C, columns * C, 3]; cells after the n-th are grey."""
    n, P = patches.shape[:2]
    C, rows = cell(P), -(-n // columns)
    cells = np.full((rows * columns, C, C, 3), 128, np.uint8)
    cells[:n] = np.pad(patches, ((0, 0), (0, C - P), (0, C - P), (0, 0)), mode="edge")
    return cells.reshape(rows, columns, C, C, 3).transpose(0, 2, 1, 3, 4).reshape(rows * C, columns * C, 3)


def from_mosaic(mosaic: np.ndarray, n: int, patch: int, columns: int) -> np.ndarray:
    """The mosaic [rows * C, columns * C, 3] -> its first n patches, uint8 [n, P, P, 3]."""
    C = cell(patch)
    rows = mosaic.shape[0] // C
    cells = mosaic.reshape(rows, C, columns, C, 3).transpose(0, 2, 1, 3, 4).reshape(rows * columns, C, C, 3)
    return np.ascontiguousarray(cells[:n, :patch, :patch])


def encode_jpeg(image: np.ndarray, quality: int) -> bytes:
    out = io.BytesIO()
    Image.fromarray(image).save(out, format="JPEG", quality=quality, subsampling=0, optimize=True)
    return out.getvalue()


def decode_jpeg(data: bytes | memoryview, where: str = "a JPEG") -> np.ndarray:
    """JPEG bytes -> uint8 [H, W, 3] by PIL (the reference decoder)."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.format != "JPEG" or img.mode != "RGB":
                raise HdistillError(f"{where}: not an RGB JPEG ({img.format} {img.mode})")
            return np.asarray(img)
    except (OSError, SyntaxError, ValueError) as err:
        raise HdistillError(f"{where}: unreadable JPEG ({type(err).__name__}: {err})") from None


def decode_jpeg_torchcodec(data: bytes | memoryview, where: str = "a JPEG") -> np.ndarray:
    """JPEG bytes -> uint8 [H, W, 3] (a view of TorchCodec's [3, H, W]) by torchcodec.decoders.decode_jpeg on the CPU:
    the libjpeg-turbo that TorchCodec bundles, without PIL's parsing of the file in Python (a third faster on a
    mosaic of 68 patches). Used only where it gives the pixels the commit recorded (StoreReader.check_decoder)."""
    from torchcodec.decoders import decode_jpeg as decode
    try:
        image = decode(bytes(data), mode="RGB")
    except (RuntimeError, ValueError) as err:
        raise HdistillError(f"{where}: unreadable JPEG ({type(err).__name__}: {err})") from None
    return image.permute(1, 2, 0).numpy()


def decoder_torchcodec() -> dict:
    import torchcodec
    return {"library": "TorchCodec", "version": torchcodec.__version__}


# The loader's JPEG decoders, fastest first: a reader takes the first whose pixels of its first shard are those
# the teacher saw; the reference (Pillow) last. name -> (decode, describe)
DECODERS = {"torchcodec": (decode_jpeg_torchcodec, decoder_torchcodec), "pillow": (decode_jpeg, decoder)}
REFERENCE = "pillow"


@functools.cache
def loader_decoders() -> dict:
    """The DECODERS this process can use, imported here: TorchCodec where it loads (each release is built for some
    torch releases), Pillow always."""
    try:
        import torchcodec.decoders  # noqa: F401
    except (ImportError, OSError, RuntimeError):
        return {REFERENCE: DECODERS[REFERENCE]}
    return DECODERS


def encode_patches(patches: np.ndarray, columns: int, quality: int) -> bytes:
    return encode_jpeg(to_mosaic(patches, columns), quality)


def decode_patches(data, n: int, patch: int, columns: int, where: str = "a JPEG", decode=None) -> np.ndarray:
    """A stored mosaic -> its n patches, uint8 [n, P, P, 3]; `decode`: bytes -> uint8 [H, W, 3] (decode_jpeg)."""
    mosaic = (decode or decode_jpeg)(data, where)
    C = cell(patch)
    if mosaic.shape != (-(-n // columns) * C, columns * C, 3):
        raise HdistillError(f"{where}: a {mosaic.shape[1]}x{mosaic.shape[0]} mosaic, expected one of {n} {C}-px cells "
                            f"{columns} to a row")
    return from_mosaic(mosaic, n, patch, columns)


def round_trip(view: np.ndarray, patch: int, quality: int) -> np.ndarray:
    """A view uint8 [S, S, 3] -> the pixels of its patches' JPEG mosaic as decoded: what the teacher runs on."""
    S = view.shape[0]
    g = S // patch
    if S % patch:
        raise HdistillError(f"--pixels jpeg: the view's {S} px are not a whole number of {patch}-px patches")
    patches = patchify(torch.from_numpy(view)[None], patch)[0].numpy()           # [N, P, P, 3], raster order
    decoded = decode_patches(encode_patches(patches, g, quality), g * g, patch, g)
    return decoded.reshape(g, g, patch, patch, 3).transpose(0, 2, 1, 3, 4).reshape(g * patch, g * patch, 3)


def decoded_pixels_crc32c(pixels) -> str:
    """The CRC32C (8 hex digits) of a shard's decoded pixels: each sample's uint8 [n, P, P, 3], in order."""
    crc = 0
    for p in pixels:
        crc = google_crc32c.extend(crc, np.ascontiguousarray(p).tobytes())
    return f"{crc:08x}"


def describe_decoder(d: dict | None) -> str:
    if not d:
        return "an unknown decoder"
    if "libjpeg" not in d:
        return f"{d['library']} {d['version']}"
    turbo = "libjpeg-turbo" if d.get("libjpeg_turbo") else "libjpeg"
    return f"{d['library']} {d['version']} ({turbo} {d.get('libjpeg')})"

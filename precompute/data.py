"""Where images come from: an ImageFolder tree, webdataset tar shards, a list file, or a generated set.

Every source becomes an ordered list of ImageRef (id + how to read its bytes). The order is
the store's order: sorted relative paths for a folder, shard then member order for tars,
line order for a list file.
"""
from __future__ import annotations

import io
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from hdistill.common.errors import HdistillError
from hdistill.shards.format import image_id_from_path

# torchvision's IMG_EXTENSIONS
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")


@dataclass(frozen=True)
class ImageRef:
    image_id: str
    source: str             # a path, "shard.tar:member", or "synthetic:i"
    offset: int = -1        # byte offset of the member's data inside a tar
    size: int = -1

    def read(self) -> bytes:
        if self.source.startswith("synthetic:"):
            return synthetic_image(int(self.source.split(":")[1]))
        if self.offset >= 0:
            with open(self.source.rsplit(":", 1)[0], "rb") as f:
                f.seek(self.offset)
                return f.read(self.size)
        with open(self.source, "rb") as f:
            return f.read()


def synthetic_image(index: int) -> bytes:
    """A generated photo-like PNG (smooth colour fields, shapes, noise) of varying size and aspect."""
    rng = np.random.default_rng([20231124, index])
    h, w = (int(v) for v in rng.integers(96, 320, size=2))
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    img = np.zeros((h, w, 3))
    for c in range(3):
        fx, fy, phase = rng.uniform(0.5, 6, 2).tolist() + [rng.uniform(0, 6.28)]
        img[..., c] = 0.5 + 0.5 * np.sin(fx * 6.28 * xx + phase) * np.cos(fy * 6.28 * yy)
    for _ in range(int(rng.integers(2, 6))):
        cy, cx, r = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.05, 0.3)
        inside = (yy - cy * h / max(h, w)) ** 2 + (xx - cx * w / max(h, w)) ** 2 < r ** 2
        img[inside] = rng.uniform(0, 1, 3)
    img += rng.normal(0, 0.03, img.shape)
    buf = io.BytesIO()
    Image.fromarray((img.clip(0, 1) * 255).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _from_folder(root: Path) -> list[ImageRef]:
    refs = []
    for folder, dirs, files in os.walk(root, followlinks=True):
        dirs.sort()
        for name in sorted(files):
            if _is_image(name):
                path = Path(folder) / name
                refs.append(ImageRef(image_id_from_path(str(path.relative_to(root))), str(path)))
    return refs


def _from_list(list_file: Path) -> list[ImageRef]:
    refs = []
    for line in list_file.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            path = Path(line) if os.path.isabs(line) else list_file.parent / line
            refs.append(ImageRef(image_id_from_path(line.lstrip("/")), str(path)))
    return refs


def _from_tars(pattern: str) -> list[ImageRef]:
    import braceexpand
    refs = []
    for url in braceexpand.braceexpand(pattern):
        if not os.path.isfile(url):
            raise HdistillError(f"--data: tar shard {url} does not exist")
        try:
            with tarfile.open(url, "r:") as tar:
                for member in tar:
                    if member.isfile() and _is_image(member.name):
                        refs.append(ImageRef(image_id_from_path(member.name), f"{url}:{member.name}",
                                             member.offset_data, member.size))
        except tarfile.TarError as err:
            raise HdistillError(f"--data: {url} is not a readable uncompressed tar ({err})") from None
    return refs


def list_images(data: str, limit: int | None = None) -> list[ImageRef]:
    """The ordered images of `data`, the first `limit` of them if given."""
    if data.startswith("synthetic:"):
        count = int(data.split(":", 1)[1])
        refs = [ImageRef(f"synthetic/{i:06d}", f"synthetic:{i}") for i in range(count)]
    elif ".tar" in data:
        refs = _from_tars(data)
    elif os.path.isdir(data):
        refs = _from_folder(Path(data))
    elif os.path.isfile(data):
        refs = _from_list(Path(data))
    else:
        raise HdistillError(f"--data {data}: no such folder, list file or tar shards "
                            "(expected an ImageFolder tree, 'shards-{000000..000099}.tar', a text file "
                            "of image paths, or synthetic:N)")
    refs = refs[:limit] if limit is not None else refs
    if not refs:
        raise HdistillError(f"--data {data}: no images found (extensions: {', '.join(IMAGE_EXTENSIONS)})")
    seen = {}
    for ref in refs:
        if ref.image_id in seen:
            raise HdistillError(f"--data: {seen[ref.image_id]} and {ref.source} map to the same image id "
                                f"{ref.image_id!r}; rename one of them")
        seen[ref.image_id] = ref.source
    return refs

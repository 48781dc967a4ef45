"""Where images come from: an ImageFolder tree, webdataset tar shards, a list file, or a generated set,
on local disk or on object storage (s3://, gs://, http(s):// for tars and list files).

Every source becomes an ordered list of ImageRef (id + how to read its bytes). The order is
the input order the store's permutation applies to: relative paths in walk order (a folder's files,
sorted, before its subfolders, sorted) for a folder, shard then member order for tars, line order for
a list file. It does not depend on where the images are: the same tree gives the same store.

On object storage an image is one GET (a ranged GET of its bytes inside a tar); listing a folder is
one paginated listing. Listing a remote tar reads each member's header with a small ranged GET, so it is
done once: the listing is kept in the store (STORE/inputs/, a TarIndex), and each rank starts with its
own share of the tars, so ranks started together list disjoint tars and then read each other's listings.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import posixpath
import tarfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from PIL import Image

from hdistill.common.errors import HdistillError
from hdistill.common.storage import Location, is_url, open_file, read_file, storage_error
from hdistill.shards.format import INPUTS_DIR, image_id_from_path

# torchvision's IMG_EXTENSIONS
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")


@dataclass(frozen=True)
class ImageRef:
    image_id: str
    source: str             # a path or URL, "shard.tar:member", or "synthetic:i"
    offset: int = -1        # byte offset of the member's data inside a tar
    size: int = -1

    @property
    def request(self) -> tuple[str, int | None, int | None] | None:
        """(url or path, start, end) of the image's bytes; None for a generated image."""
        if self.source.startswith("synthetic:"):
            return None
        if self.offset >= 0:
            return self.source.rsplit(":", 1)[0], self.offset, self.offset + self.size
        return self.source, None, None

    def read(self) -> bytes:
        if self.request is None:
            return synthetic_image(int(self.source.split(":")[1]))
        return read_file(*self.request)


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


def walk_order(relative: str) -> tuple:
    """Sort key of a relative path that gives os.walk's order with sorted folders and files: a folder's
    files before its subfolders."""
    *folders, name = relative.split("/")
    return tuple(folders), name


def _from_folder(root: Location) -> list[ImageRef]:
    names = sorted((n.replace(os.sep, "/") for n in root.files() if _is_image(n)), key=walk_order)
    return [ImageRef(image_id_from_path(n), root.url_of(n)) for n in names]


def _from_list(list_file: str) -> list[ImageRef]:
    parent = posixpath.dirname(list_file) if is_url(list_file) else os.path.dirname(list_file)
    refs = []
    for line in read_file(list_file).decode().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            path = line if is_url(line) or os.path.isabs(line) else Location(parent).url_of(line)
            refs.append(ImageRef(image_id_from_path(line.split("://")[-1].lstrip("/")), path))
    return refs


@dataclass(frozen=True)
class TarIndex:
    """Where the listings of remote tars are kept (a store's inputs/ folder) and which share of the tars this
    rank lists first."""

    place: Location
    rank: int = 0
    world_size: int = 1

    def order(self, count: int) -> list[int]:
        """The order this rank lists `count` tars in: its own share (the rank-th of world_size equal runs) first."""
        first = self.rank * count // self.world_size
        return list(range(first, count)) + list(range(first))

    def name(self, url: str) -> str:
        return f"{INPUTS_DIR}/{posixpath.basename(url)}-{hashlib.sha256(url.encode()).hexdigest()[:12]}.json"

    def members(self, url: str, size: int) -> list[ImageRef]:
        """The tar's image members: from its kept listing when that was made from a tar of this size, else
        listed now and kept."""
        name = self.name(url)
        try:
            kept = json.loads(self.place.read_bytes(name))
            if kept["url"] == url and kept["size"] == size:
                return [ImageRef(image_id_from_path(n), f"{url}:{n}", offset, length)
                        for n, offset, length in kept["members"]]
        except FileNotFoundError:
            pass
        refs = _tar_members(url)
        members = [[ref.source[len(url) + 1:], ref.offset, ref.size] for ref in refs]
        self.place.write_bytes(name, json.dumps({"url": url, "size": size, "members": members}).encode())
        return refs


def _tar_members(url: str) -> list[ImageRef]:
    """The image members of one uncompressed tar; remotely, only the headers are fetched (ranged GETs)."""
    try:
        f = open_file(url, cache_type="none")
    except FileNotFoundError:
        raise HdistillError(f"--data: tar shard {url} does not exist") from None
    try:
        with f, tarfile.open(fileobj=f, mode="r:") as tar:
            return [ImageRef(image_id_from_path(m.name), f"{url}:{m.name}", m.offset_data, m.size)
                    for m in tar if m.isfile() and _is_image(m.name)]
    except tarfile.TarError as err:
        raise HdistillError(f"--data: {url} is not a readable uncompressed tar ({err})") from None


def _sizes(urls: list[str]) -> dict[str, int]:
    """url -> bytes of every remote tar, from one listing per folder."""
    sizes = {}
    for folder in sorted({posixpath.dirname(u) for u in urls}):
        sizes.update({f"{folder}/{name}": size for name, size in Location(folder).sizes().items()})
    missing = [u for u in urls if u not in sizes]
    if missing:
        raise HdistillError(f"--data: tar shard {missing[0]} does not exist" +
                            (f" (nor {len(missing) - 1} more)" if len(missing) > 1 else ""))
    return sizes


def _from_tars(pattern: str, index: TarIndex | None) -> list[ImageRef]:
    import braceexpand
    urls = list(braceexpand.braceexpand(pattern))
    if not is_url(pattern) or index is None:
        with ThreadPoolExecutor(max_workers=32 if is_url(pattern) else 1) as pool:   # remote: latency-bound
            return [ref for refs in pool.map(_tar_members, urls) for ref in refs]
    sizes = _sizes(urls)
    order = index.order(len(urls))
    with ThreadPoolExecutor(max_workers=32) as pool:
        found = dict(zip(order, pool.map(lambda i: index.members(urls[i], sizes[urls[i]]), order)))
    return [ref for i in range(len(urls)) for ref in found[i]]


def _list(data: str, index: TarIndex | None) -> list[ImageRef]:
    if data.startswith("synthetic:"):
        return [ImageRef(f"synthetic/{i:06d}", f"synthetic:{i}") for i in range(int(data.split(":", 1)[1]))]
    if ".tar" in data:
        return _from_tars(data, index)
    place = Location(data)
    if place.isdir():
        return _from_folder(place)
    if place.isfile():
        return _from_list(data)
    raise HdistillError(f"--data {data}: no such folder, list file or tar shards "
                        "(expected an ImageFolder tree, 'shards-{000000..000099}.tar', a text file "
                        "of image paths, or synthetic:N; local or s3://, gs://, http(s)://)")


def list_images(data: str, limit: int | None = None, index: TarIndex | None = None) -> list[ImageRef]:
    """The ordered images of `data`, the first `limit` of them if given; listings of remote tars are kept at
    `index` when given."""
    try:
        refs = _list(data, index)
    except HdistillError:
        raise
    except Exception as err:  # noqa: BLE001 - credentials, bucket, permission: one line naming --data
        if not is_url(data):
            raise
        raise HdistillError(f"--data {storage_error(data, err)}") from None
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

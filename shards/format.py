"""Store format v7: names, the sample's arrays, the shard layout and store order. docs/FORMAT.md is the reference."""
from __future__ import annotations

import io
import json
import re
import threading
from dataclasses import dataclass, field
from functools import cached_property
from types import SimpleNamespace

import numpy as np

from hdistill.common.views import ViewRecord
from hdistill.common.targets import TargetSpec

from .encoding import target_arrays
from .pixels import PixelSpec

FORMAT_VERSION = 7
MANIFEST = "manifest.json"
WDS_DIR = "wds"
ZARR_DIR = "targets.zarr"
COMMITS_DIR = "commits"
LOCKS_DIR = "locks"
INPUTS_DIR = "inputs"          # precompute's listings of remote input tars (a cache; readers never need it)
FORMATS = ("wds", "zarr")
CONFIG = "config.yaml"         # the precompute options (writer.write_store_options)
STORE_ENTRIES = (MANIFEST, WDS_DIR, ZARR_DIR, COMMITS_DIR, LOCKS_DIR, INPUTS_DIR, CONFIG)   # what a store folder holds


def shard_name(view: int, index: int) -> str:
    return f"view{view}-{index:06d}"


def image_id_from_path(relative: str) -> str:
    """Relative source path -> image id: extension dropped, characters outside [A-Za-z0-9_/-] -> '_'.

    Ids never contain dots, so webdataset keys split cleanly from their extensions.
    """
    stem = re.sub(r"\.[^./]*$", "", relative.replace("\\", "/"))
    return re.sub(r"[^A-Za-z0-9_/-]", "_", stem)


def store_bytes(store) -> int:
    """Bytes of every file of a store (a path, URL or Location): shards, zarr, commit records, manifest, locks."""
    from hdistill.common.storage import as_location
    return as_location(store).total_bytes()


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def npy_load(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


@dataclass(frozen=True)
class StoreLayout:
    """Shapes and sample order of a store, recorded in its manifest under "layout".

    Store order: the images (in input order: sorted relative paths for a folder, shard then member
    order for tars, line order for a list file) are placed at the positions of a seeded permutation,
    `order = numpy.random.default_rng(order_seed).permutation(num_images)`: position p holds image
    order[p], so every shard is a uniform sample of the input (an ImageFolder's classes mix).
    Samples are view-major: every position's view 0, then view 1, ... Shard `index` of view `v`
    holds positions [index * shard_size, (index + 1) * shard_size) (fewer samples if some inputs were
    unreadable). The zarr slot of (view v, position p) is v * positions_padded + p, with
    positions_padded a multiple of shard_size so that every store shard is one zarr shard.

    teacher_visible: how many patches an MAE teacher's encoder saw of each view for the store's dec targets (G2SD), at
    the patches of the sample's `visible` array, drawn by the rule TEACHER_MASK_RULE says; 0 in a store without them.
    """

    num_images: int
    views: int
    shard_size: int
    image_size: int
    patch_size: int
    num_patches: int
    stored_patches: int
    order_seed: int
    teacher_visible: int = 0

    @property
    def shards_per_view(self) -> int:
        return -(-self.num_images // self.shard_size)

    @property
    def positions_padded(self) -> int:
        return self.shards_per_view * self.shard_size

    @property
    def num_slots(self) -> int:
        return self.views * self.positions_padded

    @cached_property
    def order(self) -> np.ndarray:
        """order[p] = the input index of the image at store position p."""
        return np.random.default_rng(self.order_seed).permutation(self.num_images)

    def shards(self) -> list[tuple[int, int]]:
        return [(v, k) for v in range(self.views) for k in range(self.shards_per_view)]

    def positions(self, index: int) -> range:
        return range(index * self.shard_size, min((index + 1) * self.shard_size, self.num_images))

    def slot(self, view: int, position: int) -> int:
        return view * self.positions_padded + position

    def to_dict(self) -> dict:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        d["order_rule"] = "position p holds input image numpy.random.default_rng(order_seed).permutation(num_images)[p]"
        if self.teacher_visible:
            d["teacher_mask_rule"] = TEACHER_MASK_RULE
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "StoreLayout":
        return cls(**{k: d[k] for k in cls.__dataclass_fields__})


TEACHER_MASK_RULE = ("visible = sort(argsort(noise)[:int(num_patches * (1 - teacher_mask_ratio))]) (MAE's "
                     "random_masking), noise = numpy.random.default_rng(numpy.random.SeedSequence([seed, *w, view, 1]))"
                     ".random(num_patches), w the first 16 bytes of sha256(image_id) as 4 little-endian uint32")


def sample_arrays(layout: StoreLayout, targets: list[TargetSpec]) -> dict[str, tuple[tuple[int, ...], str]]:
    """Every array of a sample, in write order -> (shape, dtype): the mask, the pixels and the teacher's mask if the
    store has one, then the targets."""
    n, P = layout.stored_patches, layout.patch_size
    out = {"stage": ((layout.num_patches,), "uint8"), "keep": ((n,), "int16"), "pixels": ((n, P, P, 3), "uint8")}
    if layout.teacher_visible:
        out["visible"] = ((layout.teacher_visible,), "int16")
    for spec in targets:
        out.update(target_arrays(spec))
    return out


PLAIN = ("stage", "keep", "pixels", "visible")       # a sample's arrays that are not targets (never compressed)
ZSTD_LEVEL = 3
ZSTD_SAVING = "11-27% of int4 targets, 8-11% of fp16 ones"     # measured on the real ViT-S/14 (docs/FORMAT.md)


def sample_members(layout: StoreLayout, targets: list[TargetSpec], pixels: PixelSpec,
                   compress: str) -> dict[str, str]:
    """Every array of a sample -> its webdataset entry: <name>.npy, pixels.jpg for JPEG pixels, <name>.npy.zst for
    a zstd-compressed target array."""
    suffix = ".zst" if compress == "zstd" else ""
    return {name: pixels.member if name == "pixels" else f"{name}.npy" + ("" if name in PLAIN else suffix)
            for name in sample_arrays(layout, targets)}


def zstd_compress(data: bytes) -> bytes:
    """One zstd frame of `data` at ZSTD_LEVEL, its content size in the header (python-zstandard)."""
    return _zstd_codecs().compressor.compress(data)


def zstd_decompress(data) -> bytes:
    """The bytes of one zstd frame. The decompression context is made once per thread and reused: making one per
    frame, as numcodecs.Zstd does, costs 20 us a frame, most of a small frame's decode. ValueError if `data` is not
    one whole frame with its content size."""
    codecs = _zstd_codecs()
    try:
        return codecs.decompressor.decompress(data)
    except codecs.error as err:
        raise ValueError(str(err)) from None


_zstd_local = threading.local()


def _zstd_codecs():
    codecs = getattr(_zstd_local, "codecs", None)
    if codecs is None:
        import zstandard
        codecs = _zstd_local.codecs = SimpleNamespace(compressor=zstandard.ZstdCompressor(level=ZSTD_LEVEL),
                                                      decompressor=zstandard.ZstdDecompressor(),
                                                      error=zstandard.ZstdError)
    return codecs


@dataclass
class StoredSample:
    """One sample of the store: one augmented view of one image.

    record  the view record: source, source size, crop box, flip (the json entry)
    arrays  array name -> numpy array, in sample_arrays order:
              stage   uint8  [N]             0 = kept by the progressive mask, s = dropped at stage s
              keep    int16  [n]             patch indices of the stored tokens, ascending
              pixels  uint8  [n, P, P, 3]    the view's stored patches, in `keep` order
              visible int16  [m]             (a store with dec targets) the patches the teacher's encoder saw,
                                             ascending
              <target name> (and any companion such as scale.<name>) as the target table says
    """

    record: ViewRecord
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    jpeg: bytes | None = None           # --pixels jpeg: the stored patches' mosaic, which decodes to arrays["pixels"]

    @property
    def key(self) -> str:
        return self.record.key

    def entries(self, members: dict[str, str]) -> dict[str, bytes]:
        """webdataset entries (json first, then one per array as `members` names it), in the order they are
        written."""
        out = {"json": json.dumps(self.record.to_json(), sort_keys=True).encode()}
        for name, a in self.arrays.items():
            member = members[name]
            out[member] = (self.jpeg if member.endswith(".jpg") else
                           zstd_compress(npy_bytes(a)) if member.endswith(".zst") else npy_bytes(a))
        return out

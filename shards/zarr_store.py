"""The zarr v3 form of a store: the webdataset arrays stacked along a slot axis.

    targets.zarr/
      valid     bool    [S]                  slot holds a sample
      image_id  str     [S]
      view      int32   [S]
      box       int32   [S, 4]               crop top, left, height, width (source pixels)
      flip      bool    [S]
      stage, keep, pixels, and every array of the target table under its webdataset name:
      feat.<role>, feat.<role>.b<B>, rel.<role>.b<B>, scale.rel.<role>.b<B>, ...   [S, *per-sample shape]
      (flat names: with dots as "/", feat.mae and feat.mae.b8 would need feat/mae to be both an
      array and a group)

Chunks hold one sample (random access); zarr shards hold one store shard (`shard_size`
slots), so each store shard is written by exactly one process in one region write (on object
storage: one object per array and store shard). Every chunk ends with its crc32c (zarr's crc32c codec,
last in the codec chain), which zarr checks as it decodes the chunk, and every chunk is written, fill
values too, so that a missing file is a missing file, never a region of zeros. The hierarchy's metadata
is built in a local temporary folder and published whole: renamed in, or uploaded with the group's
zarr.json last.
"""
from __future__ import annotations

import functools
import hashlib
import os
import shutil
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import zarr
import zarr.codecs as zc

from hdistill.common.atomic import write_error
from hdistill.common.errors import HdistillError
from hdistill.common.storage import Location, staging_prefix

from .encoding import encoding_of
from .format import ZARR_DIR, StoredSample, shard_name
from .manifest import Manifest

# Measured on real ViT-S/14 targets of ImageNet views: zstd level 1 stores fp16 features at 0.92 and
# relations at 0.88 of their size with byte shuffle, uint8 pixels at 0.88 with bit shuffle, for about
# 0.1-0.2 ms per view and array; higher levels gain under 1%.
FLOAT_CODEC = zc.BloscCodec(cname="zstd", clevel=1, shuffle="shuffle")
INT_CODEC = zc.BloscCodec(cname="zstd", clevel=1, shuffle="bitshuffle")
CHECKSUM = zc.Crc32cCodec()


def chunk_codecs(dtype: str) -> tuple:
    """An array's bytes-to-bytes codecs: its compressor (none for strings), then each chunk's crc32c."""
    return (CHECKSUM,) if dtype == "str" else (FLOAT_CODEC if dtype.startswith("float") else INT_CODEC, CHECKSUM)


VIEW_RECORDS = {"valid": ((), "bool"), "image_id": ((), "str"), "view": ((), "int32"), "box": ((4,), "int32"),
                "flip": ((), "bool")}


@contextmanager
def _quiet():
    """Without zarr's notices that str arrays and numcodecs filters (BitRound) are outside the v3 spec. zarr also
    gives the second notice in its own I/O thread, where this context does not reach: there it is shown once per
    process, by a filter added on the first use (not on import)."""
    _notice_once()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The data type .* does not have a Zarr V3 specification")
        warnings.filterwarnings("ignore", message="Numcodecs codecs are not in the Zarr version 3 specification")
        yield


@functools.cache
def _notice_once():
    warnings.filterwarnings("once", message="Numcodecs codecs are not in the Zarr version 3 specification")


def array_shapes(manifest: Manifest) -> dict[str, tuple[tuple[int, ...], str]]:
    """zarr array -> (per-sample shape, dtype): the per-view records, then every sample array."""
    return {**VIEW_RECORDS, **manifest.arrays()}


def _filters(manifest: Manifest) -> dict[str, list]:
    """zarr array -> filters: those of each target's encoding (BitRound for bf16)."""
    return {t.name: filters for t in manifest.targets if (filters := encoding_of(t).zarr_filters())}


def create(store: Location, manifest: Manifest):
    """Create the empty hierarchy once; concurrent ranks race safely (build aside, publish whole)."""
    if store.exists(f"{ZARR_DIR}/zarr.json"):
        return
    with _quiet():
        layout, filters = manifest.layout, _filters(manifest)
    tmp = Path(store.url_of(f".{ZARR_DIR}.tmp-{os.getpid()}")) if not store.remote else \
        Path(tempfile.mkdtemp(prefix=staging_prefix())) / ZARR_DIR
    group = zarr.open_group(tmp, mode="w", zarr_format=3)
    for name, (shape, dtype) in array_shapes(manifest).items():
        with _quiet():
            group.create_array(
                name, shape=(layout.num_slots, *shape), dtype=dtype,
                chunks=(1, *shape), shards=(layout.shard_size, *shape),
                filters=filters.get(name, ()),
                compressors=chunk_codecs(dtype),
                fill_value="" if dtype == "str" else 0)
    _publish(store, tmp)


def _publish(store: Location, tmp: Path):
    """Move the built metadata into the store: one rename, or uploads with the group's zarr.json last
    (the mark that the hierarchy exists; every rank uploads the same bytes)."""
    if not store.remote:
        try:
            os.rename(tmp, store.url_of(ZARR_DIR))
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
            if not store.exists(ZARR_DIR):
                raise
        return
    try:
        files = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file())
        for name in sorted(files, key=lambda f: f == "zarr.json"):
            store.upload(tmp / name, f"{ZARR_DIR}/{name}")
    finally:
        shutil.rmtree(tmp.parent, ignore_errors=True)


_groups: dict = {}


def _group(store: Location, mode: str):
    """The opened targets.zarr group; on object storage opened once per process and mode, so its metadata
    is fetched once (a local group is reopened: cheap, and never stale)."""
    key = (store.url, mode, os.getpid())
    if key in _groups:
        return _groups[key]
    with _quiet():
        group = zarr.open_group(store.url_of(ZARR_DIR), mode=mode)
    if store.remote:
        _groups[key] = group
    return group


def shard_file(manifest: Manifest, name: str, view: int, index: int) -> str:
    """The file (object) of array `name` that holds store shard (view, index): its zarr shard's key."""
    layout = manifest.layout
    per_sample = array_shapes(manifest)[name][0]
    return f"{ZARR_DIR}/{name}/c/{layout.slot(view, index * layout.shard_size) // layout.shard_size}" + \
        "/0" * len(per_sample)


def region(manifest: Manifest, view: int, index: int) -> slice:
    start = manifest.layout.slot(view, index * manifest.layout.shard_size)
    return slice(start, start + manifest.layout.shard_size)


def region_digest(arrays: dict[str, np.ndarray]) -> str:
    """sha256 over a region's arrays as read back (sorted by name; strings as UTF-8, NUL-separated)."""
    h = hashlib.sha256()
    for name in sorted(arrays):
        values = arrays[name]
        h.update(name.encode() + b"\0")
        if values.dtype.kind in "OUT":
            h.update("\0".join(str(v) for v in values.tolist()).encode())
        else:
            h.update(np.ascontiguousarray(values).tobytes())
    return h.hexdigest()


def write_shard(store: Location, manifest: Manifest, view: int, index: int,
                samples: list[tuple[int, StoredSample]]) -> str:
    """Write one store shard's slots in one region; `samples` are (position, sample). -> region digest."""
    size = manifest.layout.shard_size
    arrays = {name: np.zeros((size, *shape), dtype=object if dtype == "str" else dtype)
              for name, (shape, dtype) in array_shapes(manifest).items()}
    arrays["image_id"][:] = ""
    for position, sample in samples:
        i = position - index * size
        record = sample.record
        arrays["valid"][i] = True
        arrays["image_id"][i] = record.params.image_id
        arrays["view"][i] = record.params.view
        arrays["box"][i] = record.box
        arrays["flip"][i] = record.params.flip
        for name, data in sample.arrays.items():
            arrays[name][i] = data
    where = region(manifest, view, index)
    with _quiet(), zarr.config.set({"array.write_empty_chunks": True}):
        group = _group(store, "r+")
        for name, values in arrays.items():
            try:
                group[name][where] = values.astype(str) if values.dtype == object else values
            except OSError as err:          # a full disk, a quota: one line, naming the file (the commit never came)
                path = err.filename or store.url_of(shard_file(manifest, name, view, index))
                raise write_error(Path(path), err) from None
    return region_digest(read_region(store, manifest, view, index, list(arrays)))


def shard_label(store: Location, shard: str) -> str:
    """How messages name a store shard's region of targets.zarr."""
    return f"{store.url_of(ZARR_DIR)} shard {shard}"


def read_region(store: Location, manifest: Manifest, view: int, index: int,
                names: list[str]) -> dict[str, np.ndarray]:
    """zarr array -> the store shard's values [shard_size, ...]."""
    group, where = _group(store, "r"), region(manifest, view, index)
    label = shard_label(store, shard_name(view, index))
    return {name: _checked_read(group, name, where, label) for name in names}


def read_slots(store: Location, names: list[str], slots: np.ndarray, label: str) -> dict[str, np.ndarray]:
    """zarr array -> values at the given ascending slots [len(slots), ...], read as one range."""
    lo, hi = int(slots[0]), int(slots[-1]) + 1
    group = _group(store, "r")
    return {name: _checked_read(group, name, slice(lo, hi), label)[slots - lo] for name in names}


def _checked_read(group, name: str, where: slice, label: str) -> np.ndarray:
    """An array's values; a chunk whose crc32c (zarr's codec) does not match is named with its shard and array."""
    try:
        with _quiet():
            return group[name][where]
    except ValueError as err:
        if "checksum" not in str(err):
            raise
        raise HdistillError(f"{label}: array {name}: a chunk's crc32c differs from the one written with it: the zarr "
                            "shard was damaged or changed after it was written; restore it from a copy or make the "
                            "store again (hdistill verify lists every damaged shard)") from None

"""Reading a store: the samples of a shard from its webdataset tar or from its zarr region.

Both forms give the same samples in the same order (store order within the shard), with every
array checked against the manifest's shapes and dtypes; targets decode from their encoding on request.
A tar shard is loaded whole into this process's memory (preads of a local file, one stream of ranged GETs for an
object), checked against its size and the crc32c its commit recorded, indexed by one pass over its headers, and
its arrays are numpy views into it: nothing is parsed or copied per sample, and what is read is what was checked.
A zarr chunk carries its own crc32c (the codec chain ends with zarr's crc32c codec), checked by zarr as it is
decoded. Errors name the shard's file or zarr region and the sample. Values are not scanned here: the trainer checks them on its device, per batch.
"""
from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np

from hdistill.common.errors import HdistillError
from hdistill.common.views import ViewRecord, sample_key
from hdistill.common.storage import Buffers, Location, as_location
from hdistill.common.targets import TargetSpec

from . import tarindex
from .encoding import decode, target_arrays
from .format import FORMATS, PLAIN, npy_bytes, npy_load, zstd_decompress
from .pixels import DECODERS, REFERENCE, decode_patches, loader_decoders, decoded_pixels_crc32c, describe_decoder
from .manifest import Manifest, ShardRecord
from .zarr_store import read_region, read_slots, shard_file, shard_label

ZARR_BLOCK = 64   # slots read at a time from a zarr region: bounds a reader's memory on full stores


@dataclass
class Sample:
    """One stored sample: the mask, the pixels and the chosen targets' stored arrays.

    stage uint8 [N]; keep int16 [n]; pixels uint8 [n, P, P, 3]; visible int16 [m] (a store with dec targets: the
    patches their teacher's encoder saw) or None; stored: array name -> the target arrays as stored (an int8 target
    and its scale.<name>); `targets` decodes them (float16, or float32 for int8).
    From a tar shard the arrays are read-only views into the loaded shard.
    """

    key: str                            # <image id>-v<view>
    view: int
    stage: np.ndarray
    keep: np.ndarray
    pixels: np.ndarray
    specs: list[TargetSpec] = field(default_factory=list)
    stored: dict[str, np.ndarray] = field(default_factory=dict)
    view_json: bytes | None = None      # the webdataset json entry; None from zarr
    visible: np.ndarray | None = None

    @cached_property
    def targets(self) -> dict[str, np.ndarray]:
        return {spec.name: decode(spec, self.stored) for spec in self.specs}

    @property
    def record(self) -> ViewRecord | None:
        return ViewRecord.from_json(json.loads(self.view_json)) if self.view_json is not None else None


class StoreReader:
    """Reads a store's shards in one form; `keep_loaded`: how many loaded tar shards' memory it reuses (Buffers),
    about the shards it has in flight at once."""

    def __init__(self, store: str | Path | Location, manifest: Manifest, fmt: str = "wds",
                 targets: list[str] | None = None, keep_loaded: int = 4):
        if fmt not in FORMATS:
            raise HdistillError(f"unknown store format {fmt!r}; choose one of {', '.join(FORMATS)}")
        if fmt not in manifest.formats:
            raise HdistillError(f"--format {fmt}: the store {store} holds only {','.join(manifest.formats)}")
        self.specs = manifest.targets if targets is None else manifest.targets_named(targets, store)
        self.store, self.manifest, self.fmt = as_location(store), manifest, fmt
        shapes = manifest.arrays()
        self.arrays = {n: shapes[n] for n in PLAIN if n in shapes}
        for spec in self.specs:
            self.arrays.update(target_arrays(spec))
        # name -> (npy header, shape, dtype, values): what a sample's array is expected to be, worked out once
        self.expected = {name: (_npy_header(shape, dtype), tuple(shape), np.dtype(dtype), int(np.prod(shape)))
                         for name, (shape, dtype) in self.arrays.items()}
        self.members = {name: member for name, member in manifest.members().items() if name in self.arrays}
        self.buffers = Buffers(keep_loaded)       # the memory of loaded tar shards, reused once their samples are gone
        self.jpeg_decoder: str | None = None     # JPEG pixels: the decoder check_decoder chose on the first shard
        if manifest.pixels.encoding == "jpeg":
            loader_decoders()           # imported here: loader workers forked from this process have them

    def check_present(self, shards: list[ShardRecord]):
        """Refuse, before anything is read, a store in which a file of `shards` is missing or (a tar) not of its
        recorded size: a stat per file, one listing on object storage. An http(s) server lists nothing reliably:
        there each shard is checked as it is loaded only."""
        if self.store.read_only:
            return
        if self.fmt == "wds":
            expected = {shard.file: shard.bytes for shard in shards}
        else:
            expected = {shard_file(self.manifest, name, shard.view, shard.index): None
                        for shard in shards for name in ("valid", "image_id", *self.arrays)}
        found = self.store.sizes_of(list(expected))
        bad = [f"{name} is missing" if name not in found else
               f"{name} holds {found[name]} bytes, its commit recorded {size}"
               for name, size in expected.items() if name not in found or size not in (None, found[name])]
        if bad:
            more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
            raise HdistillError(f"{self.store}: {bad[0]}{more}: the store was damaged after it was made; restore its "
                                "files from a copy or make the store again (hdistill verify lists every problem)")

    def where(self, shard: ShardRecord) -> str:
        if self.fmt == "wds":
            return self.store.url_of(shard.file)
        return shard_label(self.store, shard.name)

    def read(self, shard: ShardRecord, offsets: set[int] | None = None, loaded=None) -> Iterator[Sample]:
        """The shard's samples in store order; only those at `offsets` (0-based within the shard) if given.
        `loaded`: what `load(shard)` returned, if it was called ahead (on another thread, say)."""
        if self.fmt == "zarr":
            return self._read_zarr(shard, offsets)
        return self._read_wds(shard, offsets, self.load(shard) if loaded is None else loaded)

    def load(self, shard: ShardRecord):
        """A tar shard's bytes, whole and checked against its crc32c (None for zarr, read per region). Safe to
        call on another thread: the reads and the checksum run without the GIL."""
        if self.fmt == "zarr":
            return None
        buf, crc = self.store.load(shard.file, checksum=shard.crc32c is not None, buffers=self.buffers)
        if shard.bytes is not None and len(buf) != shard.bytes:
            raise HdistillError(f"{self.where(shard)}: {len(buf)} bytes, its commit recorded {shard.bytes}: the shard "
                                "was truncated, changed or replaced after the store was made; restore it from a copy "
                                "or make the store again (hdistill verify lists every damaged shard)")
        if crc != shard.crc32c:
            raise HdistillError(f"{self.where(shard)}: crc32c {crc} differs from the {shard.crc32c} its commit "
                                "recorded: the shard was damaged, changed or replaced after the manifest was read; "
                                "restore it from a copy or make the store again (hdistill verify lists every damaged "
                                "shard)")
        return buf

    def _read_wds(self, shard: ShardRecord, offsets: set[int] | None, buf) -> Iterator[Sample]:
        url = self.where(shard)
        try:
            index = tarindex.samples(buf)
        except tarindex.TarError as err:
            raise HdistillError(f"{url}: not a readable tar shard ({err})") from None
        if self.jpeg_decoder is None and self.manifest.pixels.encoding == "jpeg":
            self.check_decoder(shard, buf, index)
        for offset in sorted(offsets) if offsets is not None else range(len(index)):
            if offset >= len(index):
                return
            key, entries = index[offset]
            arrays = {name: self._view(buf, url, key, name, entries) for name in self.arrays}
            where = entries.get("json")
            view_json = bytes(buf[where[0]:where[0] + where[1]]) if where else None
            yield self._sample(url, key, shard.view, arrays, view_json, checked=True)

    def check_decoder(self, shard: ShardRecord, buf, index):
        """Choose the JPEG decoder: the first of pixels.DECODERS whose pixels of this shard are those the teacher
        saw (the CRC32C its commit recorded), checked once per reader on the first shard it reads; refuse to read
        if none is (hdistill verify checks every shard)."""
        url, found = self.where(shard), []
        for name, (decode_jpeg, describe) in loader_decoders().items():
            try:
                crc = decoded_pixels_crc32c(self._patches(buf, url, key, entries, decode_jpeg)
                                            for key, entries in index)
            except HdistillError:
                if name == REFERENCE:
                    raise
                continue                                    # damaged data: the reference decoder will say where
            if crc == shard.pixels_crc32c:
                self.jpeg_decoder = name
                return
            found.append(f"{describe_decoder(describe())}: CRC32C {crc}")
        raise HdistillError(
            f"{url}: its JPEG pixels decode here ({'; '.join(found)}) to other pixels than the teacher saw "
            f"({describe_decoder(self.manifest.pixels.decoder)}; CRC32C {shard.pixels_crc32c}): read the store with "
            "the Pillow and libjpeg-turbo that made it")

    def _view(self, buf, url: str, key: str, name: str, entries: dict[str, tuple[int, int]]) -> np.ndarray:
        """The array `name` of a sample: a view into the shard after its npy header is checked, or decoded from
        its JPEG or zstd frame."""
        member = self.members[name]
        if member not in entries:
            raise HdistillError(f"{url}: sample {key}: missing {member}")
        offset, size = entries[member]
        if member.endswith(".jpg"):
            return self._patches(buf, url, key, entries, DECODERS[self.jpeg_decoder][0])
        if member.endswith(".zst"):
            try:
                buf = zstd_decompress(buf[offset:offset + size])
            except ValueError as err:
                raise HdistillError(f"{url}: sample {key}: damaged {member} ({err})") from None
            offset, size = 0, len(buf)
        header, shape, dtype, count = self.expected[name]
        if size == len(header) + count * dtype.itemsize and bytes(buf[offset:offset + len(header)]) == header:
            return np.frombuffer(buf, dtype, count, offset + len(header)).reshape(shape)
        try:                                    # another header: an array of another shape, or another numpy's npy
            a = npy_load(bytes(buf[offset:offset + size]))
        except ValueError as err:
            raise HdistillError(f"{url}: sample {key}: damaged {name}.npy ({err})") from None
        self._check(url, key, name, a)
        return a

    def _patches(self, buf, url: str, key: str, entries: dict[str, tuple[int, int]], decode) -> np.ndarray:
        """A sample's pixels from its JPEG mosaic, uint8 [n, P, P, 3], decoded by `decode`."""
        (n, P, *_), _dtype = self.arrays["pixels"]
        member = self.members["pixels"]
        if member not in entries:
            raise HdistillError(f"{url}: sample {key}: missing {member}")
        offset, size = entries[member]
        return decode_patches(buf[offset:offset + size], n, P, self.manifest.layout.image_size // P,
                              f"{url}: sample {key}: {member}", decode)

    def _read_zarr(self, shard: ShardRecord, offsets: set[int] | None) -> Iterator[Sample]:
        where, layout = self.where(shard), self.manifest.layout
        records = read_region(self.store, self.manifest, shard.view, shard.index, ["valid", "image_id"])
        slots = np.flatnonzero(records["valid"])
        if offsets is not None:
            slots = slots[sorted(o for o in offsets if o < len(slots))]      # random access: only what is wanted
        base = layout.slot(shard.view, shard.index * layout.shard_size)
        for start in range(0, len(slots), ZARR_BLOCK):
            block = slots[start:start + ZARR_BLOCK]
            columns = read_slots(self.store, list(self.arrays), base + block, where)
            for j, i in enumerate(block):
                key = sample_key(str(records["image_id"][i]), shard.view)
                yield self._sample(where, key, shard.view, {name: col[j] for name, col in columns.items()}, None)

    def _check(self, where: str, key: str, name: str, a: np.ndarray):
        shape, dtype = self.arrays[name]
        if a.shape != tuple(shape) or a.dtype != dtype:
            raise HdistillError(f"{where}: sample {key}: {name} is {a.dtype}{list(a.shape)}, the manifest "
                                f"says {dtype}{list(shape)}")

    def _sample(self, where: str, key: str, view: int, arrays: dict[str, np.ndarray], view_json: bytes | None,
                checked: bool = False) -> Sample:
        if not checked:
            for name, a in arrays.items():
                self._check(where, key, name, a)
        stored = {name: a for name, a in arrays.items() if name not in PLAIN}
        return Sample(key, view, arrays["stage"], arrays["keep"], arrays["pixels"], self.specs, stored, view_json,
                      arrays.get("visible"))


def _npy_header(shape, dtype) -> bytes:
    """The bytes np.save writes before the data of an array of this shape and dtype."""
    count = int(np.prod(shape)) * np.dtype(dtype).itemsize
    data = npy_bytes(np.zeros(shape, dtype))
    return data[:len(data) - count]

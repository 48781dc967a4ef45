"""Reading a store: the samples of a shard from its webdataset tar or from its zarr region.

Both forms give the same samples in the same order (store order within the shard), with every
array checked against the manifest's shapes and dtypes, targets decoded from their encoding and
checked to be finite. Errors name the shard's file or zarr region and the sample.
"""
from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from hdistill.common.errors import HdistillError
from hdistill.common.specs import ViewRecord, sample_key
from hdistill.common.storage import Location, as_location

from .encoding import decode
from .format import FORMATS, ZARR_DIR, npy_load
from .manifest import Manifest, ShardRecord
from .zarr_store import read_region, read_slots

ZARR_BLOCK = 64   # slots read at a time from a zarr region: bounds a reader's memory on full stores


@dataclass
class Sample:
    """One stored sample, decoded: the mask, the pixels and the chosen targets (by target name).

    stage uint8 [N]; keep int16 [n]; pixels uint8 [n, P, P, 3]; targets: float16, or float32 for int8.
    """

    key: str
    stage: np.ndarray
    keep: np.ndarray
    pixels: np.ndarray
    targets: dict[str, np.ndarray] = field(default_factory=dict)
    record: ViewRecord | None = None    # the view record (webdataset json); None from zarr


class StoreReader:
    def __init__(self, store: str | Path | Location, manifest: Manifest, fmt: str = "wds",
                 targets: list[str] | None = None):
        if fmt not in FORMATS:
            raise HdistillError(f"unknown store format {fmt!r}; choose one of {', '.join(FORMATS)}")
        if fmt not in manifest.formats:
            raise HdistillError(f"--reader {fmt}: the store {store} holds only {','.join(manifest.formats)}")
        names = [t.name for t in manifest.targets] if targets is None else targets
        missing = [n for n in names if not manifest.has_target(n)]
        if missing:
            raise HdistillError(f"{store}: no target {', '.join(missing)} in the store "
                                f"(it holds {', '.join(t.name for t in manifest.targets)})")
        self.store, self.manifest, self.fmt = as_location(store), manifest, fmt
        self.specs = [manifest.target(n) for n in names]
        shapes = manifest.arrays()
        self.arrays = {n: shapes[n] for n in ("stage", "keep", "pixels")}
        for spec in self.specs:
            self.arrays.update(spec.arrays())

    def where(self, shard: ShardRecord) -> str:
        if self.fmt == "wds":
            return self.store.url_of(shard.file)
        return f"{self.store.url_of(ZARR_DIR)} shard {shard.name}"

    def read(self, shard: ShardRecord, offsets: set[int] | None = None) -> Iterator[Sample]:
        """The shard's samples in store order; only those at `offsets` (0-based within the shard) if given."""
        return self._read_wds(shard, offsets) if self.fmt == "wds" else self._read_zarr(shard, offsets)

    def _read_wds(self, shard: ShardRecord, offsets: set[int] | None) -> Iterator[Sample]:
        url = self.where(shard)
        last = max(offsets) if offsets else None
        with self.store.open(shard.file) as stream:
            yield from self._parse_wds(url, stream, offsets, last)

    def _parse_wds(self, url: str, stream, offsets: set[int] | None, last: int | None) -> Iterator[Sample]:
        """Samples of an opened tar stream, parsed by webdataset's own tar iterator and key grouping."""
        from webdataset.filters import reraise_exception
        from webdataset.tariterators import group_by_keys, tar_file_expander
        raws = group_by_keys(tar_file_expander([{"url": url, "stream": stream}], handler=reraise_exception,
                                               eof_value=None), handler=reraise_exception)
        for offset, raw in enumerate(raws):
            if offsets is not None and offset not in offsets:
                if last is not None and offset > last:
                    return                                  # nothing more wanted: stop reading the tar
                continue                                    # streamed past, not decoded
            key = raw["__key__"]
            arrays = {}
            for name in self.arrays:
                try:
                    arrays[name] = npy_load(raw[f"{name}.npy"])
                except (KeyError, ValueError) as err:
                    raise HdistillError(f"{url}: sample {key}: missing or damaged {name}.npy ({err})") from None
            record = ViewRecord.from_json(json.loads(raw["json"])) if "json" in raw else None
            yield self._sample(url, key, arrays, record)

    def _read_zarr(self, shard: ShardRecord, offsets: set[int] | None) -> Iterator[Sample]:
        where, layout = self.where(shard), self.manifest.layout
        records = read_region(self.store, self.manifest, shard.view, shard.index, ["valid", "image_id"])
        slots = np.flatnonzero(records["valid"])
        if offsets is not None:
            slots = slots[sorted(o for o in offsets if o < len(slots))]      # random access: only what is wanted
        base = layout.slot(shard.view, shard.index * layout.shard_size)
        for start in range(0, len(slots), ZARR_BLOCK):
            block = slots[start:start + ZARR_BLOCK]
            columns = read_slots(self.store, list(self.arrays), base + block)
            for j, i in enumerate(block):
                key = sample_key(str(records["image_id"][i]), shard.view)
                yield self._sample(where, key, {name: col[j] for name, col in columns.items()}, None)

    def _sample(self, where: str, key: str, arrays: dict[str, np.ndarray], record: ViewRecord | None) -> Sample:
        for name, (shape, dtype) in self.arrays.items():
            a = arrays[name]
            if a.shape != tuple(shape) or a.dtype != dtype:
                raise HdistillError(f"{where}: sample {key}: {name} is {a.dtype}{list(a.shape)}, the manifest "
                                    f"says {dtype}{list(shape)}")
        targets = {}
        for spec in self.specs:
            values = decode(spec, arrays)
            if not np.isfinite(values).all():
                raise HdistillError(f"{where}: sample {key}: {spec.name} holds NaN or Inf")
            targets[spec.name] = values
        return Sample(key, arrays["stage"], arrays["keep"], arrays["pixels"], targets, record)


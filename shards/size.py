"""What a store costs: bytes per view by webdataset entry, planned (before any teacher runs) or measured (from a
written shard), and what they come to for a dataset and for a GPU's reads."""
from __future__ import annotations

import numpy as np

from hdistill.common.storage import as_location

from . import tarindex
from .format import npy_bytes
from .manifest import Manifest

TAR_BLOCK = 512
STUDENT_RATE = 11_000        # samples/s of a ViT-B student on one H100 (the top of README's 6,000-11,000)
JSON_BYTES = 260             # a sample's json entry (the view record), about


def tar_member_bytes(size: float) -> float:
    """A tar member's bytes: its 512-byte header, then its data padded to 512 bytes (on average half a block)."""
    return TAR_BLOCK + size + (-size % TAR_BLOCK if float(size).is_integer() else TAR_BLOCK / 2)


def planned_view_bytes(manifest: Manifest, jpeg_bytes: float | None = None) -> dict[str, float]:
    """Entry -> bytes per view in a webdataset tar, tar headers included: npy arrays from their shapes, zstd frames
    as their npy (before compression), the JPEG as `jpeg_bytes` (an estimate)."""
    out = {"json": tar_member_bytes(JSON_BYTES)}
    shapes = manifest.arrays()
    for name, member in manifest.members().items():
        shape, dtype = shapes[name]
        size = jpeg_bytes if member.endswith(".jpg") else len(npy_bytes(np.zeros(shape, dtype)))
        out[member] = tar_member_bytes(size)
    return out | {"tar end": 2 * TAR_BLOCK / manifest.layout.shard_size}


def measured_view_bytes(shard_bytes) -> dict[str, float]:
    """Entry -> mean bytes per view in one loaded tar shard, tar headers included; "tar end": its closing blocks."""
    index = tarindex.samples(shard_bytes)
    out: dict[str, float] = {}
    for _key, entries in index:
        for member, (_offset, size) in entries.items():
            out[member] = out.get(member, 0.0) + tar_member_bytes(size) / len(index)
    out["tar end"] = (len(shard_bytes) - sum(out.values()) * len(index)) / len(index)
    return out


def store_view_bytes(store, manifest: Manifest) -> dict[str, float] | None:
    """measured_view_bytes of a store (a path, URL or Location), on its largest tar shard; None without one."""
    shards = [s for s in manifest.shards if s.file and s.samples]
    if not shards:
        return None
    buf, _ = as_location(store).load(max(shards, key=lambda s: s.samples).file)
    return measured_view_bytes(buf)


def size_lines(per_view: dict[str, float], images: int, views: int, notes: dict[str, str] | None = None,
               rate: int = STUDENT_RATE) -> list[str]:
    """The store's size and the reads it asks of a GPU, with each entry's share."""
    total = sum(per_view.values())
    notes = notes or {}
    lines = [f"{images:,} images x {views} views x {total / 1e3:.1f} kB per view = {human(images * views * total)}; "
             f"a GPU training at {rate:,} samples/s reads {total * rate / 1e9:.2f} GB/s"]
    for member, size in sorted(per_view.items(), key=lambda kv: -kv[1]):
        lines.append(f"  {member:28s} {size / 1e3:8.1f} kB  {100 * size / total:4.1f}%{notes.get(member, '')}")
    return lines


def human(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB", "PB"):
        if n < 1000 or unit == "PB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000

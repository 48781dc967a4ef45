"""webdataset tar shards, written deterministically so a rerun gives identical bytes.

Every member has mtime 0, mode 0444, uid/gid 0 and no user names; samples are written in
store order with their entries in StoredSample.entries() order. Plain `webdataset.WebDataset`
reads the shards; `iter_samples` is a dependency-free reader used by `verify`.
"""
from __future__ import annotations

import hashlib
import io
import tarfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from .atomic import atomic_open
from .format import StoredSample


class _HashingWriter:
    def __init__(self, f):
        self.f, self.sha, self.bytes = f, hashlib.sha256(), 0

    def write(self, data):
        self.sha.update(data)
        self.bytes += len(data)
        return self.f.write(data)


def write_shard(path: Path, samples: Iterable[StoredSample]) -> tuple[int, str]:
    """Write a tar shard atomically -> (bytes, sha256)."""
    with atomic_open(path) as f:
        out = _HashingWriter(f)
        with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tar:
            for sample in samples:
                for ext, data in sample.entries().items():
                    info = tarfile.TarInfo(f"{sample.key}.{ext}")
                    info.size, info.mtime, info.mode = len(data), 0, 0o444
                    tar.addfile(info, io.BytesIO(data))
    return out.bytes, out.sha.hexdigest()


def iter_samples(path: Path) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {entry: bytes}) for each sample of a shard, in order."""
    key, entries = None, {}
    with tarfile.open(path, "r|") as tar:
        for member in tar:
            name = member.name
            slash = name.rfind("/")
            dot = name.find(".", slash + 1)
            k, ext = name[:dot], name[dot + 1:]
            if k != key and entries:
                yield key, entries
                entries = {}
            key = k
            entries[ext] = tar.extractfile(member).read()
    if entries:
        yield key, entries

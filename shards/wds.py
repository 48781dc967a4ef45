"""webdataset tar shards, written deterministically so a rerun gives identical bytes.

Every member has mtime 0, mode 0444, uid/gid 0 and no user names; samples are written in
store order with their entries in StoredSample.entries() order. Plain `webdataset.WebDataset`
reads the shards (shards.reader does, for train and verify).
"""
from __future__ import annotations

import hashlib
import io
import tarfile
from collections.abc import Iterable

import google_crc32c

from hdistill.common.storage import Location

from .format import StoredSample


class _HashingWriter:
    def __init__(self, f):
        self.f, self.sha, self.crc, self.bytes = f, hashlib.sha256(), 0, 0

    def write(self, data):
        self.sha.update(data)
        self.crc = google_crc32c.extend(self.crc, bytes(data))
        self.bytes += len(data)
        return self.f.write(data)


def write_shard(store: Location, name: str, samples: Iterable[StoredSample],
                members: dict[str, str]) -> tuple[int, str, str]:
    """Write the tar shard `name` of the store, whole or not at all -> (bytes, sha256, crc32c); `members`: each
    array's entry (format.sample_members)."""
    with store.write(name) as f:
        out = _HashingWriter(f)
        with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tar:
            for sample in samples:
                for ext, data in sample.entries(members).items():
                    info = tarfile.TarInfo(f"{sample.key}.{ext}")
                    info.size, info.mtime, info.mode = len(data), 0, 0o444
                    tar.addfile(info, io.BytesIO(data))
    return out.bytes, out.sha.hexdigest(), f"{out.crc:08x}"

"""Small file helpers shared by precompute and the store."""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import BinaryIO


def stream_sha256(f: BinaryIO) -> str:
    """sha256 of what is left to read of an open binary file."""
    h = hashlib.sha256()
    for chunk in iter(lambda: f.read(1 << 20), b""):
        h.update(chunk)
    return h.hexdigest()


def file_sha256(path: str | Path) -> str:
    with open(path, "rb") as f:
        return stream_sha256(f)

"""Small file helpers shared by precompute and the store."""
from __future__ import annotations

import hashlib
import os
import shutil
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


class NewEntries:
    """What a run adds to its folder from now on, so that a run that fails before it has done anything can leave
    the folder as it found it (and remove it, if the run made it)."""

    def __init__(self, folder: Path):
        self.folder, self.existed = Path(folder), Path(folder).exists()
        self.before = set(os.listdir(folder)) if self.existed else set()

    def remove(self):
        if not self.folder.exists():
            return
        for name in set(os.listdir(self.folder)) - self.before:
            path = self.folder / name
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink()
        if not self.existed and not any(self.folder.iterdir()):
            self.folder.rmdir()

"""Files appear whole or not at all: write to a temporary name, fsync, rename."""
from __future__ import annotations

import errno
import os
from contextlib import contextmanager
from pathlib import Path

from hdistill.common.errors import HdistillError


def _fsync_dir(folder: Path):
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_error(path: Path, err: OSError) -> HdistillError:
    hint = {errno.ENOSPC: " (the disk is full)", errno.EACCES: " (no permission)",
            errno.EROFS: " (read-only file system)", errno.EDQUOT: " (disk quota exceeded)"}.get(err.errno, "")
    return HdistillError(f"cannot write {path}: {err.strerror}{hint}. Files already committed are intact; "
                         "free the space or fix the permissions and run the same command again to resume.")


@contextmanager
def atomic_open(path: str | Path):
    """Open a binary file for writing; on success it replaces `path` atomically."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise write_error(path, err) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write(path: str | Path, data: bytes):
    with atomic_open(path) as f:
        f.write(data)


def remove_stale_temporaries(path: str | Path):
    """Remove temporaries of `path` left by a killed writer. Only for files one process owns."""
    path = Path(path)
    for tmp in path.parent.glob(f".{path.name}.tmp-*"):
        tmp.unlink(missing_ok=True)

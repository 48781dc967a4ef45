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
            errno.EROFS: " (read-only file system)", errno.EDQUOT: " (disk quota exceeded)",
            errno.ENOTDIR: " (a folder on the way is a file)",
            errno.EFBIG: " (over the file size limit of this process: ulimit -f)"}.get(err.errno, "")
    return HdistillError(f"cannot write {path}: {err.strerror}{hint}. Files already committed are intact; "
                         "free the space or fix the path or permissions and run the same command again to resume.")


class _WriteErrors:
    """A binary file whose write errors are kept: torch.save reports a failed write as a RuntimeError of its own
    (`enforce fail at inline_container.cc`) that drops the OSError, which this keeps for the message."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data) -> int:
        try:
            return self.f.write(data)
        except OSError as err:
            self.error = err
            raise

    def __getattr__(self, name):
        return getattr(self.f, name)


@contextmanager
def atomic_open(path: str | Path):
    """Open a binary file for writing; on success it replaces `path` atomically. On failure nothing is left but
    what `path` held before, and the error names `path` and its cause (a full disk, a file in the way)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    f = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as raw:
            f = _WriteErrors(raw)
            yield f
            raw.flush()
            os.fsync(raw.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except OSError as err:
        _discard(tmp)
        raise write_error(path, err) from None
    except BaseException:
        _discard(tmp)
        if f is not None and f.error is not None:
            raise write_error(path, f.error) from None
        raise


def _discard(tmp: Path):
    try:
        tmp.unlink(missing_ok=True)
    except OSError:     # e.g. the folder on the way is a file: there is nothing to remove
        pass


def remove_stale_temporaries(path: str | Path):
    """Remove temporaries of `path` left by a killed writer. Only for files one process owns."""
    path = Path(path)
    for tmp in path.parent.glob(f".{path.name}.tmp-*"):
        _discard(tmp)

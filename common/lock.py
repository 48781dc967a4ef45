"""A lock on a file for this process's life: a second process that would write the same files is refused."""
from __future__ import annotations

import fcntl
import os
import warnings
from pathlib import Path

from hdistill.common.atomic import write_error
from hdistill.common.errors import HdistillError


def hold_lock(path: Path, what: str):
    """flock `path` (created) and write the holder into it; returns the open file, which holds the lock until it is
    closed. flock locks belong to the open file, so the kernel releases them when the process dies, SIGKILL
    included: a killed run's rerun is never locked out. On a file system without flock (some NFS mounts) it warns
    and returns the file unlocked. `what` names what the lock guards, for the refusal."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        f = open(path, "a+")
    except OSError as err:
        raise write_error(path, err) from None
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise HdistillError(f"{what} is being written by {holder} (lock {path}); wait for it to finish, or stop "
                            "it, then run again") from None
    except OSError as err:
        warnings.warn(f"{path}: cannot lock ({err.strerror}); this file system does not refuse a second writer of "
                      f"{what}, so start it once", stacklevel=2)
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {os.uname().nodename}\n")
    f.flush()
    return f

"""How hdistill's processes stop and report: loader workers that die with their parent, SIGTERM as a request to
stop, progress durations.

A batch scheduler (SLURM, Kubernetes, torchrun's agent) sends SIGTERM to every process of a job some time before
it kills them. The main process then finishes its step (train: writes a checkpoint; precompute: commits the
shards it has whole) and exits 128 + 15; its DataLoader workers ignore SIGTERM, so the main process does not lose
them mid-batch, and are killed by the kernel the moment their parent dies (for any reason, SIGKILL included), so
no orphan prints a traceback into the job's log.
"""
from __future__ import annotations

import ctypes
import functools
import os
import signal
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass

from .errors import HdistillError

PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class Failure:
    """An error that stops the run, met in a loader worker and sent to the main process as an item of the stream
    (start_workers raises it there): a user's message, not a worker's re-wrapped traceback."""

    message: str


def start_workers(loader):
    """iter(loader), its workers forked with SIGTERM blocked, so that none dies of a SIGTERM that arrives before its
    loader_worker_init has made it ignore the signal (the parent's arrives once it is unblocked); a Failure that a
    worker sends is raised here as an HdistillError."""
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    try:
        items = iter(loader)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
    return _raising(items)


def _raising(items):
    for item in items:
        if isinstance(item, Failure):
            raise HdistillError(item.message)
        yield item


def loader_worker_init(_worker_id: int = 0):
    """DataLoader worker_init_fn: ignore SIGTERM and SIGINT (the parent decides when to stop) and die with the
    parent."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
    parent = os.getppid()
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):    # not Linux: the worker's own parent checks remain
        return
    if os.getppid() != parent:           # the parent died before prctl took effect
        os._exit(1)


@functools.cache
def exit_with_launcher(what: str, every_s: float = 0.5):
    """Under torchrun: exit this process promptly when its launcher dies. torchrun starts each rank in a session of
    its own, so a SIGKILL of the launcher (or of its process group) does not reach the ranks: without this, a rank
    would wait in a collective for its peers until the collective's timeout, holding the run's lock, and the same
    command could not resume. A daemon thread watches the parent process (it becomes another when the launcher
    dies); the kernel releases the rank's locks and kills its loader workers as it exits. Once per process."""
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return
    launcher = os.getppid()

    def watch():
        while os.getppid() == launcher:
            time.sleep(every_s)
        print(f"{what}: its launcher (torchrun, pid {launcher}) died; exiting so that the run can resume: run the same "
              "command again", file=sys.stderr, flush=True)
        os._exit(1)
    threading.Thread(target=watch, name="hdistill-launcher-watch", daemon=True).start()


def duration(seconds: float) -> str:
    """H:MM:SS, for progress lines."""
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Stopped(Exception):
    """The run stopped at a clean point on a signal; the message says what was kept. Exit with `exit_code`."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


class StopRequest:
    """Set by SIGTERM while `listening()`; `signum` is the signal received, or None."""

    def __init__(self):
        self.signum: int | None = None

    def __bool__(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else ""

    @contextmanager
    def listening(self):
        if threading.current_thread() is not threading.main_thread():   # signals reach the main thread only
            yield self
            return
        previous = signal.signal(signal.SIGTERM, self._handle)
        try:
            yield self
        finally:
            signal.signal(signal.SIGTERM, previous)

    def _handle(self, signum, _frame):
        self.signum = signum

"""Where and how this process runs: its device, its CPUs, its rank, and whether it draws a progress bar. No torch
at import (the command line's --help stays fast)."""
from __future__ import annotations

import os
import sys

from .errors import HdistillError


def resolve_device(device: str, option: str = "--device") -> str:
    """auto -> cuda if there is one, else cpu; a bare "cuda" is this process's GPU under torchrun
    (cuda:LOCAL_RANK), so the ranks of one machine do not all land on cuda:0. A device this machine cannot give is
    refused naming `option`."""
    import torch
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        kind = torch.device(device).type
    except (RuntimeError, TypeError) as err:
        raise HdistillError(f"{option} {device!r}: not a torch device ({err})") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise HdistillError(f"{option} {device!r}: CUDA is not available on this machine; use cpu")
    if device == "cuda":
        return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    return device


def available_cpus() -> int:
    """CPUs this process may use, shared among the ranks torchrun starts on this machine."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cpus // int(os.environ.get("LOCAL_WORLD_SIZE", 1)))


def loader_workers(requested: int | None, default: int = 4) -> int:
    """Decoding processes: the default never exceeds the CPUs available; a larger request is capped."""
    cpus = available_cpus()
    if requested is None:
        return min(default, cpus)
    if requested > cpus:
        print(f"note: --workers {requested} capped at the {cpus} CPUs available to this process", file=sys.stderr)
    return min(requested, cpus)


def process_rank(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """(rank, world size): as given, else torchrun's / an array job's $RANK and $WORLD_SIZE, else (0, 1)."""
    rank = int(os.environ.get("RANK", 0)) if rank is None else rank
    world_size = int(os.environ.get("WORLD_SIZE", 1)) if world_size is None else world_size
    if not 0 <= rank < world_size:
        raise HdistillError(f"--rank {rank} is not in 0..{world_size - 1} (--world-size {world_size})")
    return rank, world_size


class ProgressOutput:
    """How a runtime with a `quiet` field reports progress: a bar on a terminal, plain lines in a scheduler's log."""

    quiet: bool

    @property
    def progress(self) -> bool:
        return not self.quiet and sys.stderr.isatty()

    @property
    def log_lines(self) -> bool:
        return not self.quiet and not sys.stderr.isatty()

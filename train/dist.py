"""torchrun / DDP plumbing: gloo on the CPU, nccl on GPUs; a single process needs none of it."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from hdistill.common.processes import exit_with_launcher


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str) -> tuple[DistInfo, str]:
    """Join the torchrun process group if there is one -> (info, this process's device)."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world == 1:
        return DistInfo(), device
    if device.startswith("cuda"):
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    exit_with_launcher(f"train rank {dist.get_rank()}")
    return DistInfo(dist.get_rank(), dist.get_world_size()), device


def mean_over_ranks(values: dict[str, torch.Tensor], info: DistInfo) -> dict[str, float]:
    stacked = torch.stack([v.detach().float() for v in values.values()])
    if info.world_size > 1:
        dist.all_reduce(stacked)
        stacked /= info.world_size
    return dict(zip(values, stacked.tolist()))


def sum_over_ranks(values: dict[str, float], info: DistInfo, device: str = "cpu") -> dict[str, float]:
    """Sums over ranks, in float64 on `device` (nccl reduces GPU tensors only); every rank passes the same
    keys (a rank with no data passes zeros)."""
    keys = sorted(values)
    stacked = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    if info.world_size > 1:
        dist.all_reduce(stacked)
    return dict(zip(keys, stacked.tolist()))


def barrier(info: DistInfo):
    if info.world_size > 1:
        dist.barrier()


def gather_objects(obj, info: DistInfo) -> list:
    """Every rank's `obj` (small, picklable), in rank order, on every rank."""
    if info.world_size == 1:
        return [obj]
    out = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out

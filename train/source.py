"""Where a run's targets come from: a TargetSource is built from a SourcePlan (what the run reads, and which share
of it this rank takes) and gives the loader a stream and a `prepare` step. The default reads the store's targets;
hdistill.online.LiveTargets computes the same targets live with the store's teachers."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

from hdistill.common.storage import Retry
from hdistill.common.targets import TargetSpec
from hdistill.shards.manifest import Manifest

from .data import StoreStream


@dataclass(frozen=True)
class SourcePlan:
    """What a source serves: the store's samples in the run's order, split over the ranks, on `device`."""

    shards: str                      # the store's path or URL
    manifest: Manifest
    targets: list[TargetSpec]        # the targets the loss uses
    mask: str                        # "progressive" | "none" | "random"
    seed: int
    lanes: int
    batch_size: int                  # global
    lane_buffer_mb: float
    rank: int
    world_size: int
    device: str
    format: str                      # "wds" | "zarr"
    retry: Retry

    def stream(self) -> StoreStream:
        return StoreStream(self.shards, self.manifest, self.targets, self.mask, self.seed, self.lanes,
                           self.batch_size, self.lane_buffer_mb, self.rank, self.world_size, self.format, self.retry)


class TargetSource(Protocol):
    stream: StoreStream              # the pieces the loader's workers make (StoreLoader joins them into batches)

    def prepare(self, batch: dict) -> dict:
        """A joined batch on the device -> {"count", "pixels", "keep", "targets"} as the student's step takes it."""

    def record(self) -> dict:
        """What the source is, for the checkpoint: a run resumes only from the same kind of source."""


SourceFactory = Callable[[SourcePlan], TargetSource]


class StoredTargets:
    """The default source: batches of stored targets, ready as they are."""

    def __init__(self, plan: SourcePlan):
        self.stream = plan.stream()

    @staticmethod
    def prepare(batch: dict) -> dict:
        return batch

    @staticmethod
    def record() -> dict:
        return {"source": "store"}

"""Where a run's targets come from: a TargetSource is built from a SourcePlan (what the run reads, and which share
of it this rank takes) and gives the loader a stream and a `prepare` step. The default reads the store's targets;
hdistill.online.LiveTargets computes the same targets live with the store's teachers."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

from .data import StoreStream, StreamSpec
from .loader import Store


@dataclass(frozen=True)
class SourcePlan:
    """What a source serves: the store's samples in the run's order (`spec`), split over the ranks, on `device`."""

    store: Store                     # the opened training store
    spec: StreamSpec                 # the targets the loss uses, the mask, the order and this rank's share
    device: str

    def stream(self) -> StoreStream:
        return self.store.stream(self.spec)


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

"""Where a run's targets come from: a TargetSource is built from a SourcePlan (what the run reads, and which share
of it this rank takes) and gives the loader a stream and a `prepare` step. The default reads the store's targets;
hdistill.online.LiveTargets computes the same targets live with the store's teachers; a sweep's members share one
stream of the store (SharedTargets), each taking its share of every batch (member_share)."""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Protocol

from hdistill.common.targets import KINDS
from hdistill.common.tokens import gather_along, gather_rows, token_index

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


def shared_stream(store: Store, specs: list[StreamSpec]) -> StoreStream:
    """One stream of `store` for several members' specs: the union of their targets, one mask or, when their masks
    differ, every patch of a full store with each member's patch choice alongside (StoreStream.selections)."""
    targets = {t.name: t for spec in specs for t in spec.targets}
    masks = sorted({spec.mask for spec in specs})
    mask = masks[0] if len(masks) == 1 else "none"
    ratios = tuple(sorted({r for spec in specs for r in spec.reconstruct}))
    stream = store.stream(replace(specs[0], targets=tuple(targets.values()), mask=mask, reconstruct=ratios))
    stream.selections = tuple(m for m in masks if m != mask)
    return stream


def member_share(batch: dict, spec: StreamSpec) -> dict:
    """A member's share of a shared_stream batch: its mask's patches and its targets (a batch of its mask as is)."""
    selections = batch.get("selections", {})
    if spec.mask not in selections:
        return batch
    sel = selections[spec.mask]                                        # [B, n] of the batch's N patches
    return {"count": batch["count"], "pixels": gather_rows(batch["pixels"], sel),     # (no "visible": mask "none")
            "keep": gather_along(batch["keep"], 1, sel),
            "targets": {t.name: KINDS[t.kind].gather(batch["targets"][t.name], token_index(sel, t.cls))
                        for t in spec.targets}}


class SharedTargets:
    """Several members' target sources over one stream of the store (a sweep's): `member(plan)` for each, then
    `build()` once."""

    def __init__(self):
        self.plans: list[SourcePlan] = []
        self.stream = None

    def member(self, plan: SourcePlan) -> "MemberTargets":
        self.plans.append(plan)
        return MemberTargets(self, plan)

    def build(self):
        self.stream = shared_stream(self.plans[0].store, [plan.spec for plan in self.plans])


class MemberTargets:
    """One member's view of the shared batch (member_share), read from the store as StoredTargets reads it."""

    def __init__(self, shared: SharedTargets, plan: SourcePlan):
        self.shared, self.plan = shared, plan

    @property
    def stream(self):
        return self.shared.stream

    def prepare(self, batch: dict) -> dict:
        return member_share(batch, self.plan.spec)

    record = staticmethod(StoredTargets.record)

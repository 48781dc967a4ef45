"""`hdistill train`: a run's plan (the opened store, the run's length, its lanes), its members built from their
options, and the loop that steps them (train.loop). No teacher is loaded: targets come from the store, or from a
source given (train.source).

The run counts steps; `--epochs` converts to steps from the store's sample count. Under torchrun each rank reads
its lanes and takes --batch-size / world_size samples of every global batch; the checkpoint keeps the loader's
global position; rank 0 writes the files (train.checkpoint).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

from hdistill.common.errors import HdistillError
from hdistill.shards.manifest import Manifest

from .checkpoint import EXPORT, RunFolder
from .config import TrainConfig, TrainRuntime
from .data import AllSamples, StreamSpec, check_lanes, check_mask, default_lanes, epoch_samples, steps_per_epoch
from .dist import DistInfo, init_distributed
from .loader import Store, StoreLoader
from .loop import Loop
from .member import Member
from .source import SourceFactory, SourcePlan, StoredTargets, shared_stream
from .validate import open_val_store, val_targets


def total_steps(cfg: TrainConfig, manifest: Manifest) -> int:
    if (cfg.steps is None) == (cfg.epochs is None):
        raise HdistillError("give exactly one of --steps and --epochs")
    if cfg.steps is not None:
        return cfg.steps
    full, frac = int(cfg.epochs), cfg.epochs - int(cfg.epochs)
    lanes = cfg.lanes or default_lanes(cfg.batch_size)
    steps = [steps_per_epoch(epoch_samples(manifest, e), lanes, cfg.batch_size) for e in range(full + 1)]
    return max(1, sum(steps[:full]) + int(frac * steps[full]))


def epochs_reached(manifest: Manifest, steps: int, lanes: int, batch_size: int) -> int:
    """The epochs `steps` steps reach into (the last may be partial)."""
    epoch, done = 0, 0
    while done < steps:
        per_epoch = steps_per_epoch(epoch_samples(manifest, epoch), lanes, batch_size)
        if per_epoch == 0:
            break
        done, epoch = done + per_epoch, epoch + 1
    return epoch


@dataclass
class RunPlan:
    """What every member of a run shares: the opened store, the run's length, its lanes and this process's place."""

    store: Store
    rt: TrainRuntime                 # resolved: its device is this rank's
    dist: DistInfo
    steps: int
    epochs: int                      # the epochs the steps reach into
    lanes: int
    batch_size: int                  # global
    val_every: int
    warnings: list[str] = field(default_factory=list)   # what the data and options say, shown once the run starts
    stores: dict = field(default_factory=dict)          # the manifests' digests, which a resume must find again
    val_store: Store | None = None                      # the held-out store (--val-shards)

    @property
    def local_batch(self) -> int:
        return self.batch_size // self.dist.world_size

    def views_read(self) -> range:
        """The store's views the run's epochs read (epoch e reads view e mod V)."""
        return range(min(self.store.manifest.layout.views, self.epochs))


def plan_run(cfg: TrainConfig, rt: TrainRuntime) -> RunPlan:
    """The options every member shares: the store, the held-out store (opened once), the length, the lanes (checked
    by check_batches once the members are built, whose refusals come first)."""
    rt = rt.resolved()
    dist, device = init_distributed(rt.device)
    rt = replace(rt, device=device)
    store = Store(cfg.shards, rt.format)
    manifest = store.manifest
    steps = total_steps(cfg, manifest)
    lanes = cfg.lanes or default_lanes(cfg.batch_size)
    plan = RunPlan(store, rt, dist, steps, epochs_reached(manifest, steps, lanes, cfg.batch_size), lanes,
                   cfg.batch_size, cfg.val_every, stores={"shards": manifest.digest(), "val_shards": None})
    if cfg.val_shards:
        plan.val_store, warnings = open_val_store(cfg.val_shards, cfg.shards, manifest)
        plan.warnings += warnings
        plan.stores["val_shards"] = plan.val_store.manifest.digest()
    return plan


def check_batches(plan: RunPlan):
    """The global batch against the lanes, the ranks, the store's epoch and the loader processes."""
    lanes, batch_size, ranks, workers = plan.lanes, plan.batch_size, plan.dist.world_size, plan.rt.workers
    check_lanes(lanes, batch_size, ranks)
    samples = epoch_samples(plan.store.manifest, 0)
    if steps_per_epoch(samples, lanes, batch_size) == 0:
        raise HdistillError(f"--batch-size {batch_size}: the store's epoch holds {samples} samples, too few for one "
                            f"global batch of {batch_size} over {lanes} lanes; give a smaller --batch-size (or "
                            "--lanes)")
    lanes_here = lanes // ranks
    if workers > lanes_here:
        plan.warnings.append(f"--workers {workers}: each rank reads {lanes_here} lane(s), and a lane is read by one "
                             f"loader process, so {workers - lanes_here} of them would have nothing to read and "
                             f"{lanes_here} are started; give --lanes a multiple of {ranks * workers} (ranks x "
                             "workers) to use them all")


def build_member(cfg: TrainConfig, plan: RunPlan, folder: RunFolder, source: SourceFactory, name: str) -> Member:
    """A member with its folder, its target source (the run's share of every global batch) and, with
    --val-shards, what it reads of the held-out store."""
    member = Member(cfg, plan.store.manifest, plan.steps, plan.dist, plan.rt.device, plan.rt.compile, name)
    member.folder = folder
    mask = check_mask(plan.store.manifest, cfg.mask)
    targets = tuple(t.target for t in member.terms)
    ratios = (cfg.reconstruct,) if cfg.reconstruct else ()
    member.source = source(SourcePlan(plan.store, StreamSpec(
        targets, mask, cfg.seed, plan.lanes, cfg.batch_size, cfg.lane_buffer_mb, plan.dist.rank,
        plan.dist.world_size, plan.rt.retry, ratios), plan.rt.device))
    if plan.val_store is not None:
        rows = val_targets(plan.val_store, plan.store.manifest, list(targets), mask)
        member.val_spec = StreamSpec(tuple(rows), mask, cfg.seed, rank=plan.dist.rank,
                                     world_size=plan.dist.world_size, retry=plan.rt.retry, reconstruct=ratios)
    return member


def make_loop(plan: RunPlan, members: dict[str, Member], folder: RunFolder, **loop) -> Loop:
    """The loop over the members' stream (the first member's source's: a sweep's members share theirs) and, with
    --val-shards, one pass over the held-out store for every member."""
    check_batches(plan)
    first = next(iter(members.values()))
    stream = first.source.stream
    stream.check_present(plan.views_read())
    val = None
    if plan.val_store is not None:
        val_stream = shared_stream(plan.val_store, [m.val_spec for m in members.values()])
        val_stream.check_present([0])
        val = AllSamples(val_stream, plan.local_batch)
    return Loop(plan, members, StoreLoader(stream, plan.rt.workers, plan.rt.device), val, folder, **loop)


def solo(cfg: TrainConfig, out: str, rt: TrainRuntime, source: SourceFactory = StoredTargets) -> Loop:
    """`hdistill train`'s loop: one member, whose folder is the run's."""
    plan = plan_run(cfg, rt)
    folder = RunFolder(out, "the run", plan.dist.main)
    return make_loop(plan, {"train": build_member(cfg, plan, folder, source, "train")}, folder)


def run_train(cfg: TrainConfig, out: str, rt: TrainRuntime, source: SourceFactory = StoredTargets) -> Path:
    solo(cfg, out, rt, source).run()
    return Path(out) / EXPORT

"""The public loader: a store's batches for any training loop, the same batches `hdistill train` steps on.

    import hdistill
    store = hdistill.open_store("s3://bucket/store")          # or a local path
    loader = store.loader(batch_size=256, targets=["feat.clip", "rel.mae.b9", "rel.mae.b10"],
                          seed=0, rank=0, world_size=1, workers=0, device="cpu")
    for batch in loader:               # one epoch from the loader's position, then the next epoch
        batch["pixels"], batch["keep"], batch["targets"]["feat.clip"]      # torch tensors on `device`
    state = loader.state_dict()        # {"epoch", "batch"}: load_state_dict resumes exactly, on any rank count

`batch_size` is the global batch; rank r of `world_size` gets its share of each global batch (the lanes
l with l % world_size == r). The order is a function of (seed, epoch, lanes, batch size) alone (EpochPlan).
"""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch

from hdistill.common.errors import HdistillError
from hdistill.common.processes import loader_worker_init, start_workers
from hdistill.common.runtime import resolve_device
from hdistill.common.storage import Buffers, Retry, as_location
from hdistill.common.targets import TargetSpec
from hdistill.shards.encoding import decode_batch
from hdistill.shards.manifest import Manifest, read_manifest

from .data import (MASKS, BatchRing, StoreStream, StreamSpec, check_lanes, check_mask, default_lanes, default_format,
                   epoch_samples, join, pinned_memory)


PREFETCH = 2      # pieces a DataLoader worker makes ahead (DataLoader's prefetch_factor)
BATCHES_KEPT = 4  # joined batches' memory kept for reuse: about what a training loop and its prefetch hold


class StoreLoader:
    """Local batches of a StoreStream, epoch after epoch, from a position (epoch, batch of the epoch). Each batch
    joins this rank's pieces of one global batch in lane order; DataLoader workers share the rank's lanes. The
    position counts what the caller was given: after an epoch's last batch it is the next epoch's start, whether
    the caller took the epoch to its end or stopped right after its last batch."""

    def __init__(self, stream: StoreStream, workers: int = 0, device: str = "cpu", epoch: int = 0, batch: int = 0):
        self.stream, self.workers, self.device = stream, workers, device
        self.epoch, self.batch = epoch, batch
        self._rings: dict[int, BatchRing] = {}          # worker count -> its workers' shared batch memory
        self._rings_in_use: set[int] = set()
        self._batch_memory = Buffers(BATCHES_KEPT)     # joined batches' memory, reused (workers only)

    def __len__(self) -> int:
        """Global batches of the current epoch."""
        return self._steps(self.epoch)

    def _steps(self, epoch: int) -> int:
        return self.stream.plan(epoch).steps

    def state_dict(self) -> dict:
        self._settle()
        return {"epoch": self.epoch, "batch": self.batch}

    def load_state_dict(self, state: dict):
        """A position as state_dict() gives it; one the store does not have is refused."""
        if not isinstance(state, dict) or set(state) != {"epoch", "batch"} or \
                not all(isinstance(state[k], int) and not isinstance(state[k], bool) for k in state):
            raise HdistillError(f"load_state_dict: expected {{'epoch': int, 'batch': int}} as state_dict() gives it, "
                                f"got {state!r:.200}")
        epoch, batch = state["epoch"], state["batch"]
        if epoch < 0 or batch < 0 or batch > self._steps(max(epoch, 0)):
            raise HdistillError(f"load_state_dict: {{'epoch': {epoch}, 'batch': {batch}}} is not a position of this "
                                f"loader: epochs count from 0, and epoch {max(epoch, 0)} has "
                                f"{self._steps(max(epoch, 0))} batches")
        self.epoch, self.batch = epoch, batch

    def _settle(self):
        """A position at an epoch's end is the next epoch's start."""
        if self.batch and self.batch >= self._steps(self.epoch):
            self.epoch, self.batch = self.epoch + 1, 0

    def __iter__(self) -> Iterator[dict]:
        """The rest of the current epoch; the position then moves to the start of the next one. On CUDA the next
        batch is copied to the device on a side stream while the current one is used (as timm's PrefetchLoader)."""
        self._settle()
        stream = self.stream
        stream.set_epoch(self.epoch, self.batch)
        if stream.plan().steps == 0:
            raise HdistillError(f"epoch {self.epoch} holds {epoch_samples(stream.manifest, self.epoch)} samples: too "
                                f"few for one global batch of {stream.spec.batch_size}")
        epoch, batches = self.epoch, self._joined(self.batch)
        for index, batch in _prefetched(batches, self.device, stream.batch_specs) if self.device.startswith("cuda") else \
                ((i, decoded(to_device(b, self.device), stream.batch_specs)) for i, b in batches):
            # the position counts what the caller was given (a state_dict() taken after an epoch's last batch has
            # already moved it to the next epoch's start)
            self.epoch, self.batch = epoch, index + 1
            yield batch
        self.epoch, self.batch = epoch + 1, 0

    def _joined(self, start: int) -> Iterator[tuple[int, dict]]:
        """(batch index, this rank's pieces of that global batch joined in lane order) from batch `start` on."""
        stream = self.stream
        lanes = stream.my_lanes()
        # its own generator: making the iterator draws a seed, which must not shift the global RNG that a student's
        # stochastic depth uses (a resume makes the iterator at another point of the RNG stream)
        workers, cuda = min(self.workers, len(lanes)), self.device.startswith("cuda")
        # workers write into shared memory made here (BatchRing), which the joined batch copies out of, pinned on CUDA
        stream.ring = ring = self._ring(workers) if workers else None
        loader = torch.utils.data.DataLoader(
            stream, batch_size=None, num_workers=workers, pin_memory=cuda and not workers,
            prefetch_factor=PREFETCH if workers else None, worker_init_fn=loader_worker_init,
            generator=torch.Generator().manual_seed(stream.spec.seed * 100_003 + self.epoch))
        # the joined batch: pinned for the copy to a GPU, else reused once no tensor of an earlier batch views it
        memory = None if not workers else pinned_memory if cuda else self._batch_memory.take
        pending: dict[int, list[dict]] = {}
        index, per_lane = start, stream.spec.batch_size // stream.spec.lanes
        pieces = start_workers(loader)
        try:
            for piece in pieces:
                if ring:
                    piece["samples"] = ring.filled(piece["samples"], piece["worker"], piece["slot"])
                pending.setdefault(piece["batch"], []).append(piece)
                while sum(len(p["lanes"]) for p in pending.get(index, ())) == len(lanes):
                    ready = pending.pop(index)
                    batch = join([(p["lanes"], p["samples"]) for p in ready], lanes, per_lane, memory)
                    for p in ready if ring else ():
                        ring.release(p["worker"])
                    yield index, batch
                    index += 1
        finally:
            pieces.close()                     # the workers stop here, before the ring may serve another epoch
            self._rings_in_use.discard(id(ring))

    def _ring(self, workers: int) -> BatchRing:
        """The shared batch memory of an epoch's workers: made once for this worker count and piece shapes, reused
        by the next epoch (its workers are forked from this process, so they inherit it); a new one while an
        earlier epoch's iterator, and so maybe its workers, still uses it."""
        stream, lanes = self.stream, self.stream.my_lanes()
        pieces = {w: stream.piece_arrays(len(lanes[w::workers]) * stream.spec.batch_size // stream.spec.lanes)
                  for w in range(workers)}
        ring = self._rings.get(workers)
        if ring is None or ring.pieces != pieces or id(ring) in self._rings_in_use:
            ring = self._rings[workers] = BatchRing(pieces, PREFETCH + 2)
        ring.reset()
        self._rings_in_use.add(id(ring))
        return ring


def _prefetched(batches: Iterator[tuple[int, dict]], device: str, specs: list[TargetSpec]) -> Iterator[tuple[int, dict]]:
    """Batches moved to a CUDA device one ahead, on a side stream; each is handed over once the compute stream
    waits for its copy."""
    side = torch.cuda.Stream(device)
    ahead = None
    for index, batch in batches:
        with torch.cuda.stream(side):
            moved = decoded(to_device(batch, device), specs)
        if ahead is not None:
            yield ahead
        current = torch.cuda.current_stream(device)
        current.wait_stream(side)
        for t in _tensors(moved):
            t.record_stream(current)          # allocated on the side stream, used on the compute stream
        ahead = index, moved
    if ahead is not None:
        yield ahead


def _tensors(batch) -> Iterator[torch.Tensor]:
    if isinstance(batch, torch.Tensor):
        yield batch
    elif isinstance(batch, dict):
        for value in batch.values():
            yield from _tensors(value)


def decoded(batch: dict, specs: list[TargetSpec]) -> dict:
    """The targets decoded by their encodings (`specs`: the store's rows) where the batch now is (on the device:
    int8 crossed the bus as int8), the companion arrays dropped."""
    if "companions" not in batch:
        return batch
    out = {k: v for k, v in batch.items() if k != "companions"}
    out["targets"] = decode_batch(specs, {**batch["targets"], **batch["companions"]})
    return out


def to_device(batch, device: str):
    """Every tensor of a batch (dicts nested) on `device`, copied without waiting (from pinned memory on CUDA)."""
    if device == "cpu":
        return batch
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {key: to_device(value, device) for key, value in batch.items()}
    return batch


class Store:
    """A complete store, opened for reading: its manifest, the form it is read in (`format`: wds when it holds it,
    else zarr), and streams and loaders over it. The one way a store is opened for training, validation, sweeps,
    online runs and the public API."""

    def __init__(self, path: str | Path, format: str | None = None):
        self.path = str(path)
        self.location = as_location(self.path)
        self.manifest: Manifest = read_manifest(self.location)
        if not self.manifest.complete:
            raise HdistillError(f"--shards {self.path}: the store is not complete; finish its precompute run first")
        if format is not None and format not in self.manifest.formats:
            raise HdistillError(f"--format {format}: the store {self.path} holds only "
                                f"{','.join(self.manifest.formats)}")
        self.format = format or default_format(self.manifest)

    def __str__(self):
        return self.path

    def stream(self, spec: StreamSpec) -> StoreStream:
        return StoreStream(self, spec)

    @property
    def targets(self) -> list[str]:
        return [t.name for t in self.manifest.targets]

    def loader(self, batch_size: int, targets: list[str] | None = None, seed: int = 0, rank: int = 0,
               world_size: int = 1, workers: int = 0, device: str = "cpu", mask: str = "progressive",
               lanes: int | None = None, buffer_mb: float = 64.0, retry: Retry = Retry()) -> StoreLoader:
        """A loader of global batches of `batch_size` (`targets`: target names, None for all of the store's)."""
        _check_arguments(batch_size=batch_size, rank=rank, world_size=world_size, workers=workers, seed=seed)
        if targets is not None and (isinstance(targets, str) or not all(isinstance(t, str) for t in targets)):
            raise HdistillError(f"targets {targets!r}: give a list of target names, e.g. {self.targets[:1]} (the "
                                f"store holds {', '.join(self.targets)}), or None for all of them")
        if not 0 <= rank < world_size:
            raise HdistillError(f"rank {rank}: not a rank of world_size {world_size} (0 to {world_size - 1})")
        if mask not in MASKS:
            raise HdistillError(f"mask {mask!r}: choose one of {', '.join(MASKS)}")
        if not (isinstance(buffer_mb, (int, float)) and buffer_mb > 0):
            raise HdistillError(f"buffer_mb {buffer_mb!r}: give a positive size in MB")
        device = resolve_device(device, "device")
        specs = self.manifest.targets if targets is None else self.manifest.targets_named(list(targets), self.path)
        lanes = lanes or default_lanes(batch_size)
        check_lanes(lanes, batch_size, world_size)
        stream = self.stream(StreamSpec(tuple(specs), check_mask(self.manifest, mask), seed, lanes, batch_size,
                                        buffer_mb, rank, world_size, retry))
        stream.check_present(range(self.manifest.layout.views))
        return StoreLoader(stream, workers, device)


def _check_arguments(**values):
    """Integer arguments: batch_size and world_size at least 1, the others at least 0."""
    for name, value in values.items():
        least = 1 if name in ("batch_size", "world_size") else 0
        if not isinstance(value, int) or isinstance(value, bool) or value < least:
            raise HdistillError(f"{name} {value!r}: give an integer of at least {least}")


def open_store(path: str, format: str | None = None) -> Store:
    """A complete store (a local folder or an s3://, gs://, http(s):// URL) opened for reading."""
    return Store(path, format)

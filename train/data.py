"""The loader: stream a store's webdataset shards into batches of student inputs and targets.

Epoch e reads the shards of view e % V only (each epoch sees a different view of every image,
cycling), in the order of an EpochPlan: shuffled shards cut into lanes, each lane through a seeded
shuffle buffer, every global batch a share of every lane; a rank reads its lanes, its DataLoader
workers share them. Only the entries the run needs are decoded.

Mask strategies: "progressive" uses the stored mask (a kept store holds just those tokens; a full
store is sliced at stage == 0); "none" keeps every patch and "random" keeps a random set of the
same size as the progressive mask; both need a full store.
"""
from __future__ import annotations

import itertools
import math
import random
import time
import zlib
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np
import torch

from hdistill.common.errors import HdistillError
from hdistill.common.processes import Failure
from hdistill.common.storage import Retry, error_text, transient
from hdistill.common.targets import KINDS, TargetSpec
from hdistill.common.tokens import random_masking
from hdistill.shards.encoding import encoding_of, target_arrays
from hdistill.shards.format import sample_arrays
from hdistill.shards.manifest import Manifest
from hdistill.shards.reader import Sample, StoreReader

if TYPE_CHECKING:
    from .loader import Store

MASKS = ("progressive", "none", "random")


def default_format(manifest: Manifest) -> str:
    """wds when the store holds it (streamed), else zarr."""
    return "wds" if "wds" in manifest.formats else manifest.formats[0]


def check_mask(manifest: Manifest, mask: str) -> str:
    if mask not in MASKS:
        raise HdistillError(f"--mask {mask!r}: choose one of {', '.join(MASKS)}")
    if mask != "progressive" and manifest.tokens != "full":
        raise HdistillError(f"--mask {mask} needs a store made with --tokens full; this one holds only the "
                            "progressive mask's tokens (--tokens kept)")
    return mask


def join(pieces: list[tuple[list[int], dict]], lanes: list[int], per_lane: int, memory=None) -> dict:
    """A rank's batch from its workers' pieces, each (its lanes, ascending; their samples collated lane after lane):
    tensors and lists in the order of `lanes`, counts added, dicts key by key. One piece of all the lanes is the
    batch as it is unless `memory` is given; otherwise every array is copied once, lane by lane, into memory that
    `memory(bytes)` gives (a uint8 array: reused, or pinned for the copy to a GPU), one block for the batch."""
    if len(pieces) == 1 and pieces[0][0] == lanes and memory is None:
        return pieces[0][1]
    where = {lane: (k, j) for k, (piece_lanes, _) in enumerate(pieces) for j, lane in enumerate(piece_lanes)}
    order = [where[lane] for lane in lanes]                  # lane l's samples: piece k, rows j * per_lane onwards
    parts = [p for _, p in pieces]
    rows = len(order) * per_lane
    block = (memory or new_memory)(sum(_aligned(rows * t[0].nbytes) for t in _tensors_of(parts[0])))
    return _placed(parts, order, per_lane, _Carved(block))


def new_memory(size: int) -> np.ndarray:
    return np.empty(size, np.uint8)


def pinned_memory(size: int) -> np.ndarray:
    return torch.empty(size, dtype=torch.uint8, pin_memory=True).numpy()


def _aligned(size: int) -> int:
    return -(-size // 64) * 64


def _tensors_of(tree: dict):
    for value in tree.values():
        if isinstance(value, dict):
            yield from _tensors_of(value)
        elif isinstance(value, torch.Tensor):
            yield value


class _Carved:
    """Arrays cut one after the other from one uint8 block, each at a 64-byte boundary."""

    def __init__(self, block: np.ndarray):
        self.block, self.used = block, 0

    def __call__(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        size = math.prod(shape) * dtype.itemsize
        out = self.block[self.used:self.used + size].view(dtype).reshape(shape)
        self.used += _aligned(size)
        return out


def _placed(parts: list[dict], order: list[tuple[int, int]], per_lane: int, carve: _Carved) -> dict:
    out = {}
    for key, value in parts[0].items():
        values = [p[key] for p in parts]
        if isinstance(value, dict):
            out[key] = _placed(values, order, per_lane, carve)
        elif isinstance(value, (torch.Tensor, list)):
            rows = [values[k][j * per_lane:(j + 1) * per_lane] for k, j in order]
            if isinstance(value, torch.Tensor):       # copied by numpy, on this thread: torch.cat's threads would
                arrays = [r.numpy() for r in rows]    # spin on the workers' cores
                joined = carve((sum(len(a) for a in arrays), *arrays[0].shape[1:]), arrays[0].dtype)
                np.concatenate(arrays, out=joined)
                out[key] = torch.from_numpy(joined)
            else:
                out[key] = [r for rs in rows for r in rs]
        else:
            out[key] = sum(values)
    return out


class EpochPlan:
    """The global order of one epoch's samples: a function of the store, (seed, epoch), the lane count and
    the batch size alone, never of the number of ranks or loader workers.

    The view's shards are shuffled by (seed, epoch) and their samples concatenated; the sequence is cut
    into `lanes` contiguous, equal lanes, and each lane passes a bounded shuffle (a buffer of
    `buffer` samples, seeded by (seed, epoch, lane)). Global batch b takes the next batch/lanes samples
    of every lane, in lane order, so every batch mixes `lanes` distant parts of the store. Rank r of W
    reads the lanes l with l % W == r: its share of every global batch, and only those lanes' shards.
    """

    def __init__(self, manifest: Manifest, seed: int, epoch: int, lanes: int, batch_size: int, buffer: int):
        self.seed, self.epoch, self.lanes, self.buffer = seed, epoch, lanes, buffer
        self.shards = [s for s in manifest.view_shards(epoch % manifest.layout.views) if s.samples]
        random.Random(f"{seed}-{epoch}").shuffle(self.shards)
        self.starts = np.cumsum([0] + [s.samples for s in self.shards])         # epoch index of each shard's first
        total = int(self.starts[-1])
        self.bounds = [total * lane // lanes for lane in range(lanes + 1)]      # lane l: [bounds[l], bounds[l+1])
        self.per_lane = batch_size // lanes
        self.steps = steps_per_epoch(total, lanes, batch_size)

    def emission(self, lane: int) -> list[int]:
        """Lane-local indices in the order the lane emits them (the bounded shuffle, run on indices only)."""
        rng = random.Random(f"{self.seed}-{self.epoch}-lane{lane}")
        out, buffer = [], []
        for i in range(self.bounds[lane + 1] - self.bounds[lane]):
            if len(buffer) < self.buffer:
                buffer.append(i)
                continue
            j = rng.randrange(len(buffer))
            out.append(buffer[j])
            buffer[j] = i
        rng.shuffle(buffer)
        return out + buffer

    def locate(self, lane: int, indices) -> dict[int, dict[int, int]]:
        """Lane-local indices -> {shard number: {offset in the shard: lane-local index}}, shards in order."""
        where: dict[int, dict[int, int]] = {}
        for i in sorted(indices):
            e = self.bounds[lane] + i
            k = int(np.searchsorted(self.starts, e, side="right")) - 1
            where.setdefault(k, {})[e - int(self.starts[k])] = i
        return where


def steps_per_epoch(samples: int, lanes: int, batch_size: int) -> int:
    """Full global batches of an epoch: every lane gives batch/lanes samples to each."""
    return (samples // lanes) // (batch_size // lanes)


def batch_tensor(name: str, shape: tuple[int, ...], dtype) -> torch.Tensor:
    """A new, uninitialised batch array of a process without loader workers (`name` is for BatchRing's reuse)."""
    return torch.empty(shape, dtype=torch_dtype(dtype))


def torch_dtype(dtype) -> torch.dtype:
    return torch.from_numpy(np.empty(0, dtype)).dtype


class BatchRing:
    """The batch arrays of loader workers, in shared memory that the main process makes before its workers start
    (they inherit it) and reuses from epoch to epoch: a piece crosses to the main process as its slot number alone,
    with no file descriptor to pass and no fresh page to fault in.

    `pieces`: worker -> its piece's arrays, name -> (shape, dtype) (StoreStream.piece_arrays). Worker w writes its
    j-th piece of an epoch into slot j % `slots` of its own, once the main process has released its piece j - slots:
    the main copies each batch's pieces into the batch it hands out (StoreLoader: `join`), then releases them
    (`released[w]` counts worker w's released pieces). DataLoader asks a worker for at most prefetch_factor pieces
    ahead of what the main process has received, so with slots = prefetch_factor + 2 a worker never waits;
    next_slot's wait is the guard that makes the reuse safe whatever asks.
    """

    WAIT_S = 600.0

    def __init__(self, pieces: dict[int, dict[str, tuple]], slots: int):
        self.pieces, self.slots = pieces, slots
        self.released = torch.zeros(len(pieces), dtype=torch.int64).share_memory_()
        self.arrays = {(w, slot, name): torch.empty(shape, dtype=torch_dtype(dtype)).share_memory_()
                       for w, arrays in pieces.items() for slot in range(slots)
                       for name, (shape, dtype) in arrays.items()}
        self.made = 0                       # pieces made this epoch: the worker's own count (forked at 0)

    def reset(self):
        """A new epoch, its workers not yet started: no piece made or released."""
        self.released.zero_()
        self.made = 0

    def next_slot(self, worker: int) -> int:
        """This worker's slot for its next piece, once the main process has released what the slot held."""
        deadline = time.monotonic() + self.WAIT_S
        while int(self.released[worker]) < self.made - self.slots + 1:
            if time.monotonic() > deadline:
                raise HdistillError(f"loader worker {worker}: the main process released no batch memory for "
                                    f"{self.WAIT_S:.0f} s")
            time.sleep(1e-4)
        slot, self.made = self.made % self.slots, self.made + 1
        return slot

    def maker(self, worker: int, slot: int):
        """collate's `array` for a piece in this slot: the slot's array of each name."""
        def array(name, shape, dtype):
            out = self.arrays[(worker, slot, name)]
            assert out.shape == tuple(shape) and out.dtype == torch_dtype(dtype), (name, out.shape, shape)
            return out
        return array

    def stripped(self, piece: dict, worker: int, slot: int) -> dict:
        """The piece with each of the slot's arrays replaced by its name (what crosses to the main process)."""
        own = {id(self.arrays[(worker, slot, name)]): name for name in self.pieces[worker]}
        return _mapped(piece, lambda t: _InSlot(own[id(t)]) if id(t) in own else t)

    def filled(self, piece: dict, worker: int, slot: int) -> dict:
        """A stripped piece with the main process's views of the slot's arrays back in place."""
        return _mapped(piece, lambda v: self.arrays[(worker, slot, v.name)] if isinstance(v, _InSlot) else v)

    def release(self, worker: int):
        self.released[worker] += 1


@dataclass(frozen=True)
class _InSlot:
    name: str


def _mapped(tree, fn):
    """A nested dict with `fn` applied to every value that is not a dict."""
    return {k: _mapped(v, fn) if isinstance(v, dict) else fn(v) for k, v in tree.items()}


@dataclass(frozen=True)
class StreamSpec:
    """What a StoreStream reads of a store and in which order: the targets, the mask, the epoch plan's seed, lanes,
    global batch size and shuffle buffer, this rank's share, and how a failed read is retried. Frozen, so that a
    sweep merges its members' needs with dataclasses.replace."""

    targets: tuple[TargetSpec, ...]
    mask: str = "progressive"
    seed: int = 0
    lanes: int = 1
    batch_size: int = 1
    buffer_mb: float = 64.0
    rank: int = 0
    world_size: int = 1
    retry: Retry = Retry()
    reconstruct: tuple[float, ...] = ()    # mask ratios whose visible patches each batch carries (--reconstruct)


class StoreStream(torch.utils.data.IterableDataset):
    """One epoch of this rank's share of the global batches, from `start` on, as pieces: each loader worker (or the
    process itself) reads a share of the rank's lanes, all at once, and makes one piece per batch,
    {"batch": b, "lanes": its lanes, "samples": their batch/lanes samples each, collated lane after lane};
    StoreLoader joins a batch's pieces in lane order (`join`). One piece per worker and batch, not per lane: what
    crosses from a worker to the main process is a few large arrays.

    `format` "wds" streams the tar shards, "zarr" reads each store shard's region of targets.zarr; both
    give the same samples in the same order. A resume starts at batch `start` without reading what the
    lanes had emitted: only the shards holding what they still had to emit are opened. A read that
    fails transiently (a dropped connection to object storage) is reopened where it stopped, as `retry`
    says; then the run stops naming the shard: no sample is skipped, the order never changes. Each lane's
    next tar shard is loaded and checked on a thread while its current one is gathered, so a lane holds at
    most two shards.
    """

    def __init__(self, store: Store, spec: StreamSpec):
        self.store, self.spec, manifest = store, spec, store.manifest
        self.manifest, self.layout = manifest, manifest.layout
        # a lane holds the shard it gathers, the next one, and those its shuffle buffer still holds samples of: their
        # memory is reused
        self.reader = StoreReader(store.location, manifest, store.format, [t.name for t in spec.targets],
                                  keep_loaded=4 * len(self.my_lanes()) + 2)
        # samples per lane: MB of the store's whole samples, so the order does not depend on which targets a run
        # reads (runs with other losses, and the members of a sweep, see the same order)
        sample_bytes = sum(int(np.prod(shape)) * np.dtype(dtype).itemsize
                           for shape, dtype in sample_arrays(manifest.layout, manifest.targets).values())
        self.buffer = max(1, int(spec.buffer_mb * 2 ** 20) // sample_bytes)
        self.teacher_visible = any(KINDS[t.kind].decoded for t in spec.targets)    # batches carry "visible" "teacher"
        self.full = manifest.tokens == "full"
        self.n_keep = manifest.mask.kept_counts(self.layout.num_patches)[-1]
        # a full store's targets whose arrays cannot be cut by token (int4: packed, block-scaled) are decoded here and
        # then cut, and cross to the device as float16; batch_specs says how a batch carries each target
        self.decoded_here = {t.name for t in self.reader.specs if self.full and not encoding_of(t).by_token}
        self.batch_specs = [replace(t, encoding="fp16") if t.name in self.decoded_here else t for t in self.reader.specs]
        # (array name, shape, dtype, kind, cls): every target as the batch carries it, and its companions
        self.stored = [(name, shape, dtype, KINDS[t.kind], t.cls) for t in self.batch_specs
                       for name, (shape, dtype) in target_arrays(t).items()]
        self.load_ahead = store.format == "wds"   # read and check each lane's next tar shard on a thread
        self.selections: tuple[str, ...] = ()     # masks whose patch choice each batch also carries (a sweep's)
        self.ring: BatchRing | None = None        # loader workers' reused batch memory (StoreLoader sets it)
        self.epoch, self.start = 0, 0

    def piece_arrays(self, B: int) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        """The arrays `collate` makes for B samples, name -> (shape, dtype): views, pixels, keep, each stored array."""
        n, P = self.n_keep if self.spec.mask != "none" else self.layout.num_patches, self.layout.patch_size
        out = {"views": ((B,), np.int64), "pixels": ((B, n, P, P, 3), np.uint8), "keep": ((B, n), np.int64)}
        out.update({name: ((B, *(kind.token_shape(shape, int(cls) + n) if self.full else shape)), dtype)
                    for name, shape, dtype, kind, cls in self.stored})
        return out

    def collate(self, samples: list[Sample], array=batch_tensor) -> dict:
        """Stored samples -> a batch of what the student sees: pixels [B, n, P, P, 3], keep [B, n] and each target
        over those tokens, each gathered with one copy from the loaded shards into a batch array that `array(name,
        shape, dtype)` gives; the samples' keys (<image id>-v<view>) and views [B], to trace a sample to its image."""
        tensors = {name: array(name, shape, dtype) for name, (shape, dtype) in self.piece_arrays(len(samples)).items()}
        pixels, keep = tensors["pixels"].numpy(), tensors["keep"].numpy()
        arrays = {name: tensors[name].numpy() for name, *_ in self.stored}
        for i, stored in enumerate(samples):
            if self.full:                          # choose the patches, then gather those rows (and columns)
                sel = select_patches(self.spec.mask, stored.stage, stored.key, self.spec.seed, self.epoch, self.n_keep)
                with_cls = np.concatenate([[0], sel + 1])                       # [1+n]: CLS, then the patches
                np.take(stored.pixels, sel, axis=0, out=pixels[i])
                keep[i] = stored.keep[sel]
                for name, _shape, _dtype, kind, cls in self.stored:
                    values = stored.targets[name] if name in self.decoded_here else stored.stored[name]
                    arrays[name][i] = kind.take(values, with_cls if cls else sel)
            else:                                  # a kept store holds exactly the student's tokens: plain copies
                pixels[i] = stored.pixels
                keep[i] = stored.keep
                for name, a in arrays.items():
                    a[i] = stored.stored[name]
        names = {t.name for t in self.spec.targets}
        tensors["views"].numpy()[:] = [s.view for s in samples]
        batch = {"count": len(samples), "keys": [s.key for s in samples], "views": tensors["views"],
                 "pixels": tensors["pixels"], "keep": tensors["keep"],
                 "targets": {name: tensors[name] for name in arrays if name in names},
                 "companions": {name: tensors[name] for name in arrays if name not in names}}
        if self.selections:                    # mask "none": the batch holds every patch, in patch order
            batch["selections"] = {mask: torch.from_numpy(np.stack([
                select_patches(mask, s.stage, s.key, self.spec.seed, self.epoch, self.n_keep) for s in samples]))
                for mask in self.selections}   # [B, n] each
        visible = self.visible(samples)
        if visible:
            batch["visible"] = visible
        return batch

    def visible(self, samples: list[Sample]) -> dict:
        """The patches a masked-input student's encoder sees, as rows of the batch (whose mask is "none"): each
        --reconstruct ratio's draw [B, int(N * (1 - ratio))], and with dec targets "teacher": the stored patches
        their teacher saw [B, m]."""
        visible = {ratio: torch.from_numpy(np.stack([
            visible_patches(ratio, s.key, self.spec.seed, self.epoch, self.layout.num_patches) for s in samples]))
            for ratio in self.spec.reconstruct}
        if self.teacher_visible:
            visible["teacher"] = torch.from_numpy(np.stack([s.visible for s in samples]).astype(np.int64))
        return visible

    def check_present(self, views):
        """Refuse a store whose files for `views` are not all there as committed (StoreReader.check_present)."""
        views = set(views)
        self.reader.check_present([s for s in self.manifest.shards if s.view in views])

    def set_epoch(self, epoch: int, start: int = 0):
        self.epoch, self.start = epoch, start

    def plan(self, epoch: int | None = None) -> EpochPlan:
        """The order of epoch `epoch` (None: the stream's current one)."""
        spec = self.spec
        return EpochPlan(self.manifest, spec.seed, self.epoch if epoch is None else epoch, spec.lanes, spec.batch_size,
                         self.buffer)

    def my_lanes(self) -> list[int]:
        return [lane for lane in range(self.spec.lanes) if lane % self.spec.world_size == self.spec.rank]

    def __iter__(self):
        plan = self.plan()
        info = torch.utils.data.get_worker_info()
        lanes = self.my_lanes()[info.id::info.num_workers] if info else self.my_lanes()
        try:
            with self._load_thread() as ahead:
                streams = {lane: self._lane(plan, lane, ahead) for lane in lanes}
                for b in range(self.start, plan.steps):
                    samples = []
                    for lane, stream in streams.items():
                        taken = list(itertools.islice(stream, plan.per_lane))
                        if len(taken) < plan.per_lane:
                            raise HdistillError(
                                f"{self.store}: lane {lane} ran out of samples at batch {b} of epoch {self.epoch}: "
                                "its shards hold fewer samples than the manifest the run started with (was the "
                                "store replaced while the run read it?); check it with hdistill verify, then run "
                                "the same command to resume from the last checkpoint")
                        samples += taken
                    if info and self.ring:          # a worker: the piece stays in the ring, its slot crosses
                        slot = self.ring.next_slot(info.id)
                        piece = self.ring.stripped(self.collate(samples, self.ring.maker(info.id, slot)), info.id, slot)
                        yield {"batch": b, "lanes": lanes, "worker": info.id, "slot": slot, "samples": piece}
                    else:
                        yield {"batch": b, "lanes": lanes, "worker": 0, "samples": self.collate(samples)}
        except HdistillError as err:
            yield Failure(str(err))

    @contextmanager
    def _load_thread(self):
        """The thread that loads shards ahead (None for zarr, or for views made online), stopped with the stream."""
        ahead = ThreadPoolExecutor(1, thread_name_prefix="hdistill-shard") if self.load_ahead else None
        try:
            yield ahead
        finally:
            if ahead is not None:
                ahead.shutdown(wait=False, cancel_futures=True)

    def _lane(self, plan: EpochPlan, lane: int, ahead: ThreadPoolExecutor | None = None):
        """The lane's samples in emission order from the start batch, holding at most what the buffer held."""
        order = plan.emission(lane)[self.start * plan.per_lane:]
        if not order:
            return
        held, t = {}, 0
        located = plan.locate(lane, order)
        loads = self._loads(ahead, [plan.shards[k] for k in located])
        for (k, offsets), loaded in zip(located.items(), loads):
            for offset, sample in zip(sorted(offsets), self._read(plan.shards[k], set(offsets), loaded)):
                held[offsets[offset]] = sample
                while t < len(order) and order[t] in held:
                    yield held.pop(order[t])
                    t += 1

    def _loads(self, ahead: ThreadPoolExecutor | None, shards: list) -> Iterator[Future | None]:
        """For each shard in turn, its load (a Future of the checked bytes) begun on `ahead`'s thread when the
        shard before it is taken: shard k + 1 is read and checked while shard k is gathered. None: load in place."""
        if ahead is None or not shards:
            yield from itertools.repeat(None, len(shards))
            return
        following = ahead.submit(self.reader.load, shards[0])
        for k in range(len(shards)):
            current = following
            following = ahead.submit(self.reader.load, shards[k + 1]) if k + 1 < len(shards) else None
            yield current

    def _read(self, shard, offsets: set[int] | None, loading: Future | None = None):
        """The training samples at `offsets` of a shard (all if None), in offset order, from `loading` if the
        shard's load was begun ahead; after a transient failure the shard is reopened at the first sample not
        yet given."""
        wanted = sorted(offsets) if offsets is not None else range(shard.samples)
        given, attempt = 0, 0
        while True:
            try:
                loaded = loading.result() if loading is not None and attempt == 0 else None
                for stored in self.reader.read(shard, offsets if given == 0 else set(wanted[given:]), loaded):
                    given += 1
                    yield stored
                return
            except HdistillError:
                raise
            except Exception as err:  # noqa: BLE001 - any failure to read a shard is reported with its name
                where = self.reader.where(shard)
                if transient(err) and attempt < self.spec.retry.attempts:
                    self.spec.retry.wait(attempt, where, err)
                    attempt += 1
                    continue
                tried = f" after {attempt} retries" if transient(err) else ""
                raise HdistillError(f"{where}: unreadable shard{tried} ({type(err).__name__}: {error_text(err)}); "
                                    "the last checkpoint resumes the run exactly (hdistill verify checks the "
                                    "store)") from None


class AllSamples(torch.utils.data.IterableDataset):
    """Every sample of a store's view 0 in batches of `batch_size` (the last may be smaller): this rank's and
    worker's share of its shards (for validation)."""

    def __init__(self, stream: StoreStream, batch_size: int = 64):
        self.stream, self.batch_size = stream, batch_size

    def __iter__(self):
        s = self.stream
        shards = [r for r in s.manifest.view_shards(0) if r.samples][s.spec.rank::s.spec.world_size]
        info = torch.utils.data.get_worker_info()
        shards = shards[info.id::info.num_workers] if info else shards
        pending: list[Sample] = []
        try:
            with s._load_thread() as ahead:
                for shard, loaded in zip(shards, s._loads(ahead, shards)):
                    for stored in s._read(shard, None, loaded):
                        pending.append(stored)
                        if len(pending) == self.batch_size:
                            yield s.collate(pending)
                            pending = []
            if pending:
                yield s.collate(pending)
        except HdistillError as err:
            yield Failure(str(err))

def select_patches(mask: str, stage: np.ndarray, key: str, seed: int, epoch: int, n_keep: int) -> np.ndarray:
    """Patches the student sees, from all N: the progressive mask's, all, or a seeded random set."""
    if mask == "progressive":
        return np.flatnonzero(stage == 0)
    if mask == "none":
        return np.arange(len(stage))
    rng = np.random.default_rng([seed, epoch, zlib.crc32(key.encode())])
    return np.sort(rng.choice(len(stage), size=n_keep, replace=False))


def visible_patches(ratio: float, key: str, seed: int, epoch: int, num_patches: int) -> np.ndarray:
    """The patches a reconstructing student's encoder sees of a sample (--reconstruct): MAE's random_masking on
    uniform noise drawn from (seed, epoch, sample) alone, so a resume and any rank count draw the same; in patch
    order."""
    return random_masking(np.random.default_rng([seed, epoch, zlib.crc32(key.encode()), 1]).random(num_patches), ratio)


def epoch_samples(manifest: Manifest, epoch: int) -> int:
    return sum(s.samples for s in manifest.view_shards(epoch % manifest.layout.views))


def check_lanes(lanes: int, batch_size: int, world_size: int):
    if batch_size % lanes or lanes % world_size:
        raise HdistillError(f"--lanes {lanes} must divide --batch-size {batch_size}, and the {world_size} ranks must "
                            "divide the lanes (each rank reads whole lanes); give --lanes a multiple of the rank count "
                            "that divides the batch")


def default_lanes(batch_size: int) -> int:
    """16 lanes (each global batch mixes 16 parts of the store), fewer when the batch is not a multiple of 16."""
    return math.gcd(16, batch_size)

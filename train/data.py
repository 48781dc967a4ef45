"""The loader: stream a store's webdataset shards into batches of student inputs and targets.

Epoch e reads the shards of view e % V only (each epoch sees a different view of every image,
cycling). Shards are shuffled per epoch from the seed, split by rank, then by DataLoader worker;
samples pass a seeded shuffle buffer. Only the entries the run needs are decoded.

Mask strategies: "progressive" uses the stored mask (a kept store holds just those tokens; a full
store is sliced at stage == 0); "none" keeps every patch and "random" keeps a random set of the
same size as the progressive mask; both need a full store.
"""
from __future__ import annotations

import random
import zlib

import numpy as np
import torch

from hdistill.common.errors import HdistillError
from hdistill.common.targets import TargetSpec
from hdistill.shards.manifest import Manifest, read_manifest
from hdistill.shards.reader import Sample, StoreReader

MASKS = ("progressive", "none", "random")


def open_store(path: str, reader: str | None = None) -> Manifest:
    """The manifest of a complete store that holds the form `reader` (None: any)."""
    manifest = read_manifest(path)
    if not manifest.complete:
        raise HdistillError(f"--shards {path}: the store is not complete; finish its precompute run first")
    if reader is not None and reader not in manifest.formats:
        raise HdistillError(f"--reader {reader}: the store {path} holds only {','.join(manifest.formats)}")
    return manifest


def default_reader(manifest: Manifest) -> str:
    """wds when the store holds it (streamed), else zarr."""
    return "wds" if "wds" in manifest.formats else manifest.formats[0]


def check_mask(manifest: Manifest, mask: str) -> str:
    if mask not in MASKS:
        raise HdistillError(f"--mask {mask!r}: choose one of {', '.join(MASKS)}")
    if mask != "progressive" and manifest.store_mode != "full":
        raise HdistillError(f"--mask {mask} needs a store made with --store full; this one holds only the "
                            "progressive mask's tokens (--store kept)")
    return mask


class StoreStream(torch.utils.data.IterableDataset):
    """Samples of one epoch, this rank's and this worker's share, shuffled; a dict of numpy arrays each.

    `reader` "wds" streams the tar shards, "zarr" reads each store shard's region of targets.zarr;
    both give the same samples in the same order.
    """

    def __init__(self, store: str, manifest: Manifest, targets: list[TargetSpec], mask: str, seed: int,
                 shuffle_buffer: int = 1000, rank: int = 0, world_size: int = 1, reader: str = "wds"):
        self.store, self.manifest, self.targets, self.mask, self.seed = store, manifest, targets, mask, seed
        self.layout = manifest.layout
        self.shuffle_buffer, self.rank, self.world_size = shuffle_buffer, rank, world_size
        self.reader = StoreReader(store, manifest, reader, [t.name for t in targets])
        self.full = manifest.store_mode == "full"
        self.n_keep = manifest.mask.kept_counts(self.layout.num_patches)[-1]
        self.epoch = 0

    def set_epoch(self, epoch: int):
        self.epoch = epoch

    def shards(self):
        """This epoch's view's shard records, shuffled from the seed, split by rank, then by worker."""
        shards = [s for s in self.manifest.view_shards(self.epoch % self.layout.views) if s.samples]
        random.Random(f"{self.seed}-{self.epoch}").shuffle(shards)
        shards = shards[self.rank::self.world_size]
        info = torch.utils.data.get_worker_info()
        return shards[info.id::info.num_workers] if info else shards

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        rng = random.Random(f"{self.seed}-{self.epoch}-{self.rank}-{info.id if info else 0}")
        buffer = []
        for sample in self._samples():
            if "error" in sample:
                yield sample
                return
            if len(buffer) < self.shuffle_buffer:
                buffer.append(sample)
                continue
            i = rng.randrange(len(buffer))
            buffer[i], sample = sample, buffer[i]
            yield sample
        rng.shuffle(buffer)
        yield from buffer

    def _samples(self):
        for shard in self.shards():
            try:
                for stored in self.reader.read(shard):
                    yield self.sample(stored)
            except HdistillError as err:
                yield {"error": str(err)}
            except Exception as err:  # noqa: BLE001 - any failure to read a shard is reported with its name
                yield {"error": f"{self.reader.where(shard)}: unreadable shard ({type(err).__name__}: {err}); "
                                "run hdistill verify"}

    def sample(self, stored: Sample) -> dict:
        """The training sample: the patches the student sees and the targets over those tokens."""
        sel = np.arange(self.n_keep) if not self.full else \
            select_patches(self.mask, stored.stage, stored.key, self.seed, self.epoch, self.n_keep)
        tokens = np.concatenate([[0], sel + 1])                                # [1+n]
        return {"key": stored.key, "pixels": stored.pixels[sel], "keep": stored.keep[sel].astype(np.int64),
                "targets": {t.name: select_tokens(t, stored.targets[t.name], tokens) for t in self.targets}}


def select_tokens(target: TargetSpec, values, tokens):
    """A target's values over the chosen tokens: rows ([T, D]), or rows and columns of relations ([H, T, T])."""
    if target.kind == "rel":
        return values[:, tokens][:, :, tokens]
    return values[tokens]


def select_patches(mask: str, stage: np.ndarray, key: str, seed: int, epoch: int, n_keep: int) -> np.ndarray:
    """Patches the student sees, from all N: the progressive mask's, all, or a seeded random set."""
    if mask == "progressive":
        return np.flatnonzero(stage == 0)
    if mask == "none":
        return np.arange(len(stage))
    rng = np.random.default_rng([seed, epoch, zlib.crc32(key.encode())])
    return np.sort(rng.choice(len(stage), size=n_keep, replace=False))


def collate(samples: list[dict]) -> dict:
    errors = [s["error"] for s in samples if "error" in s]
    if errors:
        return {"error": errors[0]}
    return {"count": len(samples), "pixels": torch.from_numpy(np.stack([s["pixels"] for s in samples])),
            "keep": torch.from_numpy(np.stack([s["keep"] for s in samples])),
            "targets": {name: torch.from_numpy(np.stack([s["targets"][name] for s in samples]))
                        for name in samples[0]["targets"]}}


def epoch_samples(manifest: Manifest, epoch: int) -> int:
    return sum(s.samples for s in manifest.view_shards(epoch % manifest.layout.views))

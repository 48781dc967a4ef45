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
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import webdataset as wds

from hdistill.common.errors import HdistillError
from hdistill.common.specs import MaskSpec
from hdistill.shards.format import ZARR_DIR, StoreLayout, feat_entry, npy_load, read_manifest, rel_entry, sample_key

MASKS = ("progressive", "none", "random")


@dataclass(frozen=True)
class TargetChoice:
    """Which stored targets a run trains against."""

    feature_role: str
    relation_role: str | None
    relation_blocks: tuple[int, ...]     # teacher blocks
    mask: str = "progressive"


def open_store(path: str, reader: str = "wds") -> dict:
    manifest = read_manifest(path)
    if not manifest.get("complete"):
        raise HdistillError(f"--shards {path}: the store is not complete; finish its precompute run first")
    if reader not in manifest["config"]["formats"]:
        raise HdistillError(f"--reader {reader}: the store {path} holds only {','.join(manifest['config']['formats'])}")
    return manifest


def choose_targets(manifest: dict, feature_role: str | None, relation_role: str | None,
                   relation_blocks: list[int] | None, mask: str) -> TargetChoice:
    """Defaults from the store, checked against what it holds; every refusal names the option."""
    targets = manifest["targets"]
    stored_feats, stored_rels = targets["feature_roles"], targets["relation_blocks"]
    mim = list(stored_rels)
    if feature_role is None:
        non_mim = [r for r in stored_feats if r not in mim]
        feature_role = (non_mim or stored_feats)[0]
    if feature_role not in stored_feats:
        raise HdistillError(f"--feature-teacher {feature_role}: the store holds features of "
                            f"{', '.join(stored_feats)} only")
    if relation_role is None and mim:
        relation_role = mim[0]
    blocks: tuple[int, ...] = ()
    if relation_role is not None:
        if relation_role not in stored_rels:
            raise HdistillError(f"--relation-teacher {relation_role}: the store holds relations of "
                                f"{', '.join(stored_rels) or 'no teacher'}")
        available = stored_rels[relation_role]
        blocks = tuple(available if relation_blocks is None else relation_blocks)
        missing = [b for b in blocks if b not in available]
        if missing:
            raise HdistillError(f"--relation-blocks {','.join(map(str, blocks))}: the store holds relations of "
                                f"{relation_role} at blocks {available} only")
    if mask not in MASKS:
        raise HdistillError(f"--mask {mask!r}: choose one of {', '.join(MASKS)}")
    if mask != "progressive" and manifest["config"]["store"] != "full":
        raise HdistillError(f"--mask {mask} needs a store made with --store full; this one holds only the "
                            "progressive mask's tokens (--store kept)")
    return TargetChoice(feature_role, relation_role, blocks, mask)


def kept_count(layout: StoreLayout, manifest: dict) -> int:
    """Patches per sample the student sees under the progressive mask."""
    mask = manifest["targets"]["mask"]
    return MaskSpec(ratio=mask["ratio"], blocks=tuple(mask["blocks"])).kept_counts(layout.num_patches)[-1]


class StoreStream(torch.utils.data.IterableDataset):
    """Samples of one epoch, this rank's and this worker's share, shuffled; a dict of numpy arrays each.

    `reader` "wds" streams the tar shards, "zarr" reads each store shard's region of targets.zarr;
    both give the same samples in the same order.
    """

    def __init__(self, store: str, manifest: dict, choice: TargetChoice, seed: int, shuffle_buffer: int = 1000,
                 rank: int = 0, world_size: int = 1, reader: str = "wds"):
        self.store, self.manifest, self.choice, self.seed = store, manifest, choice, seed
        self.layout = StoreLayout.from_dict(manifest["layout"])
        self.shuffle_buffer, self.rank, self.world_size = shuffle_buffer, rank, world_size
        self.reader = reader
        self.full = manifest["config"]["store"] == "full"
        self.n_keep = kept_count(self.layout, manifest)
        self.epoch = 0

    def set_epoch(self, epoch: int):
        self.epoch = epoch

    def shards(self) -> list[dict]:
        """This epoch's view's shard records, shuffled from the seed, split by rank, then by worker."""
        view = self.epoch % self.layout.views
        shards = [s for s in self.manifest["shards"] if s["view"] == view and s["samples"]]
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
        read = self._read_zarr if self.reader == "zarr" else self._read_wds
        for shard in self.shards():
            where = shard.get("file") or f"{ZARR_DIR} shard {shard['name']}"
            try:
                yield from read(shard)
            except HdistillError as err:
                yield {"error": str(err)}
            except Exception as err:  # noqa: BLE001 - any failure to read a shard is reported with its name
                yield {"error": f"{Path(self.store) / where}: unreadable shard ({type(err).__name__}: {err}); "
                                "run hdistill verify"}

    def _read_wds(self, shard: dict):
        url = str(Path(self.store) / shard["file"])
        c = self.choice
        names = {"stage": "stage.npy", "keep": "keep.npy", "pixels": "pixels.npy",
                 "features": feat_entry(c.feature_role), **{b: rel_entry(c.relation_role, b) for b in c.relation_blocks}}
        # one url, already split by rank and worker: webdataset must not split again
        for raw in wds.WebDataset(url, shardshuffle=False, handler=wds.reraise_exception,
                                  nodesplitter=_as_is, workersplitter=_as_is):
            key = raw["__key__"]
            try:
                arrays = {field: npy_load(raw[entry]) for field, entry in names.items()}
            except (KeyError, ValueError) as err:
                raise HdistillError(f"{url}: sample {key}: missing or damaged entry ({err})") from None
            yield self.sample(url, key, arrays, names)

    def _read_zarr(self, shard: dict):
        import zarr
        where = str(Path(self.store) / ZARR_DIR)
        group = zarr.open_group(where, mode="r")
        c = self.choice
        start = self.layout.slot(shard["view"], shard["index"] * self.layout.shard_size)
        region = slice(start, start + self.layout.shard_size)
        names = {"stage": "stage", "keep": "keep", "pixels": "pixels", "features": f"feat/{c.feature_role}",
                 **{b: f"rel/{c.relation_role}/b{b}" for b in c.relation_blocks}}
        columns = {field: group[name][region] for field, name in names.items()}
        image_ids, valid = group["image_id"][region], group["valid"][region]
        for i in np.flatnonzero(valid):
            key = sample_key(str(image_ids[i]), shard["view"])
            yield self.sample(where, key, {field: col[i] for field, col in columns.items()}, names)

    def sample(self, where: str, key: str, arrays: dict, names: dict) -> dict:
        """Checked, masked training sample from one stored sample's arrays."""
        for field in ("features", *self.choice.relation_blocks):
            if not np.isfinite(arrays[field]).all():
                raise HdistillError(f"{where}: sample {key}: {names[field]} holds NaN or Inf")
        sel = np.arange(self.n_keep) if not self.full else \
            select_patches(self.choice.mask, arrays["stage"], key, self.seed, self.epoch, self.n_keep)
        tokens = np.concatenate([[0], sel + 1])                                # [1+n]
        return {"key": key, "pixels": arrays["pixels"][sel], "keep": arrays["keep"][sel].astype(np.int64),
                "features": arrays["features"][tokens],
                "relations": {b: arrays[b][:, tokens][:, :, tokens] for b in self.choice.relation_blocks}}


def select_patches(mask: str, stage: np.ndarray, key: str, seed: int, epoch: int, n_keep: int) -> np.ndarray:
    """Patches the student sees, from all N: the progressive mask's, all, or a seeded random set."""
    if mask == "progressive":
        return np.flatnonzero(stage == 0)
    if mask == "none":
        return np.arange(len(stage))
    rng = np.random.default_rng([seed, epoch, zlib.crc32(key.encode())])
    return np.sort(rng.choice(len(stage), size=n_keep, replace=False))


def _as_is(urls):
    return urls


def collate(samples: list[dict]) -> dict:
    errors = [s["error"] for s in samples if "error" in s]
    if errors:
        return {"error": errors[0]}
    return {"count": len(samples), "pixels": torch.from_numpy(np.stack([s["pixels"] for s in samples])),
            "keep": torch.from_numpy(np.stack([s["keep"] for s in samples])),
            "features": torch.from_numpy(np.stack([s["features"] for s in samples])),
            "relations": {b: torch.from_numpy(np.stack([s["relations"][b] for s in samples]))
                          for b in samples[0]["relations"]}}


def epoch_samples(manifest: dict, epoch: int) -> int:
    view = epoch % manifest["layout"]["views"]
    return sum(s["samples"] for s in manifest["shards"] if s["view"] == view)

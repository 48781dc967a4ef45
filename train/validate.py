"""Validation: the loss on a held-out store, the measurement that shows whether the student generalises.

The held-out store (`--val-shards`, typically `precompute --crop center` over images the student never
sees) must hold every target the run's loss uses, from the training store's teachers: the same model, weights,
precision and image size (a store of other teachers is refused, naming what differs); it may hold more targets.
The training store itself, a store of random crops and one of another mask are used with a warning. Every rank
evaluates its share of the store's shards; the sums of each term over samples, and the sample counts, are added
over ranks, so the result is the mean over every sample.
"""
from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Callable, NamedTuple

import torch

from hdistill.common.errors import HdistillError
from hdistill.common.processes import start_workers
from hdistill.common.grid import TokenGrid, check_same_grid
from hdistill.common.targets import KINDS, TargetSpec
from hdistill.shards.manifest import Manifest

from .data import AllSamples, check_mask
from .loader import Store, decoded, to_device
from .dist import DistInfo, sum_over_ranks


def open_val_store(path: str, train_path: str, train: Manifest) -> tuple[Store, list[str]]:
    """The held-out store opened (once for every member of a run) and what to warn about; refusals name
    --val-shards."""
    try:
        store = Store(path)
    except HdistillError as err:
        raise HdistillError(f"--val-shards {path}: {err}") from None
    manifest = store.manifest
    check_same_grid({f"the training store {train_path}": TokenGrid(train.layout.image_size, train.layout.patch_size),
                     f"the --val-shards store {path}": TokenGrid(manifest.layout.image_size,
                                                                 manifest.layout.patch_size)})
    return store, held_out_warnings(path, train, manifest)


def val_targets(store: Store, train: Manifest, targets: list[TargetSpec], mask: str) -> list[TargetSpec]:
    """The held-out store's rows for a member's targets, under its mask; refusals name --val-shards."""
    path, manifest = str(store), store.manifest
    try:
        check_mask(manifest, mask)
    except HdistillError as err:
        raise HdistillError(f"--val-shards {path}: {err}") from None
    rows = []
    for target in targets:
        if not manifest.has_target(target.name):
            raise HdistillError(f"--val-shards {path}: no target {target.name}, which the loss uses (it holds "
                                f"{', '.join(t.name for t in manifest.targets)}); make it with the same --target")
        row = manifest.target(target.name)
        channels = KINDS[target.kind].channels
        if channels(row.shape) != channels(target.shape) or row.cls != target.cls:
            raise HdistillError(f"--val-shards {path}: {target.name} has shape {list(row.shape)}, the training "
                                f"store's has {list(target.shape)}: the stores were made by different teachers")
        rows.append(row)
    for role in sorted({t.role for t in targets}):
        check_same_teacher(path, role, train, manifest)
    return rows


def teacher_identity(manifest: Manifest, role: str) -> dict:
    """What makes a teacher's targets: its model (and shape), its weights (a file by its digest, not its path), the
    precision of its forward and its image size."""
    info = manifest.teacher(role)
    weights = {k: v for k, v in info.weights.items() if k != "path"}
    return {"model": f"{info.model} (width {info.width}, depth {info.depth}, heads {info.heads})",
            "weights": ", ".join(f"{k} {v}" for k, v in weights.items()),
            "precision": manifest.config["precision"], "image size": info.image_size}


def check_same_teacher(path: str, role: str, train: Manifest, val: Manifest):
    ours, theirs = teacher_identity(train, role), teacher_identity(val, role)
    for field, value in theirs.items():
        if value != ours[field]:
            raise HdistillError(f"--val-shards {path}: teacher {role!r} differs from the training store's in its "
                                f"{field} ({value}, the training store's: {ours[field]}), so its targets are other "
                                "targets; make the held-out store with the training store's teachers (its "
                                "config.yaml: --teachers, --model, --weights, --precision, --image-size)")


def held_out_warnings(path: str, train: Manifest, val: Manifest) -> list[str]:
    """What makes a held-out loss measure something else than generalisation to new images."""
    if val.digest() == train.digest():
        return [f"--val-shards {path} is the training store: val/loss measures the fit to the training views, not "
                "generalisation; make a held-out store of other images (precompute --crop center)"]
    warnings = []
    if val.config["crop"] != "center":
        warnings.append(f"--val-shards {path} was made with --crop {val.config['crop']}: its views are random "
                        "crops, not the centre crops a held-out loss is usually measured on (precompute --crop center)")
    if val.mask != train.mask:
        warnings.append(f"--val-shards {path}: its mask ({val.mask.describe()}) is not the training store's "
                        f"({train.mask.describe()}): the student is evaluated on other tokens than it trains on")
    return warnings


class Evaluated(NamedTuple):
    """A model to evaluate on the held-out batches: its loss terms `keys` ("loss", ...), what it takes of a batch
    (`prepare`: a sweep member its mask's patches and its targets) and its autocast."""

    model: torch.nn.Module
    keys: list[str]
    prepare: Callable[[dict], dict]
    autocast: AbstractContextManager


@torch.no_grad()
def evaluate(models: dict[str, Evaluated], stream: AllSamples, workers: int, device: str,
             dist: DistInfo) -> dict[str, dict[str, float]]:
    """{name: {"val/<key>": mean over every sample of the held-out store}} for each model, from one pass over it."""
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=workers,
                                         generator=torch.Generator().manual_seed(0))
    sums = {name: dict.fromkeys(m.keys, 0.0) for name, m in models.items()}
    count = 0
    was_training = {name: m.model.training for name, m in models.items()}
    for m in models.values():
        m.model.eval()
    try:
        for batch in start_workers(loader):
            batch = decoded(to_device(batch, device), stream.stream.batch_specs)
            for name, m in models.items():
                mine = m.prepare(batch)
                with m.autocast:
                    terms = m.model(mine["pixels"], mine["keep"], mine["targets"], mine.get("visible"))
                for key in m.keys:                    # each term is a mean over its batch's samples
                    sums[name][key] += terms[key].item() * batch["count"]
            count += batch["count"]
    finally:
        for name, m in models.items():
            m.model.train(was_training[name])
    results = {}
    for name, member_sums in sums.items():
        totals = sum_over_ranks({**member_sums, "count": float(count)}, dist, device)
        if not totals["count"]:
            raise HdistillError("--val-shards: the held-out store has no samples")
        results[name] = {f"val/{key}": value / totals["count"] for key, value in totals.items() if key != "count"}
    return results

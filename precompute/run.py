"""`hdistill precompute`: images -> views -> teachers -> targets -> store, resumable and rank-split.

Pipeline (one process = one rank):
  DataLoader workers   read + decode the image, render the view            (CPU, parallel)
  main thread          teachers' forward, mask, keep rows/cols, fp16       (device)
  writer thread        npy encoding, tar + zarr writing, commit records    (I/O)

Resume and scale-out rest on a fixed shard layout (StoreLayout): shard (view v, index k)
always holds the same images, rank r of W writes the shards whose position p in the store
order has p % W == r, and a shard counts as done once its commit record exists. Batches
never span shards, so a shard's bytes do not depend on the rank, the world size or resumes.
"""
from __future__ import annotations

import json
import queue
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from hdistill.common.errors import HdistillError
from hdistill.common.specs import TargetSpec, ViewTargets
from hdistill.common.tokens import gather_relations, gather_rows, patchify, token_index
from hdistill.shards import wds, zarr_store
from hdistill.shards.atomic import atomic_write, remove_stale_temporaries
from hdistill.shards.format import (COMMITS_DIR, FORMAT_VERSION, MANIFEST, WDS_DIR, StoredView, StoreLayout,
                                    read_manifest, sample_key, shard_name, write_manifest)

from .data import ImageRef, list_images
from .image import decode_image
from .targets import compute_targets, plan_targets
from .teachers import Teacher, WeightSource, build_teacher
from .view import make_view


@dataclass
class PrecomputeConfig:
    """Everything that decides a store's content; a store only resumes with an equal config."""

    data: str
    teachers: list[str]
    models: dict[str, str] = field(default_factory=dict)
    model_args: dict[str, dict] = field(default_factory=dict)
    weights: dict[str, str] = field(default_factory=dict)     # role -> "hub" | path
    random_init: bool = False
    seed: int = 0
    views: int = 1
    image_size: int = 224
    relation_blocks: list[int] | None = None
    mask_ratio: float = 0.3
    mask_teacher: str | None = None
    store: str = "kept"                                         # "kept" | "full"
    formats: list[str] = field(default_factory=lambda: ["wds", "zarr"])
    batch_size: int = 64
    shard_size: int = 1024
    limit: int | None = None
    precision: str = "fp32"                                     # teachers' forward: "fp32" | "bf16" autocast

    def validate(self):
        if self.precision not in ("fp32", "bf16"):
            raise HdistillError(f"--precision must be 'fp32' or 'bf16', got {self.precision!r}")
        if self.store not in ("kept", "full"):
            raise HdistillError(f"--store must be 'kept' or 'full', got {self.store!r}")
        unknown = set(self.formats) - {"wds", "zarr"}
        if unknown or not self.formats:
            raise HdistillError(f"--format {','.join(self.formats) or '(empty)'}: use wds, zarr or wds,zarr")
        for name, value in [("--views", self.views), ("--batch-size", self.batch_size),
                            ("--shard-size", self.shard_size), ("--image-size", self.image_size)]:
            if value < 1:
                raise HdistillError(f"{name} must be at least 1, got {value}")
        for option, roles in [("--model", self.models), ("--model-arg", self.model_args), ("--weights", self.weights)]:
            extra = set(roles) - set(self.teachers)
            if extra:
                raise HdistillError(f"{option} names {', '.join(sorted(extra))}, which is not among --teachers "
                                    f"({', '.join(self.teachers)})")
        missing = [r for r in self.teachers if r not in self.weights]
        if missing and not self.random_init:
            raise HdistillError(
                f"no weights for teacher(s) {', '.join(missing)}: pass --weights ROLE=hub to fetch the model's "
                "pretrained tag, --weights ROLE=PATH for a local file, or --random-init for random weights")
        if self.random_init and self.weights:
            raise HdistillError("--random-init and --weights exclude each other")


@dataclass
class Runtime:
    """How this process runs; does not change the store's content."""

    device: str = "cpu"
    workers: int = 0
    rank: int = 0
    world_size: int = 1
    progress: bool = True


def build_teachers(cfg: PrecomputeConfig, device: str) -> dict[str, Teacher]:
    teachers = {}
    for i, role in enumerate(cfg.teachers):
        source = (WeightSource("random", seed=cfg.seed * 1000 + i) if cfg.random_init
                  else WeightSource.parse(cfg.weights[role]))
        teachers[role] = build_teacher(role, source, cfg.image_size, cfg.models.get(role),
                                       cfg.model_args.get(role)).to(device)
    return teachers


def store_layout(cfg: PrecomputeConfig, teachers: dict[str, Teacher], spec: TargetSpec,
                 num_images: int) -> StoreLayout:
    grid = next(iter(teachers.values())).info.grid
    kept = spec.mask.kept_counts(grid.num_patches)[-1] if cfg.store == "kept" else grid.num_patches
    return StoreLayout(
        num_images=num_images, views=cfg.views, shard_size=cfg.shard_size, image_size=cfg.image_size,
        patch_size=grid.patch_size, num_patches=grid.num_patches, stored_patches=kept,
        features={r: teachers[r].info.width for r in spec.feature_roles},
        relations={r: {"heads": teachers[r].info.heads, "blocks": list(b)} for r, b in spec.relation_blocks.items()})


# ---------------------------------------------------------------- loading (DataLoader workers)

class ViewDataset(torch.utils.data.Dataset):
    """Item i = (view, shard index, image index) -> the rendered view or the reason it failed."""

    def __init__(self, images: list[ImageRef], items: list[tuple[int, int, int]], seed: int, size: int):
        self.images, self.items, self.seed, self.size = images, items, seed, size

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        view, shard, image = self.items[i]
        ref = self.images[image]
        out = {"view": view, "shard": shard, "image": image}
        try:
            img = decode_image(ref.read(), ref.source)
            pixels, params = make_view(img, ref.image_id, view, self.seed, self.size)
        except HdistillError as err:
            return {**out, "error": str(err)}
        except OSError as err:
            return {**out, "error": f"{ref.source}: cannot read ({err.strerror or err})"}
        meta = {"source": ref.source, "image_id": ref.image_id, "view": view, "source_size": list(img.size),
                "crop": {"top": params.top, "left": params.left, "height": params.height, "width": params.width},
                "flip": params.flip, "size": params.size, "interpolation": params.interpolation}
        return {**out, "pixels": torch.from_numpy(pixels), "meta": meta}


def collate_views(items: list[dict]) -> dict:
    ok = [it for it in items if "pixels" in it]
    return {"pixels": torch.stack([it["pixels"] for it in ok]) if ok else None,
            "ok": [{k: it[k] for k in ("view", "shard", "image", "meta")} for it in ok],
            "failed": [{k: it[k] for k in ("view", "shard", "image", "error")} for it in items if "error" in it]}


def shard_batches(items: list[tuple[int, int, int]], batch_size: int) -> list[list[int]]:
    """Batches of item positions that never cross a shard boundary."""
    batches, current = [], []
    for pos, (view, shard, _image) in enumerate(items):
        if current and (len(current) == batch_size or items[current[0]][:2] != (view, shard)):
            batches.append(current)
            current = []
        current.append(pos)
    return batches + ([current] if current else [])


# ---------------------------------------------------------------- targets -> stored samples

def stored_views(targets: ViewTargets, pixels: torch.Tensor, metas: list[dict], patch: int,
                 full: bool) -> list[StoredView]:
    """Keep the stored tokens' rows/columns, cast to fp16, move to the CPU -> samples."""
    mask = targets.mask
    keep_idx = torch.arange(mask.stage.shape[1], device=mask.stage.device).expand_as(mask.stage) \
        if full else mask.keep_idx                                                # [B, n]
    tokens = token_index(keep_idx)                                               # [B, 1+n]
    feats = {r: gather_rows(f, tokens).half() for r, f in targets.features.items()}
    rels = {r: {b: gather_relations(x, tokens).half() for b, x in blocks.items()}
            for r, blocks in targets.relations.items()}
    for name, arr in [*((f"features of {r}", a) for r, a in feats.items()),
                      *((f"relations of {r} block {b}", a) for r, bl in rels.items() for b, a in bl.items())]:
        if not torch.isfinite(arr).all():
            bad = [metas[i]["source"] for i in torch.nonzero(~torch.isfinite(arr.flatten(1)).all(1)).flatten()]
            raise HdistillError(f"non-finite {name} in float16 for {', '.join(bad[:5])}: the teacher's values "
                                "overflow float16 or are NaN; check the teacher weights")
    pix = gather_rows(patchify(pixels.to(keep_idx.device), patch), keep_idx)  # [B, n, P, P, 3]
    cpu = lambda t: t.cpu().numpy()  # noqa: E731
    stage, keep, pix = cpu(mask.stage), cpu(keep_idx.to(torch.int16)), cpu(pix)
    feats = {r: cpu(a) for r, a in feats.items()}
    rels = {r: {b: cpu(a) for b, a in bl.items()} for r, bl in rels.items()}
    return [StoredView(key=sample_key(m["image_id"], m["view"]), meta=m, stage=stage[i], keep=keep[i],
                       pixels=pix[i], features={r: a[i] for r, a in feats.items()},
                       relations={r: {b: a[i] for b, a in bl.items()} for r, bl in rels.items()})
            for i, m in enumerate(metas)]


# ---------------------------------------------------------------- writing (writer thread)

class ShardCommitter:
    """Collects each shard's samples and commits the shard once all its images are accounted for.

    Commit = tar (atomic) + zarr region, then the commit record commits/<shard>.json (atomic).
    Runs on a background thread; the first error stops it and is re-raised in the main thread.
    """

    def __init__(self, store: Path, layout: StoreLayout, formats: list[str]):
        self.store, self.layout, self.formats = store, layout, formats
        self.pending: dict[tuple[int, int], dict] = {}
        self.queue: queue.Queue = queue.Queue(maxsize=8)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def put(self, samples: list[tuple[int, int, int, StoredView]], failed: list[dict]):
        self.raise_error()
        self.queue.put((samples, failed))

    def close(self):
        self.queue.put(None)
        self.thread.join()
        self.raise_error()

    def raise_error(self):
        if self.error is not None:
            raise self.error

    def _run(self):
        try:
            while (batch := self.queue.get()) is not None:
                samples, failed = batch
                for view, shard, image, sample in samples:
                    self._shard(view, shard)["samples"].append((image, sample))
                for f in failed:
                    self._shard(f["view"], f["shard"])["skipped"].append(
                        {"image": f["image"], "view": f["view"], "reason": f["error"]})
                for key in [k for k, s in self.pending.items()
                            if len(s["samples"]) + len(s["skipped"]) == len(self.layout.image_range(k[1]))]:
                    self._commit(*key, self.pending.pop(key))
        except BaseException as err:  # noqa: BLE001 - handed to the main thread
            self.error = err
            while self.queue.get() is not None:
                pass

    def _shard(self, view, index):
        return self.pending.setdefault((view, index), {"samples": [], "skipped": []})

    def _commit(self, view: int, index: int, shard: dict):
        name = shard_name(view, index)
        samples = sorted(shard["samples"], key=lambda s: s[0])
        record = {"name": name, "view": view, "index": index, "samples": len(samples),
                  "skipped": sorted(shard["skipped"], key=lambda s: s["image"])}
        tar_path = self.store / WDS_DIR / f"{name}.tar"
        for path in (tar_path, commit_path(self.store, name)):
            remove_stale_temporaries(path)  # this rank owns the shard; a killed run may have left these
        if "wds" in self.formats:
            nbytes, sha = wds.write_shard(tar_path, (s for _, s in samples))
            record.update(file=f"{WDS_DIR}/{name}.tar", bytes=nbytes, sha256=sha)
        if "zarr" in self.formats:
            zarr_store.write_shard(self.store, self.layout, view, index, samples)
        atomic_write(commit_path(self.store, name), json.dumps(record, sort_keys=True).encode())


def commit_path(store: Path, name: str) -> Path:
    return store / COMMITS_DIR / f"{name}.json"


def read_commits(store: Path, layout: StoreLayout) -> dict[str, dict]:
    out = {}
    for view, index in layout.shards():
        path = commit_path(store, shard_name(view, index))
        if path.exists():
            out[shard_name(view, index)] = json.loads(path.read_text())
    return out


# ---------------------------------------------------------------- the store's manifest

def identity(cfg: PrecomputeConfig, teachers: dict[str, Teacher], spec: TargetSpec, layout: StoreLayout) -> dict:
    """The part of the manifest that must match for a run to continue an existing store (JSON-normalised)."""
    ident = {"format_version": FORMAT_VERSION, "config": asdict(cfg),
            "teachers": [t.info.to_dict() for t in teachers.values()], "targets": spec.to_dict(),
            "layout": layout.to_dict(),
            "token_layout": {"order": "CLS first, then stored patches in keep order",
                             "patch_order": "raster (row-major) over the patch grid",
                             "grid": [layout.image_size // layout.patch_size] * 2,
                             "patch_size": layout.patch_size, "num_patches": layout.num_patches,
                             "stored_patches": layout.stored_patches}}
    return json.loads(json.dumps(ident))


def open_store(store: Path, ident: dict):
    """Create the store, or check that an existing one was made by the same configuration."""
    if (store / MANIFEST).exists():
        existing = read_manifest(store)
        if {k: existing.get(k) for k in ident} != ident:
            old, new = existing.get("config", {}), ident["config"]
            diff = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
            what = f"options that differ: {', '.join('--' + d.replace('_', '-') for d in diff)}" if diff \
                else "the teachers or their weights differ"
            raise HdistillError(f"{store} holds a store made with another configuration ({what}). "
                                "Use a new --out, or rerun with the original options to resume.")
        return
    if store.exists() and not store.is_dir():
        raise HdistillError(f"--out {store} is a file; give a folder for the store")
    if store.exists() and any(p for p in store.iterdir() if not p.name.startswith(".")):
        raise HdistillError(f"--out {store} exists and is not an hdistill store; choose an empty or new folder")
    write_manifest(store, {**ident, "complete": False})


def finalize(store: Path, ident: dict, layout: StoreLayout, images: list[ImageRef]) -> dict | None:
    """Write the complete manifest once every shard of every rank is committed; else None."""
    commits = read_commits(store, layout)
    if len(commits) < len(layout.shards()):
        return None
    shards = [commits[shard_name(v, k)] for v, k in layout.shards()]
    skipped = [{"source": images[s["image"]].source, "image_id": images[s["image"]].image_id,
                "view": s["view"], "reason": s["reason"]} for c in shards for s in c.pop("skipped")]
    manifest = {**ident, "complete": True, "shards": shards, "skipped": skipped,
                "samples": sum(c["samples"] for c in shards)}
    write_manifest(store, manifest)
    return manifest


# ---------------------------------------------------------------- the run

def run_precompute(cfg: PrecomputeConfig, out: str, rt: Runtime,
                   teachers: dict[str, Teacher] | None = None) -> dict | None:
    """Precompute (this rank's part of) the store at `out`; returns the manifest once complete.

    `teachers` may be passed prebuilt (as build_teachers(cfg, rt.device) makes them), e.g. by benchmarks.
    """
    cfg.validate()
    store = Path(out)
    images = list_images(cfg.data, cfg.limit)
    teachers = teachers or build_teachers(cfg, rt.device)
    spec = plan_targets(teachers, cfg.relation_blocks, cfg.mask_ratio, cfg.mask_teacher)
    layout = store_layout(cfg, teachers, spec, len(images))
    ident = identity(cfg, teachers, spec, layout)
    open_store(store, ident)
    if "zarr" in cfg.formats:
        zarr_store.create(store, layout)

    done = read_commits(store, layout)
    mine = [(v, k) for p, (v, k) in enumerate(layout.shards())
            if p % rt.world_size == rt.rank and shard_name(v, k) not in done]
    items = [(v, k, i) for v, k in mine for i in layout.image_range(k)]
    if items:
        _process(cfg, rt, store, layout, teachers, spec, images, items)
    return finalize(store, ident, layout, images)


def _process(cfg, rt, store, layout, teachers, spec, images, items):
    dataset = ViewDataset(images, items, cfg.seed, cfg.image_size)
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=shard_batches(items, cfg.batch_size), num_workers=rt.workers,
        collate_fn=collate_views, pin_memory=rt.device.startswith("cuda"),
        prefetch_factor=4 if rt.workers else None, persistent_workers=False)
    committer = ShardCommitter(store, layout, cfg.formats)
    bar = tqdm(total=len(items), unit="img", disable=not rt.progress, smoothing=0.05,
               desc=f"precompute rank {rt.rank}/{rt.world_size}" if rt.world_size > 1 else "precompute")
    skipped = 0
    try:
        for batch in loader:
            samples = []
            if batch["pixels"] is not None:
                pixels = batch["pixels"].to(rt.device, non_blocking=True)
                targets = compute_targets(teachers, pixels, spec, cfg.precision)
                metas = [it["meta"] for it in batch["ok"]]
                views = stored_views(targets, pixels, metas, layout.patch_size, cfg.store == "full")
                samples = [(it["view"], it["shard"], it["image"], s) for it, s in zip(batch["ok"], views)]
            committer.put(samples, batch["failed"])
            skipped += len(batch["failed"])
            bar.update(len(batch["ok"]) + len(batch["failed"]))
            bar.set_postfix(skipped=skipped, refresh=False)
    finally:
        bar.close()
        committer.close()

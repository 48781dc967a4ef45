"""`hdistill precompute`: images -> views -> teachers -> targets -> store, resumable and rank-split.

Pipeline (one process = one rank):
  DataLoader workers   read + decode the image, render the view            (CPU, parallel)
  main thread          teachers' forward, mask, keep rows/cols, fp16       (device)
  writer thread        npy encoding, tar + zarr writing, commit records    (I/O)

Resume and scale-out rest on a fixed shard layout (StoreLayout): shard (view v, index k)
always holds the same store positions (a seeded permutation of the input images), rank r of W
writes the shards whose place p in the list of shards has p % W == r, and a shard counts as done
once its commit record exists. Batches never span shards, so a shard's bytes do not depend on
the rank, the world size or resumes. The store itself is read and written through `shards`.
"""
from __future__ import annotations

import functools
import queue
import sys
import threading
import time

import numpy as np
import torch
from tqdm import tqdm

from hdistill.common.errors import HdistillError
from hdistill.common.options import option_name
from hdistill.common.processes import (Failure, StopRequest, Stopped, duration, exit_with_launcher, loader_worker_init,
                                       start_workers)
from hdistill.common.views import ViewRecord, ViewTargets
from hdistill.common.storage import Location, Retry, error_text, read_files, transient
from hdistill.common.targets import KINDS, TargetSpec
from hdistill.common.tokens import gather_rows, patchify, token_index
from hdistill.shards.encoding import encode
from hdistill.shards.format import ZSTD_SAVING, StoredSample, shard_name
from hdistill.shards.manifest import Manifest
from hdistill.shards.pixels import decode_patches, encode_patches
from hdistill.shards.size import planned_view_bytes, size_lines
from hdistill.shards.writer import StoreWriter

from .config import PrecomputeConfig, Runtime
from .data import ImageRef, TarIndex, list_images
from .image import decode_image
from .targets import compute_targets, plan_store, views_visible
from .teachers import Teacher, build_teachers
from .view import make_view, teacher_view


FEW_KEPT = 0.1      # a mask that keeps less than this share of the patches is said to keep few


def warn_if_few_kept(manifest: Manifest):
    """A mask that leaves the student a handful of patches (--mask-ratio 0.99: 1 of 256) is allowed, and said."""
    counts = manifest.mask.kept_counts(manifest.layout.num_patches)
    if counts[-1] < FEW_KEPT * counts[0]:
        print(f"precompute: warning: the mask keeps {counts[-1]} of {counts[0]} patches "
              f"({' -> '.join(map(str, counts))}, --mask-ratio {manifest.mask.ratio} at {len(counts) - 1} stage(s)): "
              f"the student sees {100 * counts[-1] / counts[0]:.1f}% of each view (the paper's K = 0.3 keeps 35%)",
              file=sys.stderr)


def print_size(manifest: Manifest, images: list[ImageRef], cfg: PrecomputeConfig, probes: int = 8):
    """The store's size before any teacher runs: bytes per view by entry, from the shapes (the JPEG's from `probes`
    views of the first images), for every image and view, and the reads a GPU needs."""
    jpeg, notes = None, {}
    if manifest.pixels.encoding == "jpeg":
        jpeg = jpeg_bytes(images[:probes], cfg, manifest)
        notes["pixels.jpg"] = f"  (estimated from {min(probes, len(images))} views)"
    if manifest.compress == "zstd":
        notes.update({m: f"  (before zstd, which saves {ZSTD_SAVING})"
                      for m in manifest.members().values() if m.endswith(".zst")})
    lines = size_lines(planned_view_bytes(manifest, jpeg), len(images), manifest.layout.views, notes)
    print("precompute: store size: " + "\n".join(lines), file=sys.stderr)


def jpeg_bytes(images: list[ImageRef], cfg: PrecomputeConfig, manifest: Manifest) -> float:
    """Mean bytes of the JPEG of a view's stored patches, over views 0 of `images` (a seeded choice of patches
    stands for the mask, which needs the teacher)."""
    layout, sizes = manifest.layout, []
    g, rng = layout.image_size // layout.patch_size, np.random.default_rng(cfg.seed)
    for ref in images:
        try:
            view, _ = make_view(decode_image(ref.read(), ref.source, cfg.max_image_pixels), ref.image_id, 0, cfg.seed,
                                cfg.image_size, crop=cfg.crop)
        except (HdistillError, OSError):
            continue
        patches = patchify(torch.from_numpy(view)[None], layout.patch_size)[0].numpy()           # [N, P, P, 3]
        keep = np.sort(rng.choice(layout.num_patches, layout.stored_patches, replace=False))
        sizes.append(len(encode_patches(patches[keep], g, cfg.jpeg_quality)))
    return float(np.mean(sizes)) if sizes else 0.0


# ---------------------------------------------------------------- loading (DataLoader workers)

class ViewDataset(torch.utils.data.Dataset):
    """Item i = (view, shard index, store position) -> the rendered view of the image at that position,
    or the reason it failed. A batch's images are read together (`__getitems__`, which the DataLoader
    calls with each batch): on object storage each read is a request, bound by its latency."""

    def __init__(self, images: list[ImageRef], order, items: list[tuple[int, int, int]], cfg: PrecomputeConfig,
                 patch: int, retry: Retry):
        self.images, self.order, self.items, self.cfg, self.retry = images, order, items, cfg, retry
        self.patch = patch

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.__getitems__([i])[0]

    def __getitems__(self, indices: list[int]) -> list[dict]:
        refs = [self.images[int(self.order[self.items[i][2]])] for i in indices]
        wanted = [k for k, ref in enumerate(refs) if ref.request is not None]
        reads: list = [None] * len(refs)
        for k, data in zip(wanted, read_files([refs[k].request for k in wanted])):
            reads[k] = data
        for k, ref in enumerate(refs):
            if ref.request is None or isinstance(reads[k], Exception):   # generated, or failed: alone, retried
                reads[k] = self._read(ref, reads[k])
        return [self._render(i, ref, read) for i, ref, read in zip(indices, refs, reads)]

    def _read(self, ref: ImageRef, failed: Exception | None) -> bytes | Exception:
        try:
            return self.retry.call(ref.read, ref.source, failed)
        except Exception as err:  # noqa: BLE001 - sorted by _render: a lasting failure is the input's or the run's
            return err

    def _render(self, i: int, ref: ImageRef, read: bytes | Exception) -> dict:
        view, shard, position = self.items[i]
        out = {"view": view, "shard": shard, "position": position}
        if isinstance(read, Exception):
            err = read
            if transient(err):    # the storage, not the image: stop rather than skip an image the store should hold
                return Failure(f"{ref.source}: cannot read after {self.retry.attempts} retries "
                               f"({type(err).__name__}: {error_text(err)}); run the same command again to resume")
            if not isinstance(err, OSError):
                raise err
            return {**out, "skipped": {"source": ref.source, "image_id": ref.image_id,
                                       "reason": f"{ref.source}: cannot read ({err.strerror or err})"}}
        try:
            img = decode_image(read, ref.source, self.cfg.max_image_pixels)
            pixels, params = make_view(img, ref.image_id, view, self.cfg.seed, self.cfg.image_size, crop=self.cfg.crop)
        except HdistillError as err:
            return {**out, "skipped": {"source": ref.source, "image_id": ref.image_id, "reason": str(err)}}
        record = ViewRecord(ref.source, img.size, params)
        if self.cfg.pixels == "jpeg":       # the teacher sees the JPEG's pixels; the mosaic is encoded from the view's
            out["source"] = torch.from_numpy(pixels)
        seen = teacher_view(pixels, self.patch, self.cfg.pixels, self.cfg.jpeg_quality)
        return {**out, "pixels": torch.from_numpy(seen), "record": record}


def collate_views(items: list) -> dict | Failure:
    """A batch of rendered views and of the inputs skipped (unreadable or undecodable), or the batch's Failure."""
    failure = next((it for it in items if isinstance(it, Failure)), None)
    if failure:
        return failure
    ok = [it for it in items if "pixels" in it]
    return {"pixels": torch.stack([it["pixels"] for it in ok]) if ok else None,
            "source": torch.stack([it["source"] for it in ok]) if ok and "source" in ok[0] else None,
            "ok": [{k: it[k] for k in ("view", "shard", "position", "record")} for it in ok],
            "skipped": [{k: it[k] for k in ("view", "shard", "position", "skipped")} for it in items if "skipped" in it]}


def shard_batches(items: list[tuple[int, int, int]], batch_size: int) -> list[list[int]]:
    """Batches of item positions that never cross a shard boundary."""
    batches, current = [], []
    for pos, (view, shard, _position) in enumerate(items):
        if current and (len(current) == batch_size or items[current[0]][:2] != (view, shard)):
            batches.append(current)
            current = []
        current.append(pos)
    return batches + ([current] if current else [])


# ---------------------------------------------------------------- targets -> stored samples

def stored_samples(values: ViewTargets, targets: list[TargetSpec], pixels: torch.Tensor,
                   records: list[ViewRecord], patch: int, full: bool, source: torch.Tensor | None = None,
                   quality: int | None = None) -> list[StoredSample]:
    """Keep the stored tokens' rows/columns, encode each target, move to the CPU -> samples. `source`: with JPEG
    pixels, the views as rendered (uint8 [B, S, S, 3]), whose stored patches become each sample's JPEG."""
    mask = values.mask
    keep_idx = torch.arange(mask.stage.shape[1], device=mask.stage.device).expand_as(mask.stage) \
        if full else mask.keep_idx                                                # [B, n]
    arrays = {"stage": mask.stage, "keep": keep_idx.to(torch.int16),
              "pixels": gather_rows(patchify(pixels.to(keep_idx.device), patch), keep_idx)}  # [B, n, P, P, 3]
    if values.visible is not None:
        arrays["visible"] = values.visible.to(torch.int16)                        # [B, m]
    who = lambda rows: ", ".join(records[i].source for i in rows[:5])  # noqa: E731
    for spec in targets:
        value = values.values[spec.name]
        tokens = token_index(keep_idx, spec.cls)                                 # [B, 1+n] ([B, n] without CLS)
        arrays.update(encode(spec, KINDS[spec.kind].gather(value, tokens), who))
    arrays = {name: a.cpu().numpy() for name, a in arrays.items()}
    samples = [StoredSample(record, {name: a[i] for name, a in arrays.items()}) for i, record in enumerate(records)]
    if source is not None:
        stored = gather_rows(patchify(source, patch), keep_idx.cpu()).numpy()           # [B, n, P, P, 3]
        for sample, patches in zip(samples, stored):
            sample.jpeg = stored_jpeg(sample, patches, source.shape[1] // patch, quality)
    return samples


def stored_jpeg(sample: StoredSample, patches: np.ndarray, columns: int, quality: int) -> bytes:
    """The JPEG of a sample's stored patches (as rendered), checked to decode to the pixels its teacher saw."""
    data = encode_patches(patches, columns, quality)
    seen = sample.arrays["pixels"]
    if not np.array_equal(decode_patches(data, len(seen), seen.shape[1], columns), seen):
        raise HdistillError(f"{sample.record.source}: the JPEG of its stored patches does not decode to the pixels the "
                            "teacher saw: this JPEG codec does not treat blocks independently; use --pixels raw")
    return data


# ---------------------------------------------------------------- writing (writer thread)

class ShardCommitter:
    """Collects each shard's samples and has the writer commit the shard once all its positions are
    accounted for. Runs on a background thread; the first error stops it and is re-raised in the
    main thread. Shards of only skipped inputs wait until a view of the run was rendered: when none can be (a lost
    mount, a list of missing paths), they are never committed, so the run that follows the fix reads them again."""

    def __init__(self, writer: StoreWriter):
        self.writer, self.layout = writer, writer.manifest.layout
        self.pending: dict[tuple[int, int], dict] = {}
        self.held: list[tuple[tuple[int, int], dict]] = []     # whole shards waiting for a rendered view
        self.rendered = False                                  # a view of this run went into a shard
        self.queue: queue.Queue = queue.Queue(maxsize=8)
        self.error: BaseException | None = None
        self.committed = 0
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def put(self, samples: list[tuple[int, int, int, StoredSample]], skipped: list[dict]):
        self.raise_error()
        self.queue.put((samples, skipped))

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
                samples, skipped = batch
                self.rendered = self.rendered or bool(samples)
                for view, shard, position, sample in samples:
                    self._shard(view, shard)["samples"].append((position, sample))
                for s in skipped:
                    self._shard(s["view"], s["shard"])["skipped"].append(
                        {"position": s["position"], "view": s["view"], **s["skipped"]})
                whole = [k for k, s in self.pending.items()
                         if len(s["samples"]) + len(s["skipped"]) == len(self.layout.positions(k[1]))]
                self.held += [(key, self.pending.pop(key)) for key in whole]
                if self.rendered:
                    for key, shard in self.held:
                        self.writer.commit(*key, shard["samples"], shard["skipped"])
                        self.committed += 1
                    self.held = []
        except BaseException as err:  # noqa: BLE001 - handed to the main thread
            self.error = err
            while self.queue.get() is not None:
                pass

    def _shard(self, view, index):
        return self.pending.setdefault((view, index), {"samples": [], "skipped": []})


# ---------------------------------------------------------------- the run

SKIPPED_SHARE = 0.01     # above this share of skipped views, the run ends with a warning and the first reasons

def run_precompute(cfg: PrecomputeConfig, out: str, rt: Runtime,
                   teachers: dict[str, Teacher] | None = None) -> Manifest | None:
    """Precompute (this rank's part of) the store at `out`; returns the manifest once complete.

    `teachers` may be passed prebuilt (as build_teachers(cfg, rt.device) makes them), e.g. by benchmarks.
    """
    cfg.validate()
    rt = rt.resolved()
    exit_with_launcher(f"precompute rank {rt.rank}/{rt.world_size}")
    store = Location(out)
    store.check_writable("--out")
    images = list_images(cfg.data, cfg.limit, TarIndex(store, rt.rank, rt.world_size))
    teachers = teachers or build_teachers(cfg, rt.device)
    writer = StoreWriter(store, plan_store(cfg, teachers, len(images)),
                         flag=functools.partial(option_name, PrecomputeConfig))
    if rt.rank == 0:
        warn_if_few_kept(writer.manifest)
        if rt.dry_run or not rt.quiet:
            print_size(writer.manifest, images, cfg)
    if rt.dry_run:
        return None
    writer.open()
    writer.lock_rank(rt.rank, rt.world_size)
    try:
        layout = writer.manifest.layout
        done = writer.committed()
        ours = [(v, k) for p, (v, k) in enumerate(layout.shards()) if p % rt.world_size == rt.rank]
        mine = [(v, k) for v, k in ours if shard_name(v, k) not in done]
        if len(mine) < len(ours):
            rank = f" rank {rt.rank}/{rt.world_size}" if rt.world_size > 1 else ""
            print(f"precompute{rank}: resuming {out}: {len(ours) - len(mine)} of its {len(ours)} shards were "
                  f"committed before, {len(mine)} to go", file=sys.stderr)
        items = [(v, k, p) for v, k in mine for p in layout.positions(k)]
        if items:
            _process(cfg, rt, writer, teachers, images, items)
        return writer.finalize()
    finally:
        writer.release()


def _process(cfg, rt, writer, teachers, images, items):
    manifest = writer.manifest
    dataset = ViewDataset(images, manifest.layout.order, items, cfg, manifest.layout.patch_size, rt.retry)
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=shard_batches(items, cfg.batch_size), num_workers=rt.workers,
        collate_fn=collate_views, pin_memory=rt.device.startswith("cuda"), worker_init_fn=loader_worker_init,
        prefetch_factor=4 if rt.workers else None, persistent_workers=False)
    committer = ShardCommitter(writer)
    name = f"precompute rank {rt.rank}/{rt.world_size}" if rt.world_size > 1 else "precompute"
    bar = tqdm(total=len(items), unit="img", disable=not rt.progress, smoothing=0.05, desc=name)
    progress = ProgressLines(name, len(items), len({(v, k) for v, k, _ in items}), rt.log_every_s) \
        if rt.log_lines else None
    skipped, done, reasons, stop = 0, 0, [], StopRequest()
    try:
        with stop.listening():
            for batch in start_workers(loader):
                if stop:            # the shard in progress is dropped: only whole shards are committed
                    break
                committer.put(_targets_of(cfg, rt.device, manifest, teachers, batch), batch["skipped"])
                skipped += len(batch["skipped"])
                reasons += [s["skipped"]["reason"] for s in batch["skipped"][:3 - len(reasons)]]
                done += len(batch["ok"]) + len(batch["skipped"])
                bar.update(len(batch["ok"]) + len(batch["skipped"]))
                bar.set_postfix(skipped=skipped, refresh=False)
                if progress:
                    progress.update(done, committer.committed, skipped)
    finally:
        bar.close()
        committer.close()
    if stop:
        raise Stopped(f"{name}: {stop.name}: stopped after committing {committer.committed} whole shard(s) in this "
                      "run (the shard in progress is dropped); run the same command to resume", stop.signum)
    if progress:
        progress.update(done, committer.committed, skipped, last=True)
    _say_unreadable(name, done, skipped, "; ".join(reasons), committer.rendered)


def _targets_of(cfg, device: str, manifest, teachers, batch: dict) -> list[tuple]:
    """A batch of rendered views -> (view, shard, position, stored sample) of each, the teachers' targets in it."""
    if batch["pixels"] is None:                      # every view of the batch was skipped
        return []
    pixels = batch["pixels"].to(device, non_blocking=True)
    records = [it["record"] for it in batch["ok"]]
    visible = views_visible(manifest, [(r.params.image_id, r.params.view) for r in records])
    values = compute_targets(teachers, pixels, manifest.targets, manifest.mask, cfg.precision, visible)
    stored = stored_samples(values, manifest.targets, pixels, records, manifest.layout.patch_size,
                            cfg.tokens == "full", batch["source"], cfg.jpeg_quality)
    return [(it["view"], it["shard"], it["position"], s) for it, s in zip(batch["ok"], stored)]


def _say_unreadable(name: str, done: int, skipped: int, first: str, rendered: bool):
    """A run none of whose images could be read stops; one that skipped more than SKIPPED_SHARE warns."""
    if done and not rendered:
        raise HdistillError(f"{name}: none of the images of its {done} views could be read (first: {first}); nothing "
                            "was committed. Check --data (a lost mount, a list of paths that no longer exist), then run "
                            "the same command again")
    if skipped > SKIPPED_SHARE * done:
        print(f"{name}: warning: {skipped} of {done} views ({100 * skipped / done:.1f}%) were skipped, their images "
              f"unreadable (first: {first}); the manifest lists them all (hdistill inspect STORE)", file=sys.stderr)


class ProgressLines:
    """Plain progress lines on stderr for logs that are not a terminal (SLURM, files): after the first batch, then
    every `every_s` seconds, then at the end: views done, shards committed, views/s, ETA."""

    def __init__(self, name: str, views: int, shards: int, every_s: float):
        self.name, self.views, self.shards, self.every_s = name, views, shards, every_s
        self.start = time.perf_counter()
        self.last: float | None = None

    def update(self, done: int, committed: int, skipped: int, last: bool = False):
        now = time.perf_counter()
        if not last and self.last is not None and now - self.last < self.every_s:
            return
        self.last = now
        rate = done / max(now - self.start, 1e-9)
        eta = (self.views - done) / max(rate, 1e-9)
        print(f"{self.name}: {done}/{self.views} views ({100 * done / max(self.views, 1):.0f}%), {committed}/"
              f"{self.shards} shards committed, {skipped} skipped, {rate:.1f} views/s, eta {duration(eta)}",
              file=sys.stderr, flush=True)

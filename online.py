"""`hdistill train --online [--fresh-views]`: the same training with targets computed live by the teachers.

It composes both halves of hdistill (which is why it lives beside the CLI, not in train/): the
store's manifest says which teachers, weights, views and mask made it; the sample order is the
offline loader's (same shard order, rank and worker split, shuffle buffer); loader workers
render each view again from its source image, and the main process runs the teachers on every
batch. It is the baseline that offline training is measured against, and its correctness
reference: on the CPU both give the same losses up to the float16 rounding of stored targets.
"""
from __future__ import annotations

import functools

import numpy as np
import torch

from hdistill.common.errors import HdistillError
from hdistill.common.views import sample_key, split_key
from hdistill.common.targets import KINDS
from hdistill.common.tokens import gather_rows, patchify, token_index
from hdistill.precompute.data import list_images
from hdistill.precompute.image import decode_image
from hdistill.precompute.config import PrecomputeConfig
from hdistill.precompute.teachers import build_teachers
from hdistill.precompute.targets import compute_targets, plan_store, views_visible
from hdistill.precompute.view import make_view, teacher_view
from hdistill.train.config import OnlineConfig
from hdistill.train.data import StoreStream, StreamSpec, select_patches
from hdistill.train.loader import Store
from hdistill.train.source import SourceFactory, SourcePlan


def collate_views(samples: list[dict], array=None) -> dict:
    """Rendered views -> a batch ({"count", "keys", "pixels" [B, S, S, 3]}); `array` (StoreStream.collate's) unused."""
    return {"count": len(samples), "keys": [s["key"] for s in samples],
            "pixels": torch.from_numpy(np.stack([s["pixels"] for s in samples]))}


class LiveViews(StoreStream):
    """The store's sample order (same plan, lanes and pieces); each sample is a view rendered again:
    {"key", "pixels" [S, S, 3]}.

    fresh=False: the stored view (epoch e renders view e mod V). fresh=True: view e itself, so every
    epoch brings a new RandomResizedCrop + flip of every image (the paper's regime); epochs below V
    render the stored views, later ones views no store holds.
    """

    def __init__(self, store: Store, spec: StreamSpec, images, fresh: bool = False):
        super().__init__(store, spec)
        self.images, self.fresh = images, fresh
        self.load_ahead = False                  # the views come from the images, not from the store's shards
        self.view_seed = store.manifest.config["seed"]
        self.skipped = {(s["image_id"], s["view"]) for s in store.manifest.skipped}

    collate = staticmethod(collate_views)

    def check_present(self, views):
        """Nothing to check: the views are rendered from the images, not read from the shards."""

    def _read(self, shard, offsets, loading=None):
        """The views at `offsets` of a shard: its positions less the inputs precompute could not read."""
        refs = [self.images[int(self.layout.order[p])] for p in self.layout.positions(shard.index)]
        refs = [ref for ref in refs if (ref.image_id, shard.view) not in self.skipped]
        view = self.epoch if self.fresh else shard.view
        for offset in sorted(offsets) if offsets is not None else range(len(refs)):
            ref = refs[offset]
            try:
                img = decode_image(ref.read(), ref.source, self.manifest.config["max_image_pixels"])
            except (HdistillError, OSError) as err:
                raise HdistillError(f"--online: {err} (it was readable when the store was made)") from None
            pixels, _ = make_view(img, ref.image_id, view, self.view_seed, self.layout.image_size,
                                  crop=self.manifest.config["crop"])
            pixels = teacher_view(pixels, self.layout.patch_size, self.manifest.pixels.encoding,
                                  self.manifest.pixels.quality)
            yield {"key": sample_key(ref.image_id, view), "pixels": pixels}


class LiveTargets:
    """A train source (train.source.TargetSource) whose targets come from the store's teachers, live."""

    def __init__(self, plan: SourcePlan, options: OnlineConfig):
        manifest = plan.store.manifest
        self.pcfg = PrecomputeConfig(**manifest.config)
        self.device, self.fresh_views = plan.device, options.fresh_views
        self.teachers = build_teachers(self.pcfg, self.device)
        data = options.data or self.pcfg.data
        images = list_images(data, self.pcfg.limit)
        if len(images) != manifest.layout.num_images:
            raise HdistillError(f"--online: {data} holds {len(images)} images, the store was made from "
                                f"{manifest.layout.num_images}")
        if plan_store(self.pcfg, self.teachers, len(images)).identity() != manifest.identity():
            raise HdistillError("--online: the teachers rebuilt from the store's manifest do not give its targets")
        if options.fresh_views and self.pcfg.crop != "random":
            raise HdistillError("--fresh-views: the store was made with --crop center; fresh views are random crops")
        self.manifest, self.targets, self.mask, self.seed = manifest, plan.spec.targets, plan.spec.mask, plan.spec.seed
        self.stream = LiveViews(plan.store, plan.spec, images, options.fresh_views)

    def record(self) -> dict:
        return {"source": "online", "fresh_views": self.fresh_views}

    def prepare(self, batch: dict) -> dict:
        """Views -> the batch the offline loader would give, with float32 targets."""
        pixels = batch["pixels"].to(self.device, non_blocking=True)
        visible = views_visible(self.manifest, [split_key(key) for key in batch["keys"]])        # [B, m] or None
        targets = compute_targets(self.teachers, pixels, self.targets, self.manifest.mask, self.pcfg.precision,
                                  visible)
        stage = targets.mask.stage.cpu().numpy()
        n_keep = self.stream.n_keep
        sel = torch.from_numpy(np.stack([
            select_patches(self.mask, stage[i], key, self.seed, self.stream.epoch, n_keep)
            for i, key in enumerate(batch["keys"])])).to(self.device)             # [B, n]
        return {"count": batch["count"],
                "pixels": gather_rows(patchify(pixels, self.stream.layout.patch_size), sel),
                "keep": sel,
                "targets": {t.name: KINDS[t.kind].gather(targets.values[t.name], token_index(sel, t.cls))
                            for t in self.targets},
                **({} if visible is None else {"visible": {"teacher": visible.to(self.device)}})}


def live_targets(options: OnlineConfig) -> SourceFactory:
    """A run's `source` (train.run.solo) for `hdistill train --online [--fresh-views] [--data D]`."""
    return functools.partial(LiveTargets, options=options)

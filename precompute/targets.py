"""Teacher targets for a batch of views: one forward per teacher, all tokens visible.

The store's target table (common.targets.TargetSpec) says what to take from which teacher; each
target is captured by the teacher's tap for its kind (feat@B, rel@B, msa@B) or, for the final
features, is the teacher's own `tokens` output. The mask teacher's block outputs at the mask
blocks drive the mask, from that same forward or, with MaskSpec.forward "drop", from a second one that
drops each stage's tokens (precompute.mask). Hooks capture everything, so the models run their own forward
with fused attention (SDPA) left on.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import asdict, replace

import numpy as np
import torch

from hdistill.common.errors import HdistillError
from hdistill.common.grid import TokenGrid, check_same_grid
from hdistill.common.mask_spec import MaskSpec, ProgressiveMask, default_relation_blocks
from hdistill.common.views import ViewTargets
from hdistill.common.targets import KINDS, TargetRequest, TargetSpec, encoding_for, parse_targets
from hdistill.common.tokens import visible_count
from hdistill.shards.encoding import parse_encodings
from hdistill.shards.format import StoreLayout
from hdistill.shards.manifest import Manifest
from hdistill.shards.pixels import PixelSpec, decoder

from .config import PrecomputeConfig
from .mask import mask_from_dropping_forward, mask_from_full_forward
from .teachers import ROLES, Teacher
from .view import teacher_visible


def resolve_blocks(blocks: Sequence[int], depth: int, what: str) -> tuple[int, ...]:
    """Blocks as given by the user (negative counts from the end) -> ascending 0-indexed blocks."""
    resolved = []
    for b in blocks:
        r = b + depth if b < 0 else b
        if not 0 <= r < depth:
            raise HdistillError(f"{what}: block {b} is out of range for a {depth}-block model "
                                f"(valid: 0..{depth - 1}, or -{depth}..-1 from the end)")
        resolved.append(r)
    return tuple(sorted(set(resolved)))


def mim_roles(teachers: dict[str, Teacher]) -> list[str]:
    return [r for r in teachers if ROLES[r].kind == "mim"]


def plan_mask(teachers: dict[str, Teacher], ratio: float = 0.3, role: str | None = None,
              blocks: Sequence[int] | None = None, mean: str = "normalized", strategy: str = "progressive",
              forward: str = "full") -> MaskSpec:
    """The mask teacher is the first MIM teacher unless `role` names one; ratio 0 or no MIM teacher
    means no mask (every patch kept). Blocks default to [0, L/3, 2L/3]; a direct mask ranks once at the
    last block and drops as many patches as those progressive stages would."""
    if not teachers:
        raise HdistillError("no teachers given: pass --teachers, e.g. --teachers mae,clip")
    check_same_grid({f"teacher {r!r} ({t.info.model})": t.info.grid for r, t in teachers.items()})
    if role is not None and role not in teachers:
        raise HdistillError(f"--mask-teacher {role!r} is not among the teachers ({', '.join(teachers)})")
    if role is None and ratio > 0:
        role = next(iter(mim_roles(teachers)), None)
    if role is None or ratio == 0:
        return MaskSpec(ratio=0.0, mean=mean)
    depth = teachers[role].info.depth
    chosen = MaskSpec.default_blocks(depth) if blocks is None else blocks
    progressive = resolve_blocks(chosen, depth, f"--mask-blocks of teacher {role!r}")
    if strategy == "direct":
        return MaskSpec(ratio=ratio, blocks=(depth - 1,), role=role, mean=mean, strategy=strategy, forward=forward,
                        stages=len(progressive))
    return MaskSpec(ratio=ratio, blocks=progressive, role=role, mean=mean, strategy=strategy, forward=forward)


def default_requests(teachers: dict[str, Teacher]) -> list[TargetRequest]:
    """The paper's targets: final features of every non-MIM teacher, Q K^T of each MIM teacher at
    its blocks L-3 and L-2 (0-indexed; the paper's layers L-1 and L-2)."""
    mim = mim_roles(teachers)
    feats = [TargetRequest(r, "feat") for r in teachers if r not in mim] or \
        [TargetRequest(r, "feat") for r in teachers]
    rels = [TargetRequest(r, "rel", b) for r in mim for b in default_relation_blocks(teachers[r].info.depth)]
    return feats + rels


def plan_targets(teachers: dict[str, Teacher], requests: Sequence[TargetRequest] | None, patches: int,
                 encodings: dict[str, str] | None = None) -> list[TargetSpec]:
    """Requests (None: the defaults) -> the store's target table, for `patches` stored patches (n) and each
    teacher's CLS token if it has one (TokenLayout)."""
    encodings = encodings or {}
    specs = {}
    for req in default_requests(teachers) if requests is None else requests:
        if req.role not in teachers:
            raise HdistillError(f"--target {req.role}:{req.kind}: {req.role!r} is not among the teachers "
                                f"({', '.join(teachers)})")
        info, kind = teachers[req.role].info, KINDS[req.kind]
        if kind.decoded:
            _check_decoded(req, info, patches)
        block = None if req.block is None else \
            resolve_blocks([req.block], kind.depth(info), f"--target {req.role}:{req.kind}@{req.block}")[0]
        shape = kind.shape(info, info.layout.stored_prefix + patches)
        spec = TargetSpec(req.kind, req.role, block, shape, cls=info.layout.cls)
        specs[spec.name] = replace(spec, encoding=encoding_for(spec, encodings))
    unused = set(encodings) - {"*"} - {k for s in specs.values() for k in (s.name, s.kind)}
    if unused:
        raise HdistillError(f"--encoding {', '.join(sorted(unused))}: no such target in this store "
                            f"(targets: {', '.join(specs)})")
    kinds = list(KINDS)
    return sorted(specs.values(), key=lambda s: (kinds.index(s.kind), s.role, -1 if s.block is None else s.block))


def _check_decoded(req: TargetRequest, info, patches: int):
    """A decoder's target needs a teacher with a decoder, and a store of every patch (the decoder predicts them all,
    and the student's encoder sees the teacher's visible patches of them)."""
    tap = f"--target {req.role}:{req.kind}@{req.block}"
    if not info.decoder_depth:
        raise HdistillError(f"{tap}: teacher {req.role!r} ({info.model}) has no decoder; dec targets are an MAE "
                            f"teacher's decoder states: --model {req.role}=mae:vit_base_patch16_dec512d8b with "
                            "--weights ROLE=mae_pretrain_vit_base_full.pth")
    if patches != info.grid.num_patches:
        raise HdistillError(f"{tap}: the decoder's states are at every patch, and the student's encoder sees the "
                            "teacher's visible patches of them: give --tokens full")


@contextmanager
def _capture(teacher: Teacher, taps: Sequence[tuple[str, int]]):
    """Hooks that fill {(kind, block): tensor} during a forward."""
    captured = {}

    def store(key):
        return lambda value: captured.__setitem__(key, value)

    handles = [teacher.tap(kind, block, store((kind, block))) for kind, block in taps]
    try:
        yield captured
    finally:
        for h in handles:
            h.remove()


@torch.inference_mode()
def compute_targets(teachers: dict[str, Teacher], pixels: torch.Tensor, targets: Sequence[TargetSpec],
                    mask: MaskSpec, precision: str = "fp32", visible: torch.Tensor | None = None) -> ViewTargets:
    """uint8 views [B, H, W, 3] -> ViewTargets over all tokens (the mask says which are kept). `visible` [B, m]: the
    patches each view's teacher encoder sees for the dec targets (precompute.view.teacher_visible), which need it.

    precision "bf16" runs the teachers under bf16 autocast: their matmuls, the qkv output and the residual
    stream are bf16; Q K^T is formed in float32 from the bf16 q and k, and the mask ranks in float64.
    """
    out = ViewTargets(visible=visible)
    for role, teacher in teachers.items():
        decoded = [t for t in targets if t.role == role and KINDS[t.kind].decoded]
        mine = [t for t in targets if t.role == role and not KINDS[t.kind].decoded]
        ranks_here = role == mask.role and mask.forward == "full"
        autocast = torch.autocast(teacher.mean.device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
        images = teacher.preprocess(pixels) if mine or decoded or role == mask.role else None
        if decoded:
            with autocast:
                states = teacher.decoder_states(images, visible.to(images.device), sorted({t.block for t in decoded}))
            out.values.update({t.name: states[t.block].float() for t in decoded})
        if mine or ranks_here:
            taps = {(t.kind, t.block) for t in mine if t.block is not None}
            mask_taps = [("feat", b) for b in mask.blocks] if ranks_here else []
            with _capture(teacher, sorted(taps | set(mask_taps))) as captured, autocast:
                final = teacher.tokens(images)
            for t in mine:
                out.values[t.name] = (final if t.block is None else captured[(t.kind, t.block)]).float()
            if ranks_here:
                out.mask = mask_from_full_forward([captured[tap] for tap in mask_taps], mask,
                                                  teacher.info.layout.stored_prefix)
        if role == mask.role and mask.forward == "drop":
            with autocast:
                out.mask = mask_from_dropping_forward(teacher, images, mask)
    if out.mask is None:
        any_teacher = next(iter(teachers.values()))
        out.mask = _all_kept(pixels.shape[0], any_teacher.info.grid, any_teacher.mean.device)
    return out


def views_visible(manifest: Manifest, views: Sequence[tuple[str, int]]) -> torch.Tensor | None:
    """The patches the teacher's encoder sees of each view (image id, view index) for a store's dec targets, int64
    [B, m] (precompute.view.teacher_visible); None for a store without them."""
    layout = manifest.layout
    if not layout.teacher_visible:
        return None
    ratio, seed = manifest.config["teacher_mask_ratio"], manifest.config["seed"]
    return torch.from_numpy(np.stack([teacher_visible(seed, image_id, view, layout.num_patches, ratio)
                                      for image_id, view in views])).long()


def _all_kept(batch: int, grid: TokenGrid, device) -> ProgressiveMask:
    n = grid.num_patches
    return ProgressiveMask(stage=torch.zeros(batch, n, dtype=torch.uint8, device=device),
                           keep_idx=torch.arange(n, device=device).expand(batch, -1))


def plan_store(cfg: PrecomputeConfig, teachers: dict[str, Teacher], num_images: int) -> Manifest:
    """The store's manifest before any shard is written: teachers, target table, mask, layout."""
    mask = plan_mask(teachers, cfg.mask_ratio, cfg.mask_teacher, cfg.mask_blocks, cfg.mask_mean, cfg.mask_strategy,
                     cfg.mask_forward)
    grid = next(iter(teachers.values())).info.grid
    stored = mask.kept_counts(grid.num_patches)[-1] if cfg.tokens == "kept" else grid.num_patches
    requests = None if cfg.targets is None else parse_targets(cfg.targets)
    targets = plan_targets(teachers, requests, stored, parse_encodings(cfg.encodings))
    decoded = any(KINDS[t.kind].decoded for t in targets)
    layout = StoreLayout(num_images=num_images, views=cfg.views, shard_size=cfg.shard_size,
                         image_size=cfg.image_size, patch_size=grid.patch_size, num_patches=grid.num_patches,
                         stored_patches=stored, order_seed=cfg.seed,
                         teacher_visible=visible_count(grid.num_patches, cfg.teacher_mask_ratio) if decoded else 0)
    pixels = PixelSpec("jpeg", cfg.jpeg_quality, decoder()) if cfg.pixels == "jpeg" else PixelSpec()
    return Manifest(config=json.loads(json.dumps(asdict(cfg))), teachers=[t.info for t in teachers.values()],
                    targets=targets, mask=mask, layout=layout, formats=list(cfg.formats), pixels=pixels,
                    compress=cfg.compress)

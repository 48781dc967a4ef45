"""Teacher targets for a batch of views: one forward per teacher, all tokens visible.

    features   the last block's tokens after the final norm           [B, 1+N, D]
    relations  raw per-head Q K^T at chosen blocks (paper Eq. 2: no
               1/sqrt(d) scale, no softmax), from each block's own
               qkv projection after q_norm / k_norm                     [B, H, 1+N, 1+N]
    mask       the progressive mask from the mask teacher's block outputs

Relations and mask inputs are captured with hooks, so the models run their own forward
with fused attention (SDPA) left on.
"""
from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager

import torch

from hdistill.common.errors import HdistillError
from hdistill.common.specs import (MaskSpec, ProgressiveMask, TargetSpec, TokenGrid, ViewTargets,
                                   check_same_grid, default_relation_blocks)

from .mask import progressive_mask
from .teachers import ROLES, Teacher


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


def plan_targets(teachers: dict[str, Teacher], relation_blocks: Sequence[int] | None = None,
                 mask_ratio: float = 0.3, mask_role: str | None = None,
                 mask_blocks: Sequence[int] | None = None) -> TargetSpec:
    """Validate a teacher set and decide its targets.

    Every teacher gives final features; teachers of a MIM role give relations at
    `relation_blocks` (default: the two blocks preceding the last). The mask teacher is the
    first MIM teacher unless `mask_role` names one; `mask_ratio=0` or no MIM teacher means
    no mask (all patches kept).
    """
    if not teachers:
        raise HdistillError("no teachers given: pass --teachers, e.g. --teachers mae,clip")
    check_same_grid({f"teacher {r!r} ({t.info.model})": t.info.grid for r, t in teachers.items()})
    mim_roles = [r for r in teachers if ROLES[r].kind == "mim"]
    relations = {}
    for role in mim_roles:
        depth = teachers[role].info.depth
        blocks = default_relation_blocks(depth) if relation_blocks is None else relation_blocks
        relations[role] = resolve_blocks(blocks, depth, f"--relation-blocks for teacher {role!r}")
    if mask_role is None and mim_roles and mask_ratio > 0:
        mask_role = mim_roles[0]
    if mask_role is not None and mask_role not in teachers:
        raise HdistillError(f"--mask-teacher {mask_role!r} is not among the teachers ({', '.join(teachers)})")
    if mask_role is None:
        mask = MaskSpec(ratio=0.0)
    else:
        depth = teachers[mask_role].info.depth
        blocks = MaskSpec.default_blocks(depth) if mask_blocks is None else mask_blocks
        mask = MaskSpec(ratio=mask_ratio, blocks=resolve_blocks(blocks, depth, f"mask blocks of {mask_role!r}"))
    return TargetSpec(feature_roles=tuple(teachers), relation_blocks=relations, mask_role=mask_role, mask=mask)


@contextmanager
def _capture(teacher: Teacher, relation_blocks: Sequence[int], mask_blocks: Sequence[int]):
    """Hooks that fill {"relations": {block: R}, "stages": {block: tokens}} during a forward."""
    captured = {"relations": {}, "stages": {}}

    def relation(block):
        def store(q, k):
            with torch.autocast(q.device.type, enabled=False):  # the product itself in float32
                captured["relations"][block] = q.float() @ k.float().transpose(-2, -1)  # [B, H, T, T]
        return store

    def stage_hook(block):
        def hook(_module, _args, out):
            captured["stages"][block] = teacher.to_btd(out)
        return hook

    handles = [teacher.hook_qk(b, relation(b)) for b in relation_blocks]
    handles += [teacher.blocks()[b].register_forward_hook(stage_hook(b)) for b in mask_blocks]
    try:
        yield captured
    finally:
        for h in handles:
            h.remove()


@torch.inference_mode()
def compute_targets(teachers: dict[str, Teacher], pixels: torch.Tensor, spec: TargetSpec,
                    precision: str = "fp32") -> ViewTargets:
    """uint8 views [B, H, W, 3] -> ViewTargets (all tokens; the mask says which are kept).

    precision "bf16" runs the teachers under bf16 autocast; Q K^T and the mask are still
    computed in float32 / float64 from the captured tensors.
    """
    targets = ViewTargets()
    for role, teacher in teachers.items():
        rel_blocks = spec.relation_blocks.get(role, ())
        mask_blocks = spec.mask.blocks if role == spec.mask_role else ()
        autocast = torch.autocast(teacher.mean.device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
        with _capture(teacher, rel_blocks, mask_blocks) as captured, autocast:
            tokens = teacher.tokens(teacher.preprocess(pixels))
        if role in spec.feature_roles:
            targets.features[role] = tokens.float()
        if rel_blocks:
            targets.relations[role] = {b: captured["relations"][b] for b in rel_blocks}
        if mask_blocks:
            targets.mask = progressive_mask([captured["stages"][b] for b in mask_blocks], spec.mask)
    if targets.mask is None:
        any_teacher = next(iter(teachers.values()))
        targets.mask = _all_kept(pixels.shape[0], any_teacher.info.grid, any_teacher.mean.device)
    return targets


def _all_kept(batch: int, grid: TokenGrid, device) -> ProgressiveMask:
    n = grid.num_patches
    return ProgressiveMask(stage=torch.zeros(batch, n, dtype=torch.uint8, device=device),
                           keep_idx=torch.arange(n, device=device).expand(batch, -1))

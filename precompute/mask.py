"""The redundant-token mask (paper Sec. 3.2, Eq. 4; Tab. 8); the rule is in common.mask_spec.MaskSpec.

Two forwards give the tokens each stage ranks (MaskSpec.forward):
  full  the teacher ran on all tokens (its targets' own forward); a stage ranks the still-kept rows of
        the block's output: `mask_from_full_forward`.
  drop  PCAE's forward: after each stage the dropped tokens leave the sequence, so the blocks up to the
        next stage run on CLS and the kept patches only: `mask_from_dropping_forward`.
Both rank with `rank_stage`. Similarities are computed in float64 so the ranking does not depend on
the device's float32 rounding.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from hdistill.common.mask_spec import MaskSpec, ProgressiveMask
from hdistill.common.tokens import gather_rows


def rank_stage(kept: torch.Tensor, n_drop: int, mean: str) -> tuple[torch.Tensor, torch.Tensor]:
    """kept patch tokens [B, n, D] -> (positions to drop [B, n_drop], positions kept [B, n - n_drop] ascending),
    as positions into the n kept tokens."""
    kept = kept.double()
    averaged = F.normalize(kept, dim=-1) if mean == "normalized" else kept
    similarity = F.cosine_similarity(kept, averaged.mean(1, keepdim=True), dim=-1)  # [B, n]
    # most similar first; stable, so among equals the lower patch index goes first
    order = torch.argsort(similarity, dim=1, descending=True, stable=True)
    return order[:, :n_drop], order[:, n_drop:].sort(dim=1).values


class _Stages:
    """The mask as its stages are ranked: keep_idx [B, n] ascending patch indices, stage [B, N]."""

    def __init__(self, spec: MaskSpec, batch: int, num_patches: int, device):
        self.spec = spec
        counts = spec.kept_counts(num_patches)
        self.drops = [a - b for a, b in zip(counts, counts[1:])]          # patches each stage drops
        self.keep_idx = torch.arange(num_patches, device=device).expand(batch, -1)
        self.stage = torch.zeros(batch, num_patches, dtype=torch.uint8, device=device)

    def rank(self, s: int, kept: torch.Tensor) -> torch.Tensor:
        """Stage s (1-based) over the kept patch tokens [B, n, D] -> the positions kept, [B, n']."""
        dropped, keep_pos = rank_stage(kept, self.drops[s - 1], self.spec.mean)
        self.stage.scatter_(1, self.keep_idx.gather(1, dropped), s)
        self.keep_idx = self.keep_idx.gather(1, keep_pos)
        return keep_pos

    def result(self) -> ProgressiveMask:
        return ProgressiveMask(stage=self.stage, keep_idx=self.keep_idx)


def mask_from_full_forward(stage_tokens: list[torch.Tensor], spec: MaskSpec, prefix: int = 1) -> ProgressiveMask:
    """stage_tokens[s]: the mask teacher's output of block spec.blocks[s] over all tokens, [B, prefix+N, D], the
    `prefix` tokens (its CLS) ahead of the patches."""
    B, T, _ = stage_tokens[0].shape
    stages = _Stages(spec, B, T - prefix, stage_tokens[0].device)
    for s, tokens in enumerate(stage_tokens, start=1):
        stages.rank(s, gather_rows(tokens[:, prefix:], stages.keep_idx))        # [B, n, D]
    return stages.result()


def mask_from_dropping_forward(teacher, images: torch.Tensor, spec: MaskSpec) -> ProgressiveMask:
    """Normalised images -> the mask of a forward that drops each stage's tokens (PCAE). The teacher runs
    its blocks up to the last mask block only; its prefix tokens (CLS, registers) go on through every block."""
    p = teacher.info.layout.prefix
    x = teacher.embed(images)                                                 # [B, p+N, D]
    stages = _Stages(spec, x.shape[0], x.shape[1] - p, x.device)
    first = 0
    for s, last in enumerate(spec.blocks, start=1):
        for b in range(first, last + 1):
            x = teacher.run_block(b, x)
        first = last + 1
        keep_pos = stages.rank(s, x[:, p:])
        x = torch.cat([x[:, :p], gather_rows(x[:, p:], keep_pos)], dim=1)    # [B, p+n', D]
    return stages.result()

"""The progressive redundant-token mask (paper Sec. 3.2, Eq. 4); the rule is in MaskSpec."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from hdistill.common.specs import MaskSpec, ProgressiveMask


def progressive_mask(stage_tokens: list[torch.Tensor], spec: MaskSpec) -> ProgressiveMask:
    """stage_tokens[s]: the mask teacher's output of block spec.blocks[s], [B, 1+N, D].

    The teacher itself ran on all tokens; at each stage only the still-kept patch tokens
    are ranked. Similarities are computed in float64 so the ranking does not depend on
    the device's float32 rounding.
    """
    B, T, D = stage_tokens[0].shape
    device = stage_tokens[0].device
    keep_idx = torch.arange(T - 1, device=device).expand(B, -1)           # [B, n] ascending
    stage = torch.zeros(B, T - 1, dtype=torch.uint8, device=device)       # [B, N]
    for s, tokens in enumerate(stage_tokens, start=1):
        patches = tokens[:, 1:].double()                                    # [B, N, D], CLS excluded
        kept = patches.gather(1, keep_idx[..., None].expand(-1, -1, D))     # [B, n, D]
        averaged = F.normalize(kept, dim=-1) if spec.mean == "normalized" else kept
        similarity = F.cosine_similarity(kept, averaged.mean(1, keepdim=True), dim=-1)  # [B, n]
        n_drop = spec.drop_count(keep_idx.shape[1])
        # most similar first; stable, so among equals the lower patch index goes first
        order = torch.argsort(similarity, dim=1, descending=True, stable=True)
        dropped = keep_idx.gather(1, order[:, :n_drop])
        stage.scatter_(1, dropped, s)
        keep_idx = keep_idx.gather(1, order[:, n_drop:].sort(dim=1).values)
    return ProgressiveMask(stage=stage, keep_idx=keep_idx)

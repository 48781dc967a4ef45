"""timm's Eva (EVA-02, EVA-CLIP image towers) as a teacher: built by the timm family (precompute.teachers.timm_vit)."""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from hdistill.common.errors import HdistillError
from hdistill.common.taps import qk_relations, split_qk, tap_block_output, tap_msa

from .base import _on_block
from .timm_vit import TimmTeacher


class EvaTeacher(TimmTeacher):
    """timm's Eva (EVA-02, EVA-CLIP): its attention adds separate q and v biases (or projects q, k, v apart) and
    rotates q and k of the patch tokens by RoPE before Q K^T, so the relation is formed from the block's input
    as EvaAttention forms it; the RoPE table is the one the block is called with."""

    def embed(self, images):
        m = self.model
        return m.norm_pre(m._pos_embed(m.patch_embed(images))[0])

    def run_block(self, block, x):
        raise HdistillError(f"teacher {self.role!r}: --mask-forward drop is not available for Eva teachers (their "
                            "RoPE table is per patch position, which a dropping forward would have to gather)")

    def taps(self):
        return {"feat": functools.partial(_on_block, tap_block_output, self.model.blocks),
                "rel": self.tap_relation, "msa": functools.partial(_on_block, tap_msa, self.model.blocks)}

    def tap_relation(self, block, fn):
        attn = self.model.blocks[block].attn

        def hook(_module, args, kwargs):
            fn(qk_relations(*eva_qk(attn, args[0], kwargs.get("rope"))))
        return attn.register_forward_pre_hook(hook, with_kwargs=True)


def eva_qk(attn: nn.Module, x: torch.Tensor, rope: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """q, k [B, H, T, d] of a timm EvaAttention on its input x [B, T, D], as its forward forms them: fused qkv with
    (q, 0, v) biases or separate projections, q_norm / k_norm, RoPE on the tokens after the prefix."""
    from timm.layers import apply_rot_embed_cat
    B, T, _ = x.shape
    if attn.qkv is not None:
        bias = None if attn.q_bias is None else torch.cat((attn.q_bias, attn.k_bias, attn.v_bias))
        q, k = split_qk(F.linear(x, attn.qkv.weight, bias), attn.num_heads, attn.q_norm, attn.k_norm)
    else:
        q = attn.q_norm(attn.q_proj(x).reshape(B, T, attn.num_heads, -1).transpose(1, 2))
        k = attn.k_norm(attn.k_proj(x).reshape(B, T, attn.num_heads, -1).transpose(1, 2))
    if rope is not None:
        p, half = attn.num_prefix_tokens, getattr(attn, "rotate_half", False)
        q, k = (torch.cat([t[:, :, :p], apply_rot_embed_cat(t[:, :, p:], rope, half=half)], dim=2) for t in (q, k))
    return q, k

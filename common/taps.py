"""The taps of a timm ViT's blocks: where its relation (Q K^T), MSA and block-output targets are read, as forward
hooks that hand the tensor to a function during every forward. The timm teachers and the student share them; the
Eva and open_clip teachers use the relation arithmetic (split_qk, qk_relations) on their own attention modules."""
from __future__ import annotations

import torch


def split_qk(qkv: torch.Tensor, heads: int, q_norm=None, k_norm=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused qkv projection output [B, T, 3A] -> per-head q, k [B, H, T, d], after q_norm / k_norm."""
    B, T, _ = qkv.shape
    qkv = qkv.reshape(B, T, 3, heads, -1).permute(2, 0, 3, 1, 4)  # [3, B, H, T, d]
    q, k = qkv[0], qkv[1]
    return (q_norm(q) if q_norm else q), (k_norm(k) if k_norm else k)


def qk_relations(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Raw per-head Q K^T (paper Eq. 2: no 1/sqrt(d), no softmax) in float32, also under autocast.

    q, k [B, H, T, d] -> [B, H, T, T].
    """
    with torch.autocast(q.device.type, enabled=False):
        return q.float() @ k.float().transpose(-2, -1)


def tap_block_output(block: torch.nn.Module, fn):
    """feat@B: the residual stream after a timm Block [B, T, D]."""
    return block.register_forward_hook(lambda _m, _args, out: fn(out))


def tap_relation(block: torch.nn.Module, fn):
    """rel@B: raw per-head Q K^T [B, H, T, T] from the block's own fused qkv Linear output (nothing recomputed),
    after timm's q_norm / k_norm."""
    attn = block.attn
    return attn.qkv.register_forward_hook(
        lambda _m, _args, qkv: fn(qk_relations(*split_qk(qkv, attn.num_heads, attn.q_norm, attn.k_norm))))


def tap_msa(block: torch.nn.Module, fn):
    """msa@B: softmax(Q K^T / sqrt(d)) V with the heads concatenated [B, T, A] (paper Eq. 2's MSA), the input of
    timm Attention's post-attention norm (an Identity unless scale_norm), which comes before the output
    projection."""
    return block.attn.norm.register_forward_pre_hook(lambda _m, args: fn(args[0]))


# A timm VisionTransformer's taps, keyed by target kind: (block module, fn) -> a removable hook handle that hands
# the tensor to fn during every forward. The timm teachers and the student share them.
TIMM_TAPS = {"feat": tap_block_output, "rel": tap_relation, "msa": tap_msa}

"""Token bookkeeping shared by precompute and train: patchify pixels, keep rows and columns, and the taps of a
timm ViT's blocks (where its relation, MSA and block-output targets are read).

Stored token layout (common.specs.TokenLayout): CLS first when the teacher has one, then the patches in raster
order; a timm student always has CLS at token 0.
"""
from __future__ import annotations

import torch


def patchify(pixels: torch.Tensor, patch: int) -> torch.Tensor:
    """[B, S, S, C] -> [B, N, P, P, C], patches in raster order."""
    B, S, _, C = pixels.shape
    g = S // patch
    x = pixels.reshape(B, g, patch, g, patch, C).permute(0, 1, 3, 2, 4, 5)  # [B, g, g, P, P, C]
    return x.reshape(B, g * g, patch, patch, C)


def token_index(keep_idx: torch.Tensor, cls: bool = True) -> torch.Tensor:
    """Kept patch indices [B, n] -> token indices [B, 1+n] (CLS first), or [B, n] for a layout without CLS."""
    if not cls:
        return keep_idx
    return torch.cat([torch.zeros_like(keep_idx[:, :1]), keep_idx + 1], dim=1)


def gather_rows(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x [B, T, ...], idx [B, k] -> [B, k, ...]."""
    return gather_along(x, 1, idx)


def gather_along(x: torch.Tensor, axis: int, idx: torch.Tensor) -> torch.Tensor:
    """x [B, ..., T (at `axis`), ...], idx [B, k] -> x with only those k entries along `axis`, per sample."""
    shape = [1] * x.dim()
    shape[0], shape[axis] = idx.shape
    size = list(x.shape)
    size[axis] = idx.shape[1]
    return x.gather(axis, idx.reshape(shape).expand(size))


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

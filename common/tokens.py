"""Token bookkeeping shared by precompute and train: patchify pixels, keep rows and columns, and where in a
timm Attention the relation and MSA targets are read.

Token index 0 is CLS, token index p + 1 is patch p (raster order).
"""
from __future__ import annotations

import torch


def patchify(pixels: torch.Tensor, patch: int) -> torch.Tensor:
    """[B, S, S, C] -> [B, N, P, P, C], patches in raster order."""
    B, S, _, C = pixels.shape
    g = S // patch
    x = pixels.reshape(B, g, patch, g, patch, C).permute(0, 1, 3, 2, 4, 5)  # [B, g, g, P, P, C]
    return x.reshape(B, g * g, patch, patch, C)


def token_index(keep_idx: torch.Tensor) -> torch.Tensor:
    """Kept patch indices [B, n] -> token indices [B, 1+n] (CLS first)."""
    cls = torch.zeros_like(keep_idx[:, :1])
    return torch.cat([cls, keep_idx + 1], dim=1)


def gather_rows(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x [B, T, ...], idx [B, k] -> [B, k, ...]."""
    view = idx.reshape(*idx.shape, *([1] * (x.dim() - 2))).expand(-1, -1, *x.shape[2:])
    return x.gather(1, view)


def gather_relations(relations: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """relations [B, H, T, T], tokens [B, k] -> [B, H, k, k] (rows and columns kept)."""
    B, H, T, _ = relations.shape
    k = tokens.shape[1]
    rows = relations.gather(2, tokens[:, None, :, None].expand(B, H, k, T))  # [B, H, k, T]
    return rows.gather(3, tokens[:, None, None, :].expand(B, H, k, k))       # [B, H, k, k]


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


def heads_output_site(attn: torch.nn.Module) -> torch.nn.Module:
    """The module of a timm Attention whose input is softmax(Q K^T / sqrt(d)) V with the heads concatenated
    [B, T, A] (paper Eq. 2's MSA): its post-attention norm, an Identity unless scale_norm, which comes before
    the output projection."""
    return attn.norm

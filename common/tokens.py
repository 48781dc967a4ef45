"""Token bookkeeping shared by precompute and train: patchify pixels, keep rows and columns (the taps that read
targets off a ViT's blocks are in common.taps).

Stored token layout (common.grid.TokenLayout): CLS first when the teacher has one, then the patches in raster
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


def with_mask_tokens(x: torch.Tensor, visible: torch.Tensor, mask_token: torch.Tensor, patches: int) -> torch.Tensor:
    """MAE's decoder input: CLS and the tokens of the `visible` patches [B, 1+n, W] -> every patch's token, the
    visible ones in their places and `mask_token` [1, 1, W] at the others: [B, 1+N, W] (CLS first)."""
    B, W = x.shape[0], x.shape[-1]
    tokens = mask_token.to(x.dtype).expand(B, patches, W).clone()            # [B, N, W]
    tokens.scatter_(1, visible.unsqueeze(-1).expand(-1, -1, W), x[:, 1:])
    return torch.cat([x[:, :1], tokens], dim=1)

"""Token bookkeeping shared by precompute and train: patchify pixels, keep rows and columns (the taps that read
targets off a ViT's blocks are in common.taps).

Stored token layout (common.grid.TokenLayout): CLS first when the teacher has one, then the patches in raster
order; a timm student always has CLS at token 0.
"""
from __future__ import annotations

import numpy as np
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


def visible_count(patches: int, ratio: float) -> int:
    """How many of `patches` MAE's random_masking keeps visible at mask ratio `ratio`: int(N * (1 - ratio))."""
    return int(patches * (1 - ratio))


def random_masking(noise: np.ndarray, ratio: float) -> np.ndarray:
    """MAE's random_masking (models_mae.py) on one sample's noise [N]: the patches kept visible, the first
    visible_count(N, ratio) of argsort(noise), in patch order [m]."""
    return np.sort(np.argsort(noise, kind="stable")[:visible_count(len(noise), ratio)])


def sincos_pos_embed(width: int, grid: int) -> np.ndarray:
    """MAE's fixed 2-D sin-cos position embeddings [1 + grid*grid, width], CLS first (zeros): half the channels
    encode the column, half the row, each as sin then cos of position / 10000^(2i/(width/2))."""
    assert width % 4 == 0, "the decoder width must be a multiple of 4"
    omega = 1.0 / 10000 ** (np.arange(width // 4, dtype=np.float64) / (width / 4))      # [width/4]
    rows, cols = np.meshgrid(np.arange(grid, dtype=np.float64), np.arange(grid, dtype=np.float64), indexing="ij")

    def encode(pos):                                        # [grid*grid] -> [grid*grid, width/2]
        angles = np.outer(pos.reshape(-1), omega)
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)
    patches = np.concatenate([encode(cols), encode(rows)], axis=1)   # MAE: emb_h from grid[0] (w), emb_w from grid[1]
    return np.concatenate([np.zeros((1, width)), patches], axis=0).astype(np.float32)

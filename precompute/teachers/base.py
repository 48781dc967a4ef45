"""The teacher interface every family implements, and the roles: what a teacher is for and its default model."""
from __future__ import annotations

import difflib
from dataclasses import dataclass

import torch
from torch import nn

from hdistill.common.errors import HdistillError
from hdistill.common.teacher_info import TeacherInfo
from hdistill.common.targets import KINDS


@dataclass(frozen=True)
class Role:
    name: str
    default_model: str
    kind: str          # "mim": relations + mask; "feature": final feature maps
    description: str


ROLES: dict[str, Role] = {r.name: r for r in [
    Role("mae", "vit_base_patch16_224.mae", "mim", "MAE ViT-B/16, masked image modelling"),
    Role("deit", "deit_base_patch16_224.fb_in1k", "feature", "DeiT ViT-B/16, supervised on ImageNet-1k"),
    Role("clip", "vit_base_patch16_clip_quickgelu_224.openai", "feature", "OpenAI CLIP ViT-B/16 image tower (QuickGELU)"),
    Role("dino", "vit_base_patch16_224.dino", "feature", "DINO ViT-B/16, self-supervised"),
]}


def get_role(name: str) -> Role:
    if name not in ROLES:
        raise HdistillError(f"unknown teacher role {name!r}; known roles: {', '.join(ROLES)}")
    return ROLES[name]


class Teacher(nn.Module):
    """A frozen ViT teacher in eval mode. A subclass adapts one model family and declares its taps.

    `taps()` maps each target kind (common.targets.KINDS) to a function (block, fn) that registers a hook
    handing one intermediate tensor over the model's own tokens (T = prefix + N) to `fn` during every forward:
        feat@B  the residual stream after block B            [B, T, D]
        rel@B   raw per-head Q K^T of block B, in float32      [B, H, T, T]
        msa@B   softmax(Q K^T / sqrt(d)) V of block B, heads concatenated, before the
                output projection (Eq. 2)                      [B, T, D]
    `tap` and `tokens` hand on the stored tokens: CLS (if any) and the patches, registers dropped.
    Adding a target kind means a row in KINDS and an entry in each family's table.
    """

    def __init__(self, info: TeacherInfo, model: nn.Module):
        super().__init__()
        self.info = info
        self.model = model.eval().requires_grad_(False)
        self.register_buffer("mean", torch.tensor(info.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(info.std).view(1, 3, 1, 1), persistent=False)

    @property
    def role(self) -> str:
        return self.info.role

    def stored_tokens(self, kind: str, values: torch.Tensor) -> torch.Tensor:
        """A batch [B, ...] over the model's own tokens -> over the stored ones: its register tokens dropped."""
        layout = self.info.layout
        if not layout.registers:
            return values
        for axis in KINDS[kind].token_axes(values.dim() - 1):
            T = values.shape[axis + 1]
            keep = torch.cat([torch.arange(layout.stored_prefix), torch.arange(layout.prefix, T)]).to(values.device)
            values = values.index_select(axis + 1, keep)
        return values

    def preprocess(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 [B, H, W, 3] -> normalised float [B, 3, H, W] with this teacher's mean/std."""
        x = pixels.to(self.mean.device, non_blocking=True).permute(0, 3, 1, 2).float().div_(255)
        return (x - self.mean) / self.std

    def tokens(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised images -> last block's stored tokens after the final norm, float [B, cls+N, D]."""
        raise NotImplementedError

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised images -> the tokens entering block 0 (the prefix tokens too), [B, prefix+N, D]."""
        raise NotImplementedError

    def run_block(self, block: int, x: torch.Tensor) -> torch.Tensor:
        """Block `block` on tokens [B, T, D] (any T) -> [B, T, D]."""
        raise NotImplementedError

    def taps(self) -> dict:
        """Target kind -> (block, fn) -> a removable hook handle."""
        raise NotImplementedError

    def tap(self, kind: str, block: int, fn) -> torch.utils.hooks.RemovableHandle:
        """A hook handing `fn` the stored tokens of a `kind` target at `block` during every forward."""
        return self.taps()[kind](block, lambda values: fn(self.stored_tokens(kind, values)))


def _on_block(tap, blocks: nn.ModuleList, block: int, fn):
    return tap(blocks[block], fn)


def _suggest(name: str, known: list[str]) -> str:
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
    return f" Did you mean: {', '.join(close)}?" if close else ""

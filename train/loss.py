"""The Hybrid Distillation objective (paper Eq. 1 and 3).

    loss = SmoothL1(proj(student last tokens), feature teacher's tokens)
         + alpha * mean over relation pairs of SmoothL1(student Q K^T, relation teacher's Q K^T)

Head counts may differ: Q K^T of a group of heads taken together is the sum of its heads' Q K^T,
so both sides are compared at gcd(H_teacher, H_student) relation heads, each the sum of a
contiguous group of heads.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


def group_heads(relations: torch.Tensor, groups: int) -> torch.Tensor:
    """[B, H, T, T] -> [B, groups, T, T]: each group the sum of H / groups contiguous heads."""
    B, H, T, _ = relations.shape
    return relations.reshape(B, groups, H // groups, T, T).sum(2)


def standardize(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Per-token standardisation over the channel axis (layer norm without affine)."""
    return F.layer_norm(x, x.shape[-1:], eps=eps)


@dataclass(frozen=True)
class LossConfig:
    alpha: float = 1.0
    beta: float = 2.0                 # SmoothL1 beta, as FD and dBOT
    standardize_targets: bool = True


class HybridLoss(nn.Module):
    """Holds the feature projection; returns a dict of its terms."""

    def __init__(self, student_width: int, teacher_width: int, student_heads: int, teacher_heads: int,
                 relation_pairs: list[tuple[int, int]], cfg: LossConfig):
        super().__init__()
        self.proj = nn.Linear(student_width, teacher_width)
        self.relation_pairs = relation_pairs          # (student block, teacher block)
        self.groups = math.gcd(student_heads, teacher_heads)
        self.cfg = cfg

    def forward(self, tokens: torch.Tensor, student_relations: dict[int, torch.Tensor],
                features: torch.Tensor, relations: dict[int, torch.Tensor]) -> dict[str, torch.Tensor]:
        target = features.float()
        if self.cfg.standardize_targets:
            target = standardize(target)
        loss_feature = F.smooth_l1_loss(self.proj(tokens).float(), target, beta=self.cfg.beta)
        terms = [F.smooth_l1_loss(group_heads(student_relations[s].float(), self.groups),
                                  group_heads(relations[t].float(), self.groups), beta=self.cfg.beta)
                 for s, t in self.relation_pairs]
        loss_relation = torch.stack(terms).mean() if terms else loss_feature.new_zeros(())
        loss = loss_feature + self.cfg.alpha * loss_relation
        return {"loss": loss, "loss_feature": loss_feature, "loss_relation": loss_relation}

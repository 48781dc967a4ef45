"""The progressive redundant-token mask as a store records it (MaskSpec: its rule and the kept count of each
stage) and as a batch of views carries it (ProgressiveMask)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

import torch

from .errors import HdistillError


@dataclass(frozen=True)
class MaskSpec:
    """The redundant-token mask (paper Sec. 3.2, Eq. 4; Tab. 8), as the mask teacher `role` computes it.

    At the output of each block in `blocks` (0-indexed), among the patch tokens still kept, the tokens
    whose cosine similarity to the "average token" is highest are dropped. CLS is never ranked, never in
    the mean, never dropped; among equal similarities the lower patch index is dropped first.

    strategy  "progressive": one stage per block of `blocks`, each dropping floor(ratio * kept).
              "direct" (Tab. 8): one stage at the teacher's last block, `blocks == (L-1,)`, dropping in one go
              as many patches as `stages` progressive stages drop together, so the student sees the same
              number of tokens.
    mean      the average token: the mean of the kept tokens' L2-normalised copies ("normalized", the rule
              of PCAE's public code, which the paper's mask follows), or of the tokens as they are ("raw").
    forward   what the later stages rank: "full", the teacher's forward over all tokens, restricted to the
              kept ones; "drop" (PCAE), a forward whose blocks after each stage run on the kept tokens only.
              Either way the stored targets are the full forward's (Eq. 1: T(x) masked).

    Rounding rule (fixed, part of the store format): with `ratio` read as an exact decimal, a stage drops
    floor(ratio * n) of n kept patches. For 196 patches and ratio 0.3 the progressive kept counts are
    196 -> 138 -> 97 -> 68; direct keeps 68 of 196 in one stage.
    """

    ratio: float = 0.3
    blocks: tuple[int, ...] = ()
    role: str | None = None          # None: no mask, every patch kept
    mean: str = "normalized"
    strategy: str = "progressive"
    forward: str = "full"
    stages: int | None = None        # direct: the progressive stages it matches (None for progressive)

    MEANS = ("normalized", "raw")
    STRATEGIES = ("progressive", "direct")
    FORWARDS = ("full", "drop")

    def __post_init__(self):
        if not 0.0 <= self.ratio < 1.0:
            raise HdistillError(f"--mask-ratio must be in [0, 1), got {self.ratio}")
        if list(self.blocks) != sorted(set(self.blocks)):
            raise HdistillError(f"--mask-blocks must be distinct and ascending, got {list(self.blocks)}")
        for option, value, known in [("--mask-mean", self.mean, self.MEANS),
                                     ("--mask-strategy", self.strategy, self.STRATEGIES),
                                     ("--mask-forward", self.forward, self.FORWARDS)]:
            if value not in known:
                raise HdistillError(f"{option} must be one of {', '.join(known)}, got {value!r}")
        if (self.strategy == "direct") != (self.stages is not None) or \
                (self.strategy == "direct" and len(self.blocks) != 1):
            raise HdistillError(f"a direct mask ranks once and matches a number of progressive stages; "
                                f"got blocks {list(self.blocks)} and stages {self.stages}")

    @staticmethod
    def default_blocks(depth: int) -> tuple[int, ...]:
        """I = [0, L/3, 2L/3] (paper Sec. 4.1), floored for depths not divisible by 3."""
        return tuple(sorted({0, depth // 3, (2 * depth) // 3}))

    def _floor_drop(self, n_kept: int) -> int:
        return math.floor(Fraction(str(self.ratio)) * n_kept)

    def kept_counts(self, num_patches: int) -> list[int]:
        """Kept patch count after each stage, starting with `num_patches`."""
        counts = [num_patches]
        for _ in range(self.stages if self.strategy == "direct" else len(self.blocks)):
            counts.append(counts[-1] - self._floor_drop(counts[-1]))
        return [num_patches, counts[-1]] if self.strategy == "direct" else counts

    def describe(self) -> str:
        if not self.role:
            return "none (every patch kept)"
        stages = f" (matching {self.stages} progressive stages)" if self.strategy == "direct" else ""
        return (f"{self.strategy} {self.role} K={self.ratio} blocks {list(self.blocks)}{stages} mean={self.mean} "
                f"forward={self.forward}")

    def to_dict(self) -> dict:
        return {"rule": "cosine-to-mean", "strategy": self.strategy, "role": self.role, "ratio": self.ratio,
                "blocks": list(self.blocks), "stages": self.stages, "mean": self.mean, "forward": self.forward,
                "rounding": "floor(ratio * kept) per progressive stage"}

    @classmethod
    def from_dict(cls, d: dict) -> "MaskSpec":
        return cls(ratio=d["ratio"], blocks=tuple(d["blocks"]), role=d["role"], mean=d["mean"],
                   strategy=d["strategy"], forward=d["forward"], stages=d["stages"])


def default_relation_blocks(depth: int) -> tuple[int, ...]:
    """The two blocks preceding the last (paper Eq. 3: layers L-1 and L-2, 1-indexed)."""
    return (depth - 3, depth - 2)


@dataclass
class ProgressiveMask:
    """The progressive mask of a batch of views.

    stage:    uint8 [B, N]  0 = kept to the end, s = dropped at stage s (1-based)
    keep_idx: int64 [B, n]  kept patch indices, ascending
    """

    stage: torch.Tensor
    keep_idx: torch.Tensor

"""Typed records shared by precompute and train.

Token layout everywhere: index 0 is the CLS token, indices 1..N are the patch tokens
in raster order (row-major over the patch grid). A patch index `p` (0-based over
patches) is token index `p + 1`.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from fractions import Fraction

import torch

from .errors import HdistillError


@dataclass(frozen=True)
class TokenGrid:
    """The patch grid of a ViT at one input size."""

    image_size: int
    patch_size: int

    @property
    def side(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.side * self.side

    @classmethod
    def for_image(cls, image_size: int, patch_size: int, who: str) -> "TokenGrid":
        if image_size % patch_size:
            raise HdistillError(
                f"{who}: image size {image_size} is not a multiple of its patch size {patch_size}; "
                f"choose an image size divisible by {patch_size}."
            )
        return cls(image_size, patch_size)


def check_same_grid(grids: dict[str, TokenGrid]) -> TokenGrid:
    """All models that share targets must cut the view into the same patches.

    `grids` maps a model's description (e.g. "teacher 'mae' (vit_base_patch16_224)")
    to its grid. Returns the common grid or raises naming every mismatch.
    """
    items = list(grids.items())
    first_name, first = items[0]
    for name, grid in items[1:]:
        if grid != first:
            raise HdistillError(
                "patch grid mismatch: "
                + "; ".join(f"{n} cuts {g.image_size}px views into {g.side}x{g.side} patches of {g.patch_size}px"
                            for n, g in items)
                + ". Targets are per patch, so every teacher and the student need the same patch size "
                "at the same image size."
            )
    return first


@dataclass(frozen=True)
class MaskSpec:
    """The progressive redundant-token mask (paper Sec. 3.2, Eq. 4).

    At the output of each block in `blocks` (0-indexed) of the mask teacher, among the
    patch tokens still kept, the `drop_count(n_kept)` tokens whose cosine similarity to the
    mean of the kept patch tokens is highest are dropped. CLS is never ranked and never
    dropped. Ties are broken by the lower patch index being dropped first.

    Rounding rule (fixed, part of the store format): with `ratio` read as an exact decimal,
    drop_count(n) = floor(ratio * n). For 196 patches and ratio 0.3 the kept counts are
    196 -> 138 -> 97 -> 68.
    """

    ratio: float = 0.3
    blocks: tuple[int, ...] = ()

    def __post_init__(self):
        if not 0.0 <= self.ratio < 1.0:
            raise HdistillError(f"--mask-ratio must be in [0, 1), got {self.ratio}")
        if list(self.blocks) != sorted(set(self.blocks)):
            raise HdistillError(f"mask blocks must be distinct and ascending, got {list(self.blocks)}")

    @staticmethod
    def default_blocks(depth: int) -> tuple[int, ...]:
        """I = [0, L/3, 2L/3] (paper Sec. 4.1), floored for depths not divisible by 3."""
        return tuple(sorted({0, depth // 3, (2 * depth) // 3}))

    def drop_count(self, n_kept: int) -> int:
        return math.floor(Fraction(str(self.ratio)) * n_kept)

    def kept_counts(self, num_patches: int) -> list[int]:
        """Kept patch count after each stage, starting with `num_patches`."""
        counts = [num_patches]
        for _ in self.blocks:
            counts.append(counts[-1] - self.drop_count(counts[-1]))
        return counts


def default_relation_blocks(depth: int) -> tuple[int, ...]:
    """The two blocks preceding the last (paper Eq. 3: layers L-1 and L-2, 1-indexed)."""
    return (depth - 3, depth - 2)


@dataclass(frozen=True)
class TeacherInfo:
    """What a teacher is, as recorded in a store's manifest."""

    role: str
    model: str                 # e.g. "timm:vit_base_patch16_224.mae" or "open_clip:ViT-B-16-quickgelu@openai"
    weights: dict              # {"source": "hub", "tag": ...} | {"source": "file", "path", "sha256"} | {"source": "random-init", "seed"}
    patch_size: int
    image_size: int
    width: int
    depth: int
    heads: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @property
    def grid(self) -> TokenGrid:
        return TokenGrid(self.image_size, self.patch_size)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["grid"] = [self.grid.side, self.grid.side]
        return d


@dataclass(frozen=True)
class ViewParams:
    """How one augmented view was cut from its source image (RandomResizedCrop + flip)."""

    image_id: str
    view: int
    top: int
    left: int
    height: int
    width: int
    flip: bool
    size: int
    interpolation: str = "bicubic"


@dataclass
class ProgressiveMask:
    """The progressive mask of a batch of views.

    stage:    uint8 [B, N]  0 = kept to the end, s = dropped at stage s (1-based)
    keep_idx: int64 [B, n]  kept patch indices, ascending
    """

    stage: torch.Tensor
    keep_idx: torch.Tensor


@dataclass
class ViewTargets:
    """Everything the student is trained against, for a batch of views, all tokens.

    features:  role -> float [B, 1+N, D]      last block, after the final norm
    relations: role -> block -> float [B, H, 1+N, 1+N]   raw per-head Q K^T
    mask:      the progressive mask computed by the mask teacher
    """

    features: dict[str, torch.Tensor] = field(default_factory=dict)
    relations: dict[str, dict[int, torch.Tensor]] = field(default_factory=dict)
    mask: ProgressiveMask | None = None


@dataclass(frozen=True)
class TargetSpec:
    """Which targets a set of teachers produces for each view.

    feature_roles:   roles whose final features are stored
    relation_blocks: role -> 0-indexed blocks whose Q K^T is stored
    mask_role:       the role whose block outputs drive the progressive mask (None: no mask)
    mask:            the mask rule
    """

    feature_roles: tuple[str, ...]
    relation_blocks: dict[str, tuple[int, ...]]
    mask_role: str | None
    mask: MaskSpec

    def to_dict(self) -> dict:
        return {
            "feature_roles": list(self.feature_roles),
            "relation_blocks": {r: list(b) for r, b in self.relation_blocks.items()},
            "mask_role": self.mask_role,
            "mask": {"rule": "progressive-cosine-to-mean", "ratio": self.mask.ratio,
                     "blocks": list(self.mask.blocks), "rounding": "floor(ratio * kept)"},
        }

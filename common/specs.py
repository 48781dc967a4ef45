"""Typed records shared by precompute and train.

Stored token layout (TokenLayout): the teacher's CLS token first when it has one, then the patch tokens in raster
order (row-major over the patch grid); register tokens are never stored. A patch index `p` (0-based over patches)
is token index `p + 1` of a teacher with a CLS token, `p` of one without (SigLIP).
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


@dataclass(frozen=True)
class TokenLayout:
    """A teacher's prefix tokens: a CLS token or none (SigLIP's MAP-pooled towers), and register tokens (DINOv2
    with registers), ahead of the patch tokens in its own sequence. Its stored targets keep CLS and the patches."""

    cls: bool = True
    registers: int = 0

    @property
    def prefix(self) -> int:
        """Tokens ahead of the patches in the teacher's own sequence."""
        return int(self.cls) + self.registers

    @property
    def stored_prefix(self) -> int:
        """Tokens ahead of the patches in a stored target: 1 with CLS, 0 without."""
        return int(self.cls)

    def to_dict(self) -> dict:
        return {"cls": self.cls, "registers": self.registers}

    @classmethod
    def from_dict(cls, d: dict) -> "TokenLayout":
        return cls(cls=d["cls"], registers=d["registers"])


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
    layout: TokenLayout = TokenLayout()

    @property
    def grid(self) -> TokenGrid:
        return TokenGrid(self.image_size, self.patch_size)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["grid"] = [self.grid.side, self.grid.side]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TeacherInfo":
        fields = {k: d[k] for k in cls.__dataclass_fields__}
        return cls(**{**fields, "mean": tuple(d["mean"]), "std": tuple(d["std"]),
                      "layout": TokenLayout.from_dict(d["layout"])})


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


def sample_key(image_id: str, view: int) -> str:
    """A stored sample's key: <image id>-v<view> (image ids hold no dots, so webdataset splits it cleanly)."""
    return f"{image_id}-v{view}"


@dataclass(frozen=True)
class ViewRecord:
    """One stored view: its image's source and size, and how the view was cut (a sample's json entry)."""

    source: str
    source_size: tuple[int, int]      # (width, height) of the decoded image
    params: ViewParams

    @property
    def key(self) -> str:
        return sample_key(self.params.image_id, self.params.view)

    @property
    def box(self) -> tuple[int, int, int, int]:
        p = self.params
        return p.top, p.left, p.height, p.width

    def to_json(self) -> dict:
        p = self.params
        return {"source": self.source, "image_id": p.image_id, "view": p.view, "source_size": list(self.source_size),
                "crop": {"top": p.top, "left": p.left, "height": p.height, "width": p.width}, "flip": p.flip,
                "size": p.size, "interpolation": p.interpolation}

    @classmethod
    def from_json(cls, d: dict) -> "ViewRecord":
        c = d["crop"]
        return cls(d["source"], tuple(d["source_size"]),
                   ViewParams(d["image_id"], d["view"], c["top"], c["left"], c["height"], c["width"], d["flip"],
                              d["size"], d["interpolation"]))


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
    """Everything the student is trained against, for a batch of views, over all tokens.

    values: target name (TargetSpec.name) -> float32 [B, 1+N, D] or [B, H, 1+N, 1+N]
    mask:   the progressive mask computed by the mask teacher
    """

    values: dict[str, torch.Tensor] = field(default_factory=dict)
    mask: ProgressiveMask | None = None

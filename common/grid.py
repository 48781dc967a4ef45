"""Token geometry shared by precompute and train: a view's patch grid (TokenGrid) and a teacher's prefix tokens
(TokenLayout).

Stored token layout (TokenLayout): the teacher's CLS token first when it has one, then the patch tokens in raster
order (row-major over the patch grid); register tokens are never stored. A patch index `p` (0-based over patches)
is token index `p + 1` of a teacher with a CLS token, `p` of one without (SigLIP).
"""
from __future__ import annotations

from dataclasses import dataclass

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

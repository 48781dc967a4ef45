"""A view of an image: its crop and flip (ViewParams), its record in a store (ViewRecord, sample_key), and the
targets a teacher computed on a batch of views (ViewTargets)."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .mask_spec import ProgressiveMask


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


def split_key(key: str) -> tuple[str, int]:
    """A sample's key -> (image id, view)."""
    image_id, _, view = key.rpartition("-v")
    return image_id, int(view)


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
class ViewTargets:
    """Everything the student is trained against, for a batch of views, over all tokens.

    values:  target name (TargetSpec.name) -> float32 [B, 1+N, D] or [B, H, 1+N, 1+N]
    mask:    the progressive mask computed by the mask teacher
    visible: the patches the teacher's encoder saw for the dec targets [B, m] (None without them)
    """

    values: dict[str, torch.Tensor] = field(default_factory=dict)
    mask: ProgressiveMask | None = None
    visible: torch.Tensor | None = None

"""What a teacher is, as a store's manifest records it: model, weights, shape, input normalisation, token layout."""
from __future__ import annotations

from dataclasses import asdict, dataclass

from .grid import TokenGrid, TokenLayout


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
    decoder_width: int = 0     # an MAE teacher's decoder (dec targets); 0: the teacher has no decoder
    decoder_depth: int = 0

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

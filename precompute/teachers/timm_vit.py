"""The timm family: timm's VisionTransformer (CLS or none, registers) as a teacher, and how it is built. Eva, also
timm's, has its own wrapper (precompute.teachers.eva)."""
from __future__ import annotations

import functools

import torch

from hdistill.common.errors import HdistillError
from hdistill.common.grid import TokenLayout
from hdistill.common.teacher_info import TeacherInfo
from hdistill.common.taps import TIMM_TAPS

from ..weights import WeightSource, check_file, load_timm, weights_record
from .base import Teacher, _on_block, _suggest


class TimmTeacher(Teacher):
    def tokens(self, images):
        return self.stored_tokens("feat", self.model.forward_features(images))

    def embed(self, images):
        m = self.model
        return m.norm_pre(m.patch_drop(m._pos_embed(m.patch_embed(images))))

    def run_block(self, block, x):
        return self.model.blocks[block](x)

    def taps(self):
        """The student's taps (common.taps.TIMM_TAPS), on this model's blocks."""
        return {kind: functools.partial(_on_block, tap, self.model.blocks) for kind, tap in TIMM_TAPS.items()}


def _timm_probe(role: str, name: str, kwargs: dict):
    """The architecture on the meta device (no memory, no weights): its class, config and embeddings."""
    import timm
    from timm.models.eva import Eva
    from timm.models.vision_transformer import VisionTransformer
    try:
        with torch.device("meta"):
            probe = timm.create_model(name, pretrained=False, **kwargs)
    except TypeError as err:
        raise HdistillError(f"teacher {role!r}: bad model argument for {name!r}: {err}") from None
    if not isinstance(probe, (Eva, VisionTransformer)):
        raise HdistillError(f"teacher {role!r}: {name!r} is a {type(probe).__name__}; hdistill needs a timm "
                            "VisionTransformer or Eva (a ViT).")
    return probe


def build(role: str, name: str, weights: WeightSource, image_size: int, kwargs: dict) -> Teacher:
    import timm

    from .eva import EvaTeacher      # (here: EvaTeacher is a TimmTeacher)
    from timm.models.eva import Eva

    arch = name.split(".")[0]
    if not timm.is_model(arch):
        raise HdistillError(f"teacher {role!r}: unknown timm model {name!r}." + _suggest(arch, timm.list_models()))
    if weights.kind == "hub" and "." not in name and not timm.list_pretrained(arch):
        raise HdistillError(f"teacher {role!r}: timm model {name!r} has no pretrained tag to fetch from the hub")
    check_file(role, weights)
    probe = _timm_probe(role, name, kwargs)
    wrapper = EvaTeacher if isinstance(probe, Eva) else TimmTeacher
    model = load_timm(role, name, weights, probe, image_size, kwargs)
    if wrapper is TimmTeacher and not all(hasattr(b.attn, "qkv") and hasattr(b.attn, "norm") for b in model.blocks):
        raise HdistillError(f"teacher {role!r}: {name!r} has no timm Attention with a fused qkv projection to take "
                            "Q K^T and the attention output from")
    cfg = model.pretrained_cfg
    hub_tag = f"{arch}.{cfg.get('tag')}" if cfg.get("tag") else arch
    return wrapper(timm_info(role, name, model, weights_record(weights, hub_tag), image_size), model)


def timm_info(role: str, name: str, model, weights: dict, image_size: int) -> TeacherInfo:
    """What a timm ViT is as a teacher: its shape, prefix tokens and input normalisation (its pretrained_cfg's, else
    ImageNet's), with the record of its weights."""
    cls = model.cls_token is not None
    cfg = model.pretrained_cfg
    return TeacherInfo(
        role=role, model=f"timm:{name}", weights=weights,
        patch_size=model.patch_embed.patch_size[0], image_size=image_size, width=model.embed_dim,
        depth=len(model.blocks), heads=model.blocks[0].attn.num_heads,
        mean=tuple(float(v) for v in cfg.get("mean", (0.485, 0.456, 0.406))),
        std=tuple(float(v) for v in cfg.get("std", (0.229, 0.224, 0.225))),
        layout=TokenLayout(cls=cls, registers=model.num_prefix_tokens - int(cls)),
    )

"""Teachers: a registry of roles, and wrappers that give every ViT the same small interface.

A role names what a teacher is for (``mae`` gives Q K^T relations and the token mask,
``deit`` / ``clip`` / ``dino`` give final features) and its default model. Any role can be
pointed at another timm ViT or open_clip model:

    timm:  "vit_base_patch16_224.mae"            (optionally "timm:" in front; ".tag" = hub tag)
           timm's VisionTransformer (CLS, registers as DINOv2's "vit_base_patch14_reg4_dinov2", or no
           CLS as SigLIP's "vit_base_patch16_siglip_224.webli") and Eva (EVA-02 and EVA-CLIP image towers,
           "eva02_base_patch16_clip_224.merged2b": separate q/v biases, RoPE on q and k)
    open_clip: "open_clip:ViT-B-16-quickgelu@openai"   ("@tag" = open_clip pretrained tag)
    mae:   "mae:vit_base_patch16_dec512d8b"           an official MAE pretraining checkpoint with its decoder

Weights come from one source per teacher (precompute.weights.WeightSource: the hub, a file, or seeded random
weights) and load strictly: every tensor the targets use comes from them, or the build stops.

Every teacher owns its preprocessing (mean/std) and its token layout (CLS or none, registers: TokenLayout),
and exposes `tokens` (last block after the final norm), its taps (a table keyed by target kind of hooks that hand an inner tensor to the target table
during that forward), and `embed` / `run_block` for forwards that change the token set between blocks
(the dropping mask).

  base           the Teacher interface and the roles
  timm_vit       timm's VisionTransformer, and the timm family's `build` (it wraps Eva models as eva.EvaTeacher)
  eva            timm's Eva (EVA-02, EVA-CLIP)
  open_clip_vit  open_clip's ViT image towers, and the open_clip family's `build`
  mae_decoder    the official MAE checkpoints with their decoder (G2SD's teacher), and the mae family's `build`

A new family is a module with a Teacher subclass and a `build(role, name, weights, image_size, kwargs)`, and a row
in FAMILIES.
"""
from __future__ import annotations

from hdistill.common.errors import HdistillError
from hdistill.common.grid import TokenGrid

from ..weights import WeightSource
from . import mae_decoder, open_clip_vit, timm_vit
from .base import ROLES, Role, Teacher, get_role
from .eva import EvaTeacher
from .mae_decoder import MaeDecoderTeacher
from .open_clip_vit import OpenClipTeacher
from .timm_vit import TimmTeacher, timm_info

__all__ = ["ROLES", "FAMILIES", "Role", "Teacher", "TimmTeacher", "EvaTeacher", "OpenClipTeacher", "MaeDecoderTeacher",
           "WeightSource",
           "build_teacher", "build_teachers", "get_role", "timm_info"]


# A family adapts one library's ViTs: it builds the model and wraps it in its Teacher subclass, whose
# taps give the targets. Model names are "FAMILY:NAME"; a name without a known family prefix is timm's.
FAMILIES = {"timm": timm_vit.build, "open_clip": open_clip_vit.build, "mae": mae_decoder.build}


def build_teacher(role: str, weights: WeightSource, image_size: int = 224, model: str | None = None,
                  model_kwargs: dict | None = None) -> Teacher:
    """Build the teacher for `role` (its default model unless `model` names another)."""
    get_role(role)
    name = model or ROLES[role].default_model
    family, sep, rest = name.partition(":")
    if not sep or family not in FAMILIES:
        family, rest = "timm", name
    teacher = FAMILIES[family](role, rest, weights, image_size, dict(model_kwargs or {}))
    TokenGrid.for_image(image_size, teacher.info.patch_size, f"teacher {role!r} ({name})")
    return teacher


def build_teachers(cfg, device: str = "cpu", image_size: int | None = None) -> dict[str, Teacher]:
    """The teachers an option set names (precompute's PrecomputeConfig, or analyze's and eval's ModelsConfig: its
    teachers, weights, random_init, seed, models and model_args), by role, on `device`, at `image_size` (else the
    options'). A role's --weights source if given, else random weights seeded seed * 1000 + the role's index
    (--random-init)."""
    teachers = {}
    for i, role in enumerate(cfg.teachers):
        if role not in cfg.weights and not cfg.random_init:
            raise HdistillError(f"no weights for teacher {role}: --weights {role}=hub|PATH or --random-init")
        source = WeightSource.parse(cfg.weights[role]) if role in cfg.weights \
            else WeightSource("random", seed=cfg.seed * 1000 + i)
        teachers[role] = build_teacher(role, source, image_size or cfg.image_size, cfg.models.get(role),
                                       cfg.model_args.get(role)).to(device)
    return teachers

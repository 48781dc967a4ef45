"""Teachers: a registry of roles, and wrappers that give every ViT the same small interface.

A role names what a teacher is for (``mae`` gives Q K^T relations and the token mask,
``deit`` / ``clip`` / ``dino`` give final features) and its default model. Any role can be
pointed at another timm ViT or open_clip model:

    timm:  "vit_base_patch16_224.mae"            (optionally "timm:" in front; ".tag" = hub tag)
           timm's VisionTransformer (CLS, registers as DINOv2's "vit_base_patch14_reg4_dinov2", or no
           CLS as SigLIP's "vit_base_patch16_siglip_224.webli") and Eva (EVA-02 and EVA-CLIP image towers,
           "eva02_base_patch16_clip_224.merged2b": separate q/v biases, RoPE on q and k)
    open_clip: "open_clip:ViT-B-16-quickgelu@openai"   ("@tag" = open_clip pretrained tag)

Weights come from one source per teacher (precompute.weights.WeightSource: the hub, a file, or seeded random
weights) and load strictly: every tensor the targets use comes from them, or the build stops.

Every teacher owns its preprocessing (mean/std) and its token layout (CLS or none, registers: TokenLayout),
and exposes `tokens` (last block after the final norm), its taps (a table keyed by target kind of hooks that hand an inner tensor to the target table
during that forward), and `embed` / `run_block` for forwards that change the token set between blocks
(the dropping mask).
"""
from __future__ import annotations

import difflib
import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from hdistill.common.errors import HdistillError
from hdistill.common.specs import TeacherInfo, TokenGrid, TokenLayout
from hdistill.common.targets import KINDS
from hdistill.common.tokens import TIMM_TAPS, qk_relations, split_qk, tap_block_output, tap_msa

from .weights import WeightSource, check_file, load_open_clip, load_timm, weights_record


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


class TimmTeacher(Teacher):
    def tokens(self, images):
        return self.stored_tokens("feat", self.model.forward_features(images))

    def embed(self, images):
        m = self.model
        return m.norm_pre(m.patch_drop(m._pos_embed(m.patch_embed(images))))

    def run_block(self, block, x):
        return self.model.blocks[block](x)

    def taps(self):
        """The student's taps (common.tokens.TIMM_TAPS), on this model's blocks."""
        return {kind: functools.partial(_on_block, tap, self.model.blocks) for kind, tap in TIMM_TAPS.items()}


class EvaTeacher(TimmTeacher):
    """timm's Eva (EVA-02, EVA-CLIP): its attention adds separate q and v biases (or projects q, k, v apart) and
    rotates q and k of the patch tokens by RoPE before Q K^T, so the relation is formed from the block's input
    as EvaAttention forms it; the RoPE table is the one the block is called with."""

    def embed(self, images):
        m = self.model
        return m.norm_pre(m._pos_embed(m.patch_embed(images))[0])

    def run_block(self, block, x):
        raise HdistillError(f"teacher {self.role!r}: --mask-forward drop is not available for Eva teachers (their "
                            "RoPE table is per patch position, which a dropping forward would have to gather)")

    def taps(self):
        return {"feat": functools.partial(_on_block, tap_block_output, self.model.blocks),
                "rel": self.tap_relation, "msa": functools.partial(_on_block, tap_msa, self.model.blocks)}

    def tap_relation(self, block, fn):
        attn = self.model.blocks[block].attn

        def hook(_module, args, kwargs):
            fn(qk_relations(*eva_qk(attn, args[0], kwargs.get("rope"))))
        return attn.register_forward_pre_hook(hook, with_kwargs=True)


def eva_qk(attn: nn.Module, x: torch.Tensor, rope: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """q, k [B, H, T, d] of a timm EvaAttention on its input x [B, T, D], as its forward forms them: fused qkv with
    (q, 0, v) biases or separate projections, q_norm / k_norm, RoPE on the tokens after the prefix."""
    from timm.layers import apply_rot_embed_cat
    B, T, _ = x.shape
    if attn.qkv is not None:
        bias = None if attn.q_bias is None else torch.cat((attn.q_bias, attn.k_bias, attn.v_bias))
        q, k = split_qk(F.linear(x, attn.qkv.weight, bias), attn.num_heads, attn.q_norm, attn.k_norm)
    else:
        q = attn.q_norm(attn.q_proj(x).reshape(B, T, attn.num_heads, -1).transpose(1, 2))
        k = attn.k_norm(attn.k_proj(x).reshape(B, T, attn.num_heads, -1).transpose(1, 2))
    if rope is not None:
        p, half = attn.num_prefix_tokens, getattr(attn, "rotate_half", False)
        q, k = (torch.cat([t[:, :, :p], apply_rot_embed_cat(t[:, :, p:], rope, half=half)], dim=2) for t in (q, k))
    return q, k


class OpenClipTeacher(Teacher):
    def __init__(self, info, model):
        super().__init__(info, model)
        self.batch_first = getattr(model.transformer, "batch_first", True)

    def to_btd(self, x):
        """Block inputs/outputs -> [B, T, D] (open_clip's towers may run sequence-first)."""
        return x if self.batch_first else x.transpose(0, 1)

    def tokens(self, images):
        captured = {}
        handle = self.model.transformer.register_forward_hook(
            lambda _m, _a, out: captured.__setitem__("x", out))
        try:
            self.model(images)
        finally:
            handle.remove()
        return self.model.ln_post(self.to_btd(captured["x"]))

    def embed(self, images):
        return self.model._embeds(images)

    def run_block(self, block, x):
        blk = self.model.transformer.resblocks[block]
        return blk(x) if self.batch_first else blk(x.transpose(0, 1)).transpose(0, 1)

    def _on_qkv(self, block, fn):
        """nn.MultiheadAttention keeps its fused in-projection as a parameter and applies it inside one functional
        call: project its query input again, [B, T, 3A], and hand it to fn."""
        attn = self.model.transformer.resblocks[block].attn

        def hook(_module, args):
            fn(F.linear(self.to_btd(args[0]), attn.in_proj_weight, attn.in_proj_bias), attn.num_heads)
        return attn.register_forward_pre_hook(hook)

    def taps(self):
        return {"feat": self.tap_block_output, "rel": self.tap_relation, "msa": self.tap_msa}

    def tap_block_output(self, block, fn):
        return self.model.transformer.resblocks[block].register_forward_hook(lambda _m, _a, out: fn(self.to_btd(out)))

    def tap_relation(self, block, fn):
        return self._on_qkv(block, lambda qkv, heads: fn(qk_relations(*split_qk(qkv, heads))))

    def tap_msa(self, block, fn):
        """Its out-projection is applied inside the same call, so the attention is computed again from q, k, v."""
        def attend(qkv, heads):
            B, T, _ = qkv.shape
            q, k, v = qkv.reshape(B, T, 3, heads, -1).permute(2, 0, 3, 1, 4)        # [B, H, T, d] each
            fn(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, T, -1))
        return self._on_qkv(block, attend)


def _on_block(tap, blocks: nn.ModuleList, block: int, fn):
    return tap(blocks[block], fn)


def _suggest(name: str, known: list[str]) -> str:
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
    return f" Did you mean: {', '.join(close)}?" if close else ""


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


def _build_timm(role: str, name: str, weights: WeightSource, image_size: int, kwargs: dict) -> Teacher:
    import timm
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


def _build_open_clip(role: str, name: str, weights: WeightSource, image_size: int, kwargs: dict) -> Teacher:
    import open_clip
    from open_clip.transformer import VisionTransformer

    arch, _, tag = name.partition("@")
    if arch not in open_clip.list_models():
        raise HdistillError(f"teacher {role!r}: unknown open_clip model {arch!r}." + _suggest(arch, open_clip.list_models()))
    if weights.kind == "hub" and not tag:
        tags = open_clip.list_pretrained_tags_by_model(arch)
        raise HdistillError(f"teacher {role!r}: name the open_clip pretrained tag to fetch, e.g. "
                            f"'open_clip:{arch}@{tags[0] if tags else 'TAG'}' (known tags: {', '.join(tags) or 'none'})")
    check_file(role, weights)
    try:
        clip = load_open_clip(role, arch, tag, weights, image_size, kwargs)
    except TypeError as err:
        raise HdistillError(f"teacher {role!r}: bad model argument for open_clip:{arch}: {err}") from None
    visual = clip.visual
    if not isinstance(visual, VisionTransformer) or visual.attn_pool is not None:
        raise HdistillError(f"teacher {role!r}: open_clip:{arch} has no plain ViT image tower")
    block0 = visual.transformer.resblocks[0].attn
    if not isinstance(block0, nn.MultiheadAttention) or block0.in_proj_weight is None:
        raise HdistillError(f"teacher {role!r}: open_clip:{arch} attention has no fused in-projection")
    cfg = open_clip.get_model_preprocess_cfg(clip)
    info = TeacherInfo(
        role=role, model=f"open_clip:{name}", weights=weights_record(weights, f"{arch}@{tag}" if tag else None),
        patch_size=visual.patch_size[0], image_size=image_size, width=visual.conv1.out_channels,
        depth=len(visual.transformer.resblocks), heads=block0.num_heads,
        mean=tuple(float(v) for v in cfg["mean"]), std=tuple(float(v) for v in cfg["std"]),
    )
    return OpenClipTeacher(info, visual)


# A family adapts one library's ViTs: it builds the model and wraps it in its Teacher subclass, whose
# taps give the targets. Model names are "FAMILY:NAME"; a name without a known family prefix is timm's.
FAMILIES = {"timm": _build_timm, "open_clip": _build_open_clip}


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

"""The open_clip family: an open_clip model's ViT image tower as a teacher, and how it is built."""
from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from hdistill.common.errors import HdistillError
from hdistill.common.teacher_info import TeacherInfo
from hdistill.common.taps import qk_relations, split_qk

from ..weights import WeightSource, check_file, load_open_clip, weights_record
from .base import Teacher, _suggest


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


def build(role: str, name: str, weights: WeightSource, image_size: int, kwargs: dict) -> Teacher:
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

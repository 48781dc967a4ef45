"""The MAE family: an official MAE pretraining checkpoint with its decoder (facebookresearch/mae models_mae.py; the
`model` state dict of mae_pretrain_vit_base_full.pth and the other sizes) as a teacher.

    --model mae=mae:vit_base_patch16_dec512d8b      (vit_large_patch16_dec512d8b, vit_huge_patch14_dec512d8b)

The encoder is timm's VisionTransformer (the `.mae` config: ImageNet normalisation), so its feat, rel and msa taps
are any timm ViT's. The decoder is MAE's: `decoder_embed`, `mask_token`, `decoder_pos_embed`, `decoder_blocks`,
`decoder_norm`, `decoder_pred`. `decoder_states` runs MAE's forward on a given set of visible patches (the encoder on
those, the decoder over every token with mask tokens) and returns the hidden states after the asked decoder blocks,
before `decoder_norm`: the `dec@B` targets (G2SD's). Weights load strictly, encoder and decoder: every tensor comes from the file, and the
file holds no other. `--model-arg mae.decoder_embed_dim=...`, `decoder_depth`, `decoder_num_heads` size the decoder,
every other argument the encoder (timm's).
"""
from __future__ import annotations

import functools
from dataclasses import replace

import torch
from torch import nn

from hdistill.common.errors import HdistillError
from hdistill.common.strict_load import LoadProblem
from hdistill.common.tokens import gather_rows, sincos_pos_embed, with_mask_tokens

from ..weights import WeightSource, check_file, file_tensors, refusal, seeded, weights_record
from .timm_vit import TimmTeacher, timm_info

# name -> (the encoder's timm name, the decoder's width, depth and heads): models_mae.py's mae_vit_*_dec512d8b
ARCHS = {
    "vit_base_patch16_dec512d8b": ("vit_base_patch16_224.mae", 512, 8, 16),
    "vit_large_patch16_dec512d8b": ("vit_large_patch16_224.mae", 512, 8, 16),
    "vit_huge_patch14_dec512d8b": ("vit_huge_patch14_224.mae", 512, 8, 16),
}
DECODER_ARGS = ("decoder_embed_dim", "decoder_depth", "decoder_num_heads")


class MaeDecoder(nn.Module):
    """MAE's decoder, its parameters named as in the official checkpoints."""

    def __init__(self, encoder_width: int, num_patches: int, width: int, depth: int, heads: int, out: int):
        super().__init__()
        from timm.models.vision_transformer import Block
        self.decoder_embed = nn.Linear(encoder_width, width)
        self.mask_token = nn.Parameter(torch.randn(1, 1, width) * 0.02)          # MAE's init (a file replaces both)
        grid = int(round(num_patches ** 0.5))
        self.decoder_pos_embed = nn.Parameter(torch.from_numpy(sincos_pos_embed(width, grid))[None],
                                              requires_grad=False)
        self.decoder_blocks = nn.ModuleList([Block(width, heads, mlp_ratio=4.0, qkv_bias=True,
                                                   norm_layer=functools.partial(nn.LayerNorm, eps=1e-6))
                                             for _ in range(depth)])
        self.decoder_norm = nn.LayerNorm(width, eps=1e-6)
        self.decoder_pred = nn.Linear(width, out)


class MaeWithDecoder(nn.Module):
    """The encoder (a timm VisionTransformer, under `encoder.`) and the decoder (at the top, as in the checkpoint)."""

    def __init__(self, encoder: nn.Module, decoder: MaeDecoder):
        super().__init__()
        self.encoder = encoder
        for name, module in decoder.named_children():
            self.add_module(name, module)
        self.mask_token, self.decoder_pos_embed = decoder.mask_token, decoder.decoder_pos_embed

    def load_official(self, state: dict[str, torch.Tensor]):
        """A checkpoint's keys as models_mae.py names them (the encoder's unprefixed), strictly."""
        ours = {(k if k.startswith("decoder_") or k == "mask_token" else f"encoder.{k}"): v for k, v in state.items()}
        self.load_state_dict(ours, strict=True)


class MaeDecoderTeacher(TimmTeacher):
    """An MAE encoder with its decoder: the encoder's taps as a timm ViT's (`model` is the encoder), and
    `decoder_states`."""

    def __init__(self, info, mae: MaeWithDecoder):
        super().__init__(info, mae.encoder)
        self.mae = mae.eval().requires_grad_(False)

    def decoder_states(self, images: torch.Tensor, visible: torch.Tensor, blocks: list[int]) -> dict[int, torch.Tensor]:
        """Preprocessed images [B, 3, H, W] and the visible patches [B, n] -> {B: the decoder's hidden state after its
        0-indexed block B, before decoder_norm, at every token [B, 1+N, W_dec]} for each of `blocks` (MAE's
        forward_encoder and forward_decoder, with the visible patches given instead of drawn)."""
        m, mae = self.model, self.mae
        x = m.patch_embed(images) + m.pos_embed[:, 1:]                      # [B, N, D]
        x = gather_rows(x, visible)                                          # [B, n, D]
        cls = (m.cls_token + m.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)
        for blk in m.blocks:
            x = blk(x)
        x = mae.decoder_embed(m.norm(x))                                     # [B, 1+n, W]
        x = with_mask_tokens(x, visible, mae.mask_token, mae.decoder_pos_embed.shape[1] - 1) + mae.decoder_pos_embed
        states = {}
        for b, blk in enumerate(mae.decoder_blocks[:max(blocks) + 1]):
            x = blk(x)
            if b in blocks:
                states[b] = x
        return states


def build(role: str, name: str, weights: WeightSource, image_size: int, kwargs: dict) -> MaeDecoderTeacher:
    import timm

    if name not in ARCHS:
        raise HdistillError(f"teacher {role!r}: unknown MAE model mae:{name}; known: "
                            f"{', '.join('mae:' + a for a in ARCHS)}")
    if weights.kind == "hub":
        raise HdistillError(f"teacher {role!r}: mae:{name} loads the official MAE checkpoints from a file (they are "
                            "not on timm's hub with their decoder): --weights ROLE=PATH to e.g. "
                            "mae_pretrain_vit_base_full.pth")
    check_file(role, weights)
    encoder_name, width, depth, heads = ARCHS[name]
    decoder_args = {k: kwargs.pop(k) for k in DECODER_ARGS if k in kwargs}
    width, depth = decoder_args.get("decoder_embed_dim", width), decoder_args.get("decoder_depth", depth)
    heads = decoder_args.get("decoder_num_heads", heads)
    if width % 4:
        raise HdistillError(f"teacher {role!r}: --model-arg {role}.decoder_embed_dim={width}: MAE's decoder width is a "
                            "multiple of 4 (its 2-D sin-cos position embeddings)")
    with seeded(weights):           # random weights (--random-init) are a function of the seed alone
        try:
            encoder = timm.create_model(encoder_name, pretrained=False, num_classes=0, img_size=image_size, **kwargs)
        except TypeError as err:
            raise HdistillError(f"teacher {role!r}: bad model argument for mae:{name}: {err}") from None
        patch = encoder.patch_embed.patch_size[0]
        decoder = MaeDecoder(encoder.embed_dim, encoder.patch_embed.num_patches, width, depth, heads, patch * patch * 3)
    mae = MaeWithDecoder(encoder, decoder)
    if weights.kind == "file":
        try:
            mae.load_official(file_tensors(role, weights.path))
        except RuntimeError as err:
            if LoadProblem.of(err) is None:
                raise
            # (the message names the checkpoint's keys: the encoder's without our "encoder." prefix)
            raise HdistillError(str(refusal(role, f"mae:{name}", weights, err)).replace("encoder.", "")) from None
    info = replace(timm_info(role, name, encoder, weights_record(weights, None), image_size), model=f"mae:{name}",
                   decoder_width=width, decoder_depth=depth)
    return MaeDecoderTeacher(info, mae)

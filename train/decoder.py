"""The student's light decoder for masked feature reconstruction (dBOT, the paper's Fig. 3(b); G2SD's student), as
MAE's (facebookresearch/mae models_mae.py): a linear embedding of the encoder's tokens, a learned mask token at
every patch the encoder did not see, fixed 2-D sin-cos position embeddings, transformer blocks and a norm. It
predicts every token (CLS first); the loss takes its output where the student's final tokens would be."""
from __future__ import annotations

import functools

import torch
from timm.models.vision_transformer import Block
from torch import nn

from hdistill.common.tokens import sincos_pos_embed, with_mask_tokens


class Decoder(nn.Module):
    """[B, 1+n, D] encoder tokens of the patches `keep` [B, n] -> [B, 1+N, W] decoded tokens of all N patches."""

    def __init__(self, encoder_width: int, num_patches: int, width: int, depth: int, heads: int):
        super().__init__()
        grid = int(round(num_patches ** 0.5))
        self.num_patches = num_patches
        self.embed = nn.Linear(encoder_width, width)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, width))
        self.register_buffer("pos_embed", torch.from_numpy(sincos_pos_embed(width, grid))[None], persistent=False)
        self.blocks = nn.ModuleList([Block(width, heads, mlp_ratio=4.0, qkv_bias=True,
                                           norm_layer=functools.partial(nn.LayerNorm, eps=1e-6)) for _ in range(depth)])
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self._init_weights()

    @property
    def width(self) -> int:
        return self.embed.out_features

    def _init_weights(self):
        """MAE's: mask token N(0, 0.02), linear layers xavier-uniform with zero bias, norms 1 and 0."""
        nn.init.normal_(self.mask_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, tokens: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        x = with_mask_tokens(self.embed(tokens), keep, self.mask_token, self.num_patches)    # [B, 1+N, W]
        x = x + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


def export_decoder(decoder: Decoder, path) -> None:
    """The decoder's state dict apart from the backbone (RUN/decoder.safetensors), atomically; its metadata says how
    to build it again (Decoder's arguments)."""
    from .student import save_module
    save_module(decoder, {"encoder_width": str(decoder.embed.in_features), "num_patches": str(decoder.num_patches),
                          "width": str(decoder.width), "depth": str(len(decoder.blocks)),
                          "heads": str(decoder.blocks[0].attn.num_heads)}, path)

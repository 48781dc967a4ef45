"""Tiny models and inputs shared by the tests (no hub, no files of the user's)."""
from pathlib import Path

import torch

ASSETS = Path(__file__).resolve().parents[2] / "shared" / "assets"

# name -> (timm model, kwargs, image size); every one gives a 4x4 patch grid
TIMM_TINY = {
    "timm-p16": ("vit_base_patch16_224", dict(embed_dim=32, depth=4, num_heads=4), 64),
    "timm-p14-ls": ("vit_small_patch14_dinov2", dict(embed_dim=32, depth=4, num_heads=2, init_values=0.5), 56),
    "timm-p16-qknorm": ("vit_base_patch16_224", dict(embed_dim=32, depth=4, num_heads=4, qk_norm=True), 64),
    # the layouts beyond CLS-first: DINOv2 with 4 registers, SigLIP without CLS (MAP pooling)
    "timm-p14-reg4": ("vit_small_patch14_reg4_dinov2", dict(embed_dim=32, depth=4, num_heads=2, init_values=0.5), 56),
    "timm-siglip": ("vit_base_patch16_siglip_224", dict(embed_dim=32, depth=4, num_heads=4), 64),
    # Eva: EVA-02 (fused qkv with separate q and v biases, RoPE, SwiGLU) and EVA-CLIP (q, k, v projected apart,
    # sub-LN before the output projection)
    "eva02": ("eva02_tiny_patch14_224", dict(embed_dim=32, depth=4, num_heads=2), 56),
    "eva02-clip": ("eva02_base_patch16_clip_224", dict(embed_dim=32, depth=4, num_heads=4), 64),
}

OPEN_CLIP_TINY = {
    # name -> (vision_cfg extras, image size)
    "hdtest-vit-p16": (dict(patch_size=16, image_size=64), 64),
    "hdtest-vit-p14-ls": (dict(patch_size=14, image_size=56, ls_init_value=0.5), 56),
}


def random_pixels(batch, size, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, size, size, 3), dtype=torch.uint8, generator=g)

"""Tiny models and inputs shared by the tests (no hub, no files of the user's)."""
from pathlib import Path

import torch

ASSETS = Path(__file__).resolve().parents[2] / "shared" / "assets"

# name -> (timm model, kwargs, image size); every one gives a 4x4 patch grid
TIMM_TINY = {
    "timm-p16": ("vit_base_patch16_224", dict(embed_dim=32, depth=4, num_heads=4), 64),
    "timm-p14-ls": ("vit_small_patch14_dinov2", dict(embed_dim=32, depth=4, num_heads=2, init_values=0.5), 56),
    "timm-p16-qknorm": ("vit_base_patch16_224", dict(embed_dim=32, depth=4, num_heads=4, qk_norm=True), 64),
}

OPEN_CLIP_TINY = {
    # name -> (vision_cfg extras, image size)
    "hdtest-vit-p16": (dict(patch_size=16, image_size=64), 64),
    "hdtest-vit-p14-ls": (dict(patch_size=14, image_size=56, ls_init_value=0.5), 56),
}


def random_pixels(batch, size, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, size, size, 3), dtype=torch.uint8, generator=g)

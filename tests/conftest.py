"""Fixtures: tiny open_clip configs registered for the session, the training stores; no test reaches a hub."""
import json
import os

import pytest
import torch

from helpers import precompute, write_photos
from tinymodels import OPEN_CLIP_TINY

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# two threads, or one in each of pytest-xdist's workers (they run side by side: the suite's cores are theirs)
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def open_clip_tiny(tmp_path_factory):
    """Registers tiny open_clip configs under their names; returns {name: image size}."""
    import open_clip
    folder = tmp_path_factory.mktemp("open_clip_cfg")
    for name, (vision, _size) in OPEN_CLIP_TINY.items():
        cfg = {
            "embed_dim": 16, "quick_gelu": True,
            "vision_cfg": dict(layers=4, width=32, head_width=8, **vision),
            "text_cfg": dict(context_length=8, vocab_size=64, width=16, heads=2, layers=1),
        }
        (folder / f"{name}.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(folder)
    return {name: size for name, (_v, size) in OPEN_CLIP_TINY.items()}


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """A kept store (every kind of target) and a full store of 12 photos x 2 views, for the training tests."""
    root = tmp_path_factory.mktemp("train-stores")
    write_photos(root / "photos", 12, seed=11)
    precompute(root / "photos", root / "kept", views=2, formats=["wds"],
               targets=["clip:feat", "mae:rel@1,2", "mae:msa@1", "mae:feat@2"])
    precompute(root / "photos", root / "full", views=2, formats=["wds"], tokens="full")
    return root

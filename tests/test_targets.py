"""Each teacher target against an independent computation written here.

The reference forward (tests/reference.py) rebuilds a ViT pass by hand from the model's weights, with
explicit softmax attention (the teachers run fused SDPA), and records every block's
Q K^T and output. Features, relations and the progressive mask must match it.
"""
import numpy as np
import pytest
import torch

from reference import loop_mask, reference_forward
from tinymodels import OPEN_CLIP_TINY, TIMM_TINY, random_pixels
from hdistill.common.specs import MaskSpec
from hdistill.precompute.mask import progressive_mask
from hdistill.precompute.targets import compute_targets, plan_targets
from hdistill.precompute.teachers import OpenClipTeacher, WeightSource, build_teacher


def tiny_teachers(open_clip_tiny):
    """(label, role, teacher) for every tiny model; mae role so relations and mask are computed."""
    out = []
    for label, (name, kwargs, size) in TIMM_TINY.items():
        out.append((label, build_teacher("mae", WeightSource("random", seed=3), size, name, kwargs)))
    for name, size in open_clip_tiny.items():
        out.append((name, build_teacher("mae", WeightSource("random", seed=4), size, f"open_clip:{name}")))
    return out


@pytest.fixture(scope="module")
def teachers(open_clip_tiny):
    return tiny_teachers(open_clip_tiny)


def test_models_cover_the_required_variants(teachers):
    labels = {label: t for label, t in teachers}
    assert {t.info.patch_size for t in labels.values()} == {14, 16}
    assert isinstance(labels["hdtest-vit-p14-ls"], OpenClipTeacher)
    ls_gammas = [labels["timm-p14-ls"].model.blocks[0].ls1.gamma,
                 labels["hdtest-vit-p14-ls"].model.transformer.resblocks[0].ls_1.gamma]
    assert all(torch.allclose(g, torch.full_like(g, 0.5)) for g in ls_gammas)


@pytest.mark.parametrize("index", range(len(TIMM_TINY) + len(OPEN_CLIP_TINY)))
def test_targets_match_hand_computed_forward(teachers, index):
    label, teacher = teachers[index]
    spec = plan_targets({"mae": teacher}, relation_blocks=[1, 2], mask_ratio=0.3)
    pixels = random_pixels(3, teacher.info.image_size, seed=index)
    targets = compute_targets({"mae": teacher}, pixels, spec)
    final, relations, outputs = reference_forward(teacher, pixels)

    T = teacher.info.grid.num_patches + 1
    assert targets.features["mae"].shape == (3, T, teacher.info.width)
    torch.testing.assert_close(targets.features["mae"], final, rtol=1e-4, atol=1e-4)
    assert sorted(targets.relations["mae"]) == [1, 2]
    for b in (1, 2):
        got = targets.relations["mae"][b]
        assert got.shape == (3, teacher.info.heads, T, T)
        torch.testing.assert_close(got, relations[b], rtol=1e-4, atol=1e-4 * relations[b].abs().max().item())

    assert spec.mask.blocks == (0, 1, 2)  # [0, L/3, 2L/3] for L = 4
    for v in range(3):
        stage, kept = loop_mask([outputs[b][v].numpy() for b in spec.mask.blocks], ratio_tenths=3)
        np.testing.assert_array_equal(targets.mask.stage[v].numpy(), stage)
        np.testing.assert_array_equal(targets.mask.keep_idx[v].numpy(), kept)


def test_fused_attention_is_on(teachers):
    label, teacher = teachers[0]
    assert teacher.model.blocks[0].attn.fused_attn, "teachers must run with fused attention left on"


def test_mask_rule_against_plain_loop():
    g = torch.Generator().manual_seed(0)
    stages = [torch.randn(5, 1 + 196, 24, generator=g) for _ in range(3)]
    mask = progressive_mask(stages, MaskSpec(ratio=0.3, blocks=(0, 4, 8)))
    assert mask.keep_idx.shape == (5, 68)  # 196 -> 138 -> 97 -> 68
    for v in range(5):
        stage, kept = loop_mask([s[v].numpy() for s in stages], ratio_tenths=3)
        np.testing.assert_array_equal(mask.stage[v].numpy(), stage)
        np.testing.assert_array_equal(mask.keep_idx[v].numpy(), kept)
        assert (mask.stage[v] == 0).sum() == 68


def test_mask_ties_drop_lower_index_first_and_cls_is_ignored():
    tokens = torch.ones(1, 1 + 10, 4)
    tokens[0, 0] = -100.0  # CLS: never ranked, never in the mean
    mask = progressive_mask([tokens], MaskSpec(ratio=0.3, blocks=(0,)))
    assert mask.stage[0].tolist() == [1, 1, 1, 0, 0, 0, 0, 0, 0, 0]
    assert mask.keep_idx[0].tolist() == [3, 4, 5, 6, 7, 8, 9]


def test_mask_counts_documented_rounding():
    spec = MaskSpec(ratio=0.3, blocks=(0, 4, 8))
    assert spec.kept_counts(196) == [196, 138, 97, 68]
    assert MaskSpec(ratio=0.7).drop_count(10) == 7  # exact decimal, not 6.999...


def test_teacher_reports_its_shape_and_preprocessing(teachers):
    labels = dict(teachers)
    t = labels["timm-p14-ls"]
    assert (t.info.patch_size, t.info.grid.side, t.info.width, t.info.depth, t.info.heads) == (14, 4, 32, 4, 2)
    c = labels["hdtest-vit-p16"]
    assert (c.info.patch_size, c.info.grid.side, c.info.width, c.info.depth, c.info.heads) == (16, 4, 32, 4, 4)
    # CLIP's own normalisation, not ImageNet's
    assert c.info.mean == pytest.approx((0.48145466, 0.4578275, 0.40821073))
    pixels = random_pixels(2, 64)
    expected = (pixels.permute(0, 3, 1, 2).double() / 255 - torch.tensor(c.info.mean, dtype=torch.float64).view(1, 3, 1, 1)) \
        / torch.tensor(c.info.std, dtype=torch.float64).view(1, 3, 1, 1)
    torch.testing.assert_close(c.preprocess(pixels).double(), expected, rtol=1e-6, atol=1e-6)

"""Each teacher target against an independent computation written here.

The reference forward (tests/reference.py) rebuilds a ViT pass by hand from the model's weights, with
explicit softmax attention (the teachers run fused SDPA), and records every block's
Q K^T and output. Features, relations and the progressive mask must match it.
"""
import numpy as np
import pytest
import torch

from reference import loop_dropping_mask, loop_mask, reference_forward
from tinymodels import OPEN_CLIP_TINY, TIMM_TINY, random_pixels
from hdistill.common.mask_spec import MaskSpec
from hdistill.precompute.mask import mask_from_full_forward
from hdistill.common.targets import TargetRequest
from hdistill.precompute.targets import compute_targets, plan_mask, plan_targets
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


ALL_KINDS = [TargetRequest("mae", "feat"), TargetRequest("mae", "feat", 1), TargetRequest("mae", "feat", -1),
             TargetRequest("mae", "rel", 1), TargetRequest("mae", "rel", 2), TargetRequest("mae", "msa", 0),
             TargetRequest("mae", "msa", 2)]


@pytest.mark.parametrize("index", range(len(TIMM_TINY) + len(OPEN_CLIP_TINY)))
def test_every_target_kind_matches_hand_computed_forward(teachers, index):
    label, teacher = teachers[index]
    prefix = teacher.info.layout.stored_prefix                             # CLS stored, registers never
    T = prefix + teacher.info.grid.num_patches
    mask = plan_mask({"mae": teacher}, ratio=0.3)
    targets = plan_targets({"mae": teacher}, ALL_KINDS, teacher.info.grid.num_patches)
    assert [t.name for t in targets] == ["feat.mae", "feat.mae.b1", "feat.mae.b3", "rel.mae.b1", "rel.mae.b2",
                                         "msa.mae.b0", "msa.mae.b2"]
    pixels = random_pixels(3, teacher.info.image_size, seed=index)
    values = compute_targets({"mae": teacher}, pixels, targets, mask).values
    final, relations, outputs, msa = reference_forward(teacher, pixels)

    def close(got, want):
        assert got.shape == want.shape and got.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())

    close(values["feat.mae"], final)
    for b in (1, 3):
        close(values[f"feat.mae.b{b}"], outputs[b])
    for b in (1, 2):
        assert values[f"rel.mae.b{b}"].shape == (3, teacher.info.heads, T, T)
        close(values[f"rel.mae.b{b}"], relations[b])
    for b in (0, 2):
        close(values[f"msa.mae.b{b}"], msa[b])

    assert mask.blocks == (0, 1, 2)  # [0, L/3, 2L/3] for L = 4
    m = compute_targets({"mae": teacher}, pixels, targets, mask).mask
    for v in range(3):
        stage, kept = loop_mask([outputs[b][v].numpy() for b in mask.blocks], ratio_tenths=3, normalized=True,
                                prefix=prefix)
        np.testing.assert_array_equal(m.stage[v].numpy(), stage)
        np.testing.assert_array_equal(m.keep_idx[v].numpy(), kept)


def test_teachers_declare_their_token_layout(teachers):
    """CLS-first ViTs, DINOv2 with registers (stored without them), SigLIP without CLS, and Eva's CLS."""
    layouts = {label: (t.info.layout.cls, t.info.layout.registers) for label, t in teachers}
    assert layouts["timm-p16"] == layouts["hdtest-vit-p16"] == layouts["eva02"] == (True, 0)
    assert layouts["timm-p14-reg4"] == (True, 4) and layouts["timm-siglip"] == (False, 0)
    labels = dict(teachers)
    specs = plan_targets({"mae": labels["timm-siglip"]}, ALL_KINDS[:4], 16)
    assert {t.shape[-2 if t.kind != "rel" else -1] for t in specs} == {16} and not any(t.cls for t in specs)
    assert {t.shape[0] for t in plan_targets({"mae": labels["timm-p14-reg4"]}, ALL_KINDS[:1], 16)} == {17}


def test_msa_is_taken_before_layerscale(teachers):
    """With LayerScale 0.5 the residual adds half the attention output: msa must be the unscaled output."""
    labels = dict(teachers)
    for label in ("timm-p14-ls", "hdtest-vit-p14-ls"):
        teacher = labels[label]
        pixels = random_pixels(2, teacher.info.image_size, seed=5)
        targets = plan_targets({"mae": teacher}, [TargetRequest("mae", "msa", 1), TargetRequest("mae", "feat", 0),
                                                  TargetRequest("mae", "feat", 1)], 16)
        values = compute_targets({"mae": teacher}, pixels, targets, MaskSpec(ratio=0.0)).values
        _, _, outputs, msa = reference_forward(teacher, pixels)
        # residual after block 1 = after block 0 + 0.5 * msa(1) + 0.5 * mlp(...): msa alone is not half of it
        torch.testing.assert_close(values["msa.mae.b1"], msa[1], rtol=1e-4, atol=1e-4)
        assert not torch.allclose(values["msa.mae.b1"] * 0.5, msa[1], atol=1e-3)


def test_mask_variants_against_plain_loop(teachers):
    label, teacher = teachers[0]
    pixels = random_pixels(4, teacher.info.image_size, seed=9)
    _, _, outputs, _ = reference_forward(teacher, pixels)
    for blocks, mean in [((2,), "raw"), ((0, 2), "normalized"), ((1,), "normalized")]:
        mask = plan_mask({"mae": teacher}, ratio=0.5, blocks=list(blocks), mean=mean)
        assert (mask.blocks, mask.mean, mask.role) == (blocks, mean, "mae")
        m = compute_targets({"mae": teacher}, pixels, [], mask).mask
        assert m.keep_idx.shape[1] == mask.kept_counts(16)[-1]
        for v in range(4):
            stage, kept = loop_mask([outputs[b][v].numpy() for b in blocks], ratio_tenths=5,
                                    normalized=mean == "normalized")
            np.testing.assert_array_equal(m.stage[v].numpy(), stage)
            np.testing.assert_array_equal(m.keep_idx[v].numpy(), kept)


def test_normalized_mean_changes_the_ranking():
    """Two token groups of different norms: the raw mean points at the large ones, the normalised mean between."""
    g = torch.Generator().manual_seed(3)
    big, small = torch.tensor([10.0, 0.0]), torch.tensor([0.0, 1.0])
    patches = torch.stack([big] * 4 + [small] * 6) + 0.01 * torch.randn(10, 2, generator=g)
    tokens = torch.cat([torch.zeros(1, 2), patches])[None]                    # [1, 1+10, 2]
    raw = mask_from_full_forward([tokens], MaskSpec(ratio=0.3, blocks=(0,), role="mae", mean="raw"))
    normalized = mask_from_full_forward([tokens], MaskSpec(ratio=0.3, blocks=(0,), role="mae", mean="normalized"))
    assert set(torch.nonzero(raw.stage[0]).flatten().tolist()) <= {0, 1, 2, 3}       # drops big ones
    assert set(torch.nonzero(normalized.stage[0]).flatten().tolist()) <= set(range(4, 10))  # drops small ones


def test_fused_attention_is_on(teachers):
    label, teacher = teachers[0]
    assert teacher.model.blocks[0].attn.fused_attn, "teachers must run with fused attention left on"


def test_mask_rule_against_plain_loop():
    g = torch.Generator().manual_seed(0)
    stages = [torch.randn(5, 1 + 196, 24, generator=g) for _ in range(3)]
    mask = mask_from_full_forward(stages, MaskSpec(ratio=0.3, blocks=(0, 4, 8), mean="raw"))
    assert mask.keep_idx.shape == (5, 68)  # 196 -> 138 -> 97 -> 68
    for v in range(5):
        stage, kept = loop_mask([s[v].numpy() for s in stages], ratio_tenths=3)
        np.testing.assert_array_equal(mask.stage[v].numpy(), stage)
        np.testing.assert_array_equal(mask.keep_idx[v].numpy(), kept)
        assert (mask.stage[v] == 0).sum() == 68


def test_mask_ties_drop_lower_index_first_and_cls_is_ignored():
    tokens = torch.ones(1, 1 + 10, 4)
    tokens[0, 0] = -100.0  # CLS: never ranked, never in the mean
    mask = mask_from_full_forward([tokens], MaskSpec(ratio=0.3, blocks=(0,)))
    assert mask.stage[0].tolist() == [1, 1, 1, 0, 0, 0, 0, 0, 0, 0]
    assert mask.keep_idx[0].tolist() == [3, 4, 5, 6, 7, 8, 9]


def test_mask_counts_documented_rounding():
    spec = MaskSpec(ratio=0.3, blocks=(0, 4, 8))
    assert spec.kept_counts(196) == [196, 138, 97, 68]
    assert MaskSpec(ratio=0.7, blocks=(0,)).kept_counts(10) == [10, 3]  # exact decimal: 7 dropped, not 6.999...
    # direct drops in one stage what the progressive stages drop together (Tab. 8: same number of tokens)
    for ratio, kept in [(0.1, 144), (0.3, 68), (0.5, 25)]:   # 196 -> 177 -> 160 -> 144; 196 -> 98 -> 49 -> 25
        assert MaskSpec(ratio=ratio, blocks=(11,), strategy="direct", stages=3).kept_counts(196) == [196, kept]


def test_direct_mask_ranks_once_at_the_last_block(teachers):
    for label, teacher in teachers[:1] + teachers[-1:]:                     # a timm and an open_clip teacher
        pixels = random_pixels(4, teacher.info.image_size, seed=11)
        _, _, outputs, _ = reference_forward(teacher, pixels)
        progressive = plan_mask({"mae": teacher}, ratio=0.3)
        direct = plan_mask({"mae": teacher}, ratio=0.3, strategy="direct")
        assert (direct.blocks, direct.stages, direct.strategy) == ((3,), 3, "direct")
        n_kept = progressive.kept_counts(16)[-1]                            # 16 -> 12 -> 9 -> 7
        assert n_kept == 7
        m = compute_targets({"mae": teacher}, pixels, [], direct).mask
        assert m.keep_idx.shape == (4, n_kept) and set(m.stage.unique().tolist()) == {0, 1}
        for v in range(4):
            stage, kept = loop_mask([outputs[3][v].numpy()], ratio_tenths=0, normalized=True, drops=[16 - n_kept])
            np.testing.assert_array_equal(m.stage[v].numpy(), stage)
            np.testing.assert_array_equal(m.keep_idx[v].numpy(), kept)


@pytest.mark.parametrize("mean", ["normalized", "raw"])
def test_dropping_forward_against_a_hand_written_one(teachers, mean):
    """--mask-forward drop: each stage ranks a forward in which the dropped tokens are gone; the targets stay the
    full forward's."""
    for label, teacher in teachers[:1] + teachers[-1:]:
        pixels = random_pixels(8, teacher.info.image_size, seed=12)
        targets = plan_targets({"mae": teacher}, ALL_KINDS, 16)
        full = compute_targets({"mae": teacher}, pixels, targets, plan_mask({"mae": teacher}, 0.3, mean=mean))
        dropping = plan_mask({"mae": teacher}, ratio=0.3, mean=mean, forward="drop")
        got = compute_targets({"mae": teacher}, pixels, targets, dropping)
        for name, value in full.values.items():
            torch.testing.assert_close(got.values[name], value, rtol=0, atol=0)
        want = loop_dropping_mask(teacher, pixels, dropping.blocks, ratio_tenths=3, normalized=mean == "normalized")
        for v, (stage, kept) in enumerate(want):
            np.testing.assert_array_equal(got.mask.stage[v].numpy(), stage)
            np.testing.assert_array_equal(got.mask.keep_idx[v].numpy(), kept)
        assert (got.mask.keep_idx != full.mask.keep_idx).any(), f"{label}: the forwards rank differently here"

"""Optional: a real trained ViT-S/14 and real ImageNet images from ../shared/assets (skipped when absent)."""
import numpy as np
import pytest
import torch
from PIL import Image

from tinymodels import ASSETS
from hdistill.common.targets import parse_targets
from hdistill.precompute.targets import compute_targets, default_requests, plan_mask, plan_targets
from hdistill.precompute.teachers import WeightSource, build_teacher
from hdistill.precompute.view import make_view

WEIGHTS = ASSETS / "vit_small_patch14_dinov2.imgfocus_fp16.safetensors"
IMAGES = ASSETS / "imagenet-sample-100"
pytestmark = pytest.mark.skipif(not (WEIGHTS.exists() and IMAGES.is_dir()), reason="../shared/assets not present")


def loaded_by_hand():
    """The recipe of PROVENANCE.md: fp32, bicubic pos-embed resampling to 16x16, strict load.

    One change: antialias=True, as timm's own pretrained loader (vision_transformer.checkpoint_filter_fn)
    resamples, which hdistill must go through; PROVENANCE.md's manual recipe says antialias=False.
    """
    import timm
    from safetensors.torch import load_file
    from timm.layers import resample_abs_pos_embed
    state = load_file(str(WEIGHTS))
    # resampled from the stored float16 tensor (computed in float32, returned in float16), as timm does
    state["pos_embed"] = resample_abs_pos_embed(state["pos_embed"], new_size=(16, 16), num_prefix_tokens=1,
                                                interpolation="bicubic", antialias=True)
    state = {k: v.float() for k, v in state.items()}
    model = timm.create_model("vit_small_patch14_dinov2", pretrained=False, num_classes=0, img_size=224)
    model.load_state_dict(state, strict=True)
    return model.eval()


def test_real_vit_s14_from_file_matches_the_documented_recipe():
    teacher = build_teacher("mae", WeightSource("file", path=str(WEIGHTS)), 224, "vit_small_patch14_dinov2")
    assert (teacher.info.patch_size, teacher.info.grid.side, teacher.info.width, teacher.info.depth,
            teacher.info.heads) == (14, 16, 384, 12, 6)
    files = sorted(IMAGES.glob("*.JPEG"))[:4]
    pixels = torch.stack([torch.from_numpy(make_view(Image.open(f).convert("RGB"), f.stem, 0, 0, 224)[0])
                          for f in files])
    mask = plan_mask({"mae": teacher})
    specs = plan_targets({"mae": teacher}, parse_targets(["mae:feat"]) + default_requests({"mae": teacher}), 256)
    targets = compute_targets({"mae": teacher}, pixels, specs, mask)
    with torch.no_grad():
        expected = loaded_by_hand().forward_features(teacher.preprocess(pixels))
    torch.testing.assert_close(targets.values["feat.mae"], expected, rtol=1e-4, atol=1e-4)
    assert [t.name for t in specs if t.kind == "rel"] == ["rel.mae.b9", "rel.mae.b10"] and mask.blocks == (0, 4, 8)
    assert targets.mask.keep_idx.shape == (4, 89)  # 256 -> 180 -> 126 -> 89
    for block in (9, 10):
        r = targets.values[f"rel.mae.b{block}"]
        assert r.shape == (4, 6, 257, 257) and torch.isfinite(r).all()
        assert r.abs().max() < 60000, "a real teacher's Q K^T fits in float16"
    # every stage dropped tokens and some were kept to the end
    assert np.unique(targets.mask.stage.numpy()).tolist() == [0, 1, 2, 3]


def test_int8_encoding_of_real_targets_stays_within_its_bound():
    from hdistill.shards.encoding import decode, encode, parse_encodings
    teacher = build_teacher("mae", WeightSource("file", path=str(WEIGHTS)), 224, "vit_small_patch14_dinov2")
    files = sorted(IMAGES.glob("*.JPEG"))[4:8]
    pixels = torch.stack([torch.from_numpy(make_view(Image.open(f).convert("RGB"), f.stem, 0, 0, 224)[0])
                          for f in files])
    specs = plan_targets({"mae": teacher}, parse_targets(["mae:rel@9", "mae:msa@9", "mae:feat@8"]), 256,
                         parse_encodings(["int8"]))
    values = compute_targets({"mae": teacher}, pixels, specs, plan_mask({"mae": teacher}, ratio=0.0)).values
    for spec in specs:
        x = values[spec.name]
        arrays = encode(spec, x, who=str)
        for i in range(len(files)):
            got = decode(spec, {k: a[i].numpy() for k, a in arrays.items()})
            ref = x[i].numpy().astype(np.float64)
            row_max = np.abs(ref).max(-1, keepdims=True)
            assert (np.abs(got - ref) <= row_max / 254 + row_max / 2048).all(), spec.name

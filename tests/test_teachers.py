"""Building teachers: local weight files through timm's / open_clip's pretrained path, and clear errors."""
import pytest
import torch
from safetensors.torch import save_file

from tinymodels import TIMM_TINY, random_pixels
from hdistill.common.errors import HdistillError
from hdistill.common.grid import TokenGrid, check_same_grid
from hdistill.common.targets import parse_targets
from hdistill.shards.encoding import parse_encodings, target_arrays
from hdistill.precompute.targets import plan_mask, plan_targets
from hdistill.precompute.teachers import WeightSource, build_teacher


def save_timm_tiny(path, label="timm-p14-ls", seed=0, **overrides):
    import timm
    name, kwargs, size = TIMM_TINY[label]
    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False, **{"num_classes": 0, "img_size": size, **kwargs, **overrides}).eval()
    save_file(model.state_dict(), str(path))
    return model, name, kwargs, size


def test_timm_teacher_from_local_file_matches_in_memory_model(tmp_path):
    path = tmp_path / "tiny.safetensors"
    model, name, kwargs, size = save_timm_tiny(path)
    teacher = build_teacher("dino", WeightSource("file", path=str(path)), size, name, kwargs)
    x = teacher.preprocess(random_pixels(2, size))
    with torch.no_grad():
        torch.testing.assert_close(teacher.tokens(x), model.forward_features(x), rtol=0, atol=0)
    assert teacher.info.weights["source"] == "file"
    import hashlib
    assert teacher.info.weights["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_position_embedding_is_resampled_only_from_the_models_own_config(tmp_path, capsys):
    """DINOv2's case: weights at its config's 518 px (37x37) run at 56 px (4x4), resampled as timm resamples them,
    and said; weights of a grid that is neither the run's nor the config's are refused."""
    from timm.layers import resample_abs_pos_embed
    path = tmp_path / "at-config.safetensors"
    model, name, kwargs, size = save_timm_tiny(path, img_size=518)                  # the config's 37x37 grid
    teacher = build_teacher("dino", WeightSource("file", path=str(path)), size, name, kwargs)
    expected = resample_abs_pos_embed(model.pos_embed.detach(), new_size=(4, 4), num_prefix_tokens=1)
    torch.testing.assert_close(teacher.model.pos_embed, expected)
    assert "position embedding resampled from the 37x37 grid of the model's 518 px config to 4x4" in \
        capsys.readouterr().err
    other = tmp_path / "at-56.safetensors"
    save_timm_tiny(other)                                                             # 4x4, run at 84 px: 6x6
    with pytest.raises(HdistillError, match=r"holds 17 tokens, neither the 6x6 grid of --image-size 84 nor the "
                                            r"518 px grid of vit_small_patch14_dinov2's own config"):
        build_teacher("dino", WeightSource("file", path=str(other)), 84, name, kwargs)


def test_weights_that_fit_their_model_only_in_part_are_refused_by_name(tmp_path):
    """Missing blocks, LayerScale the model lacks, another patch size: refused before any model is used."""
    name, kwargs, size = TIMM_TINY["timm-p16"]
    short = tmp_path / "short.safetensors"
    save_timm_tiny(short, label="timm-p16", depth=2)                                 # blocks 2 and 3 are not in it
    deep = build_teacher("clip", WeightSource("random"), size, name, kwargs).model
    lost = [k for k in deep.state_dict() if k.startswith(("blocks.2.", "blocks.3."))]
    with pytest.raises(HdistillError, match=rf"teacher 'clip': model vit_base_patch16_224 does not fit "
                                            rf"weight file {short}: missing from the weights: blocks\.2-3: "
                                            rf"{len(lost)} tensors\. Give the weights"):
        build_teacher("clip", WeightSource("file", path=str(short)), size, name, kwargs)
    # a CLIP-config model (its config's head: 512) refuses its own kind alike, without naming the head it drops
    import timm
    clip_name = "vit_base_patch16_clip_quickgelu_224"
    short_clip = tmp_path / "short-clip.safetensors"
    save_file(timm.create_model(clip_name, num_classes=0, img_size=size, **{**kwargs, "depth": 2}).state_dict(),
              str(short_clip))
    with pytest.raises(HdistillError, match=rf"{clip_name} does not fit weight file {short_clip}: missing from the weights: blocks\.2-3: {len(lost)} "
                                            rf"tensors\. Give"):
        build_teacher("clip", WeightSource("file", path=str(short_clip)), size, clip_name, kwargs)
    # LayerScale weights into a model without LayerScale
    scaled = tmp_path / "scaled.safetensors"
    save_timm_tiny(scaled, label="timm-p14-ls")
    size14 = TIMM_TINY["timm-p14-ls"][2]
    with pytest.raises(HdistillError, match=r"in the weights but not in the model: blocks\.0-3: 8 tensors "
                                            r"\(ls1\.gamma, ls2\.gamma\)"):
        build_teacher("dino", WeightSource("file", path=str(scaled)), size14, "vit_small_patch16_224",
                      dict(embed_dim=32, depth=4, num_heads=2, patch_size=14))
    # the same file given to a patch-16 model: its patch embedding is not resampled into another teacher
    with pytest.raises(HdistillError, match=r"their patch embedding \(patch_embed\.proj\.weight\) cuts 14x14 px "
                                            r"patches, model vit_small_patch16_224 cuts 16x16 px"):
        build_teacher("dino", WeightSource("file", path=str(scaled)), 224, "vit_small_patch16_224",
                      dict(embed_dim=32, depth=4, num_heads=2, init_values=0.5))


def test_a_classifier_head_in_the_weights_is_dropped_and_said(tmp_path, capsys):
    path = tmp_path / "headed.safetensors"
    model, name, kwargs, size = save_timm_tiny(path, label="timm-p16", num_classes=10)
    teacher = build_teacher("deit", WeightSource("file", path=str(path)), size, name, kwargs)
    assert teacher.model.num_classes == 0 and not any(k.startswith("head.") for k in teacher.model.state_dict())
    assert "its weights' classifier head (head.weight [10, 32], head.bias [10]) is loaded and dropped" in \
        capsys.readouterr().err
    x = teacher.preprocess(random_pixels(2, size))
    with torch.no_grad():
        torch.testing.assert_close(teacher.tokens(x), model.forward_features(x), rtol=0, atol=0)


def test_open_clip_teacher_from_local_file(open_clip_tiny, tmp_path):
    import open_clip
    torch.manual_seed(0)
    clip = open_clip.create_model("hdtest-vit-p16").eval()
    path = tmp_path / "clip.safetensors"
    save_file(clip.state_dict(), str(path))
    teacher = build_teacher("clip", WeightSource("file", path=str(path)), 64, "open_clip:hdtest-vit-p16")
    for name, p in clip.visual.state_dict().items():
        torch.testing.assert_close(teacher.model.state_dict()[name], p, rtol=0, atol=0)
    x = teacher.preprocess(random_pixels(2, 64))
    with torch.no_grad():
        _, tokens = clip.visual._global_pool(clip.visual.ln_post(
            clip.visual.transformer(clip.visual._embeds(x))))
        torch.testing.assert_close(teacher.tokens(x)[:, 1:], tokens)


def test_random_init_is_recorded_and_deterministic():
    name, kwargs, size = TIMM_TINY["timm-p16"]
    a = build_teacher("mae", WeightSource("random", seed=7), size, name, kwargs)
    b = build_teacher("mae", WeightSource("random", seed=7), size, name, kwargs)
    assert a.info.weights == {"source": "random-init", "seed": 7}
    torch.testing.assert_close(a.model.state_dict(), b.model.state_dict(), rtol=0, atol=0)


def test_unknown_role_and_model_names():
    with pytest.raises(HdistillError, match="unknown teacher role 'maee'.*mae, deit, clip, dino"):
        build_teacher("maee", WeightSource("random"))
    with pytest.raises(HdistillError, match="unknown timm model 'vit_bsae_patch16_224'.*Did you mean"):
        build_teacher("mae", WeightSource("random"), model="vit_bsae_patch16_224")
    with pytest.raises(HdistillError, match="unknown open_clip model 'ViT-Q-99'"):
        build_teacher("clip", WeightSource("random"), model="open_clip:ViT-Q-99")
    with pytest.raises(HdistillError, match="needs a timm VisionTransformer"):
        build_teacher("deit", WeightSource("random"), model="resnet18")


def test_weight_files_that_cannot_be_read(tmp_path):
    _, name, kwargs, size = save_timm_tiny(tmp_path / "unused.safetensors")
    with pytest.raises(HdistillError, match="does not exist"):
        build_teacher("dino", WeightSource("file", path=str(tmp_path / "missing.pth")), size, name, kwargs)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(HdistillError, match="junk.pth"):
        build_teacher("dino", WeightSource("file", path=str(junk)), size, name, kwargs)


def test_an_open_clip_file_without_some_blocks_is_refused_by_name(open_clip_tiny, tmp_path):
    import open_clip
    clip = open_clip.create_model("hdtest-vit-p16")
    state = {k: v for k, v in clip.state_dict().items() if not k.startswith("visual.transformer.resblocks.3.")}
    lost = len(clip.state_dict()) - len(state)
    path = tmp_path / "clip.safetensors"
    save_file(state, str(path))
    with pytest.raises(HdistillError, match=rf"missing from the weights: visual\.transformer\.resblocks\.3: "
                                            rf"{lost} tensors"):
        build_teacher("clip", WeightSource("file", path=str(path)), 64, "open_clip:hdtest-vit-p16")


def test_target_table_defaults_blocks_and_errors():
    name, kwargs, size = TIMM_TINY["timm-p16"]
    mae = build_teacher("mae", WeightSource("random"), size, name, kwargs)
    clip = build_teacher("clip", WeightSource("random"), size, name, kwargs)
    with pytest.raises(HdistillError, match=r"--target mae:rel@4: block 4 is out of range for a 4-block"):
        plan_targets({"mae": mae}, parse_targets(["mae:rel@2,4"]), 16)
    with pytest.raises(HdistillError, match=r"--target deit:feat: 'deit' is not among the teachers"):
        plan_targets({"mae": mae}, parse_targets(["deit:feat"]), 16)
    names = lambda specs: [t.name for t in specs]  # noqa: E731
    assert names(plan_targets({"mae": mae}, parse_targets(["mae:rel@-3,-2"]), 16)) == ["rel.mae.b1", "rel.mae.b2"]
    # the paper's defaults: features of every non-MIM teacher, Q K^T of the MIM teacher at L-3, L-2; no MAE features
    defaults = plan_targets({"mae": mae, "clip": clip}, None, 16)
    assert names(defaults) == ["feat.clip", "rel.mae.b1", "rel.mae.b2"]
    assert [(t.shape, t.encoding) for t in defaults] == [((17, 32), "fp16"), ((4, 17, 17), "fp16"),
                                                        ((4, 17, 17), "fp16")]
    asked = plan_targets({"mae": mae, "clip": clip}, parse_targets(["mae:feat", "clip:feat", "mae:msa@0"]), 16,
                         parse_encodings(["int8", "feat.clip=fp16"]))
    assert [(t.name, t.encoding) for t in asked] == [("feat.clip", "fp16"), ("feat.mae", "int8"),
                                                     ("msa.mae.b0", "int8")]
    assert target_arrays(asked[1]) == {"feat.mae": ((17, 32), "int8"), "scale.feat.mae": ((17,), "float16")}
    with pytest.raises(HdistillError, match=r"--encoding rel: no such target"):
        plan_targets({"mae": mae, "clip": clip}, parse_targets(["clip:feat"]), 16, parse_encodings(["rel=int8"]))
    for bad, message in [("mae", "expected ROLE:KIND"), ("mae:rel", "rel needs blocks"), ("mae:att@3", "expected"),
                         ("mae:rel@x", "blocks must be integers")]:
        with pytest.raises(HdistillError, match=message):
            parse_targets([bad])
    with pytest.raises(HdistillError, match="--encoding .rel=int3.: expected"):
        parse_encodings(["rel=int3"])


def test_patch_grid_mismatch():
    p16, kw16, _ = TIMM_TINY["timm-p16"]
    p14, kw14, _ = TIMM_TINY["timm-p14-ls"]
    mae = build_teacher("mae", WeightSource("random"), 112, p16, kw16)    # 7x7 of 16px
    dino = build_teacher("dino", WeightSource("random"), 112, p14, kw14)  # 8x8 of 14px
    with pytest.raises(HdistillError, match="patch grid mismatch.*7x7 patches of 16px.*8x8 patches of 14px"):
        plan_mask({"mae": mae, "dino": dino})
    with pytest.raises(HdistillError, match="student cuts 112px views into 8x8"):
        check_same_grid({"teacher 'mae'": mae.info.grid, "student": TokenGrid(112, 14)})
    with pytest.raises(HdistillError, match="not a multiple of its patch size 16"):
        build_teacher("mae", WeightSource("random"), 100, p16, kw16)


def test_hub_weights_that_cannot_be_fetched_are_one_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")                      # as on a cluster without internet
    name, kwargs, size = TIMM_TINY["timm-p16"]
    with pytest.raises(HdistillError, match=r"teacher 'mae': cannot load hub weights of vit_base_patch16_224.mae into "
                                            r"model vit_base_patch16_224.mae \(\w+Error: .*\) \(the hub needs network "
                                            r"access: .* give --weights ROLE=PATH\)"):
        build_teacher("mae", WeightSource("hub"), size, "vit_base_patch16_224.mae", kwargs)


def test_hub_needs_a_tag_for_open_clip(open_clip_tiny):
    with pytest.raises(HdistillError, match="name the open_clip pretrained tag"):
        build_teacher("clip", WeightSource("hub"), 64, "open_clip:hdtest-vit-p16")

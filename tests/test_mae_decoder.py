"""The MAE family (G2SD's teacher): an official MAE pretraining checkpoint with its decoder, loaded strictly, against
a hand-written forward of the official layout (facebookresearch/mae models_mae.py) on a tiny model saved here."""
import numpy as np
import pytest
import torch

from reference import OfficialMae, mae_sincos
from hdistill.common.errors import HdistillError
from hdistill.precompute.teachers import MaeDecoderTeacher, build_teacher
from hdistill.precompute.weights import WeightSource

TINY = dict(patch_size=8, embed_dim=24, depth=2, num_heads=2, decoder_embed_dim=16, decoder_depth=3,
            decoder_num_heads=2)
MODEL = "mae:vit_base_patch16_dec512d8b"


@pytest.fixture
def checkpoint(tmp_path):
    torch.manual_seed(3)
    official = OfficialMae().eval()
    path = tmp_path / "mae_pretrain_tiny_full.pth"
    torch.save({"model": official.state_dict()}, path)          # the official files' layout: {"model": ...}
    return official, path


def build(path, **args):
    return build_teacher("mae", WeightSource("file", path=str(path)), 32, MODEL, {**TINY, **args})


def test_the_encoder_and_decoder_give_the_official_forward(checkpoint):
    official, path = checkpoint
    teacher = build(path)
    assert isinstance(teacher, MaeDecoderTeacher) and teacher.info.model == MODEL
    assert (teacher.info.decoder_width, teacher.info.decoder_depth) == (16, 3)
    images = torch.randn(2, 3, 32, 32)
    noise = torch.rand(2, 16)
    with torch.no_grad():
        latent, ids_restore, ids_keep = official.forward_encoder(images, noise, 0.75)
        states = teacher.decoder_states(images, ids_keep, [0, 2])
        assert sorted(states) == [0, 2]
        for block in (0, 2):
            expected = official.decoder_hidden(latent, ids_restore, block)
            torch.testing.assert_close(states[block], expected, rtol=1e-5, atol=1e-5)
        # the encoder alone, unmasked, is the teacher's final tokens (its feat target)
        whole, _, _ = official.forward_encoder(images, torch.arange(16.0).expand(2, 16), 0.0)
        torch.testing.assert_close(teacher.tokens(images), whole, rtol=1e-5, atol=1e-5)


def test_the_checkpoint_loads_strictly_naming_its_keys(checkpoint, tmp_path):
    official, _ = checkpoint
    state = official.state_dict()
    cases = [({k: v for k, v in state.items() if k != "decoder_pred.bias"}, "missing from the weights: decoder_pred.bias"),
             ({k: v for k, v in state.items() if k != "blocks.1.attn.qkv.weight"},
              r"missing from the weights: blocks.1: 1 tensors \(attn.qkv.weight\)"),
             ({**state, "decoder_extra": torch.zeros(1)}, "in the weights but not in the model: decoder_extra")]
    for i, (damaged, message) in enumerate(cases):
        path = tmp_path / f"damaged{i}.pth"
        torch.save({"model": damaged}, path)
        with pytest.raises(HdistillError, match=rf"teacher 'mae': model {MODEL} does not fit weight file .*{message}"):
            build(path)
    with pytest.raises(HdistillError, match="does not fit weight file"):                  # another decoder width
        build(tmp_path / "damaged0.pth", decoder_embed_dim=32)
    with pytest.raises(HdistillError, match=r"mae:vit_base_patch16_dec512d8b loads the official MAE checkpoints "
                                            r"from a file"):
        build_teacher("mae", WeightSource("hub"), 32, MODEL, TINY)
    with pytest.raises(HdistillError, match=r"unknown MAE model mae:vit_tiny; known: mae:vit_base_patch16_dec512d8b"):
        build_teacher("mae", WeightSource("random"), 32, "mae:vit_tiny", TINY)


def test_random_weights_are_maes_init_and_the_seeds():
    """--random-init (tests, dry runs): the decoder's position embeddings are MAE's sin-cos table and its mask token is
    drawn (N(0, 0.02)), both from the seed alone."""
    a, b = (build_teacher("mae", WeightSource("random"), 32, MODEL, TINY) for _ in range(2))
    np.testing.assert_allclose(a.mae.decoder_pos_embed[0].numpy(), mae_sincos(16, 4), rtol=0, atol=1e-6)
    assert 0.005 < a.mae.mask_token.std() < 0.05 and torch.equal(a.mae.mask_token, b.mae.mask_token)
    with pytest.raises(HdistillError, match=r"decoder_embed_dim=18: MAE's decoder width is a multiple of 4"):
        build_teacher("mae", WeightSource("random"), 32, MODEL, {**TINY, "decoder_embed_dim": 18})

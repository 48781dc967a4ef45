"""The MAE family (G2SD's teacher): an official MAE pretraining checkpoint with its decoder, loaded strictly, against
a hand-written forward of the official layout (facebookresearch/mae models_mae.py) on a tiny model saved here."""
import functools

import pytest
import torch
from timm.models.vision_transformer import Block, PatchEmbed
from torch import nn

from hdistill.common.errors import HdistillError
from hdistill.precompute.teachers import MaeDecoderTeacher, build_teacher
from hdistill.precompute.weights import WeightSource

TINY = dict(patch_size=8, embed_dim=24, depth=2, num_heads=2, decoder_embed_dim=16, decoder_depth=3,
            decoder_num_heads=2)
MODEL = "mae:vit_base_patch16_dec512d8b"


class OfficialMae(nn.Module):
    """models_mae.MaskedAutoencoderViT's parameters, under its names, at 32 px (16 patches)."""

    def __init__(self, p=8, d=24, depth=2, heads=2, dd=16, ddepth=3, dheads=2):
        super().__init__()
        norm = functools.partial(nn.LayerNorm, eps=1e-6)
        self.patch_embed = PatchEmbed(32, p, 3, d)
        self.cls_token = nn.Parameter(torch.randn(1, 1, d))
        self.pos_embed = nn.Parameter(torch.randn(1, 17, d), requires_grad=False)
        self.blocks = nn.ModuleList([Block(d, heads, 4.0, qkv_bias=True, norm_layer=norm) for _ in range(depth)])
        self.norm = norm(d)
        self.decoder_embed = nn.Linear(d, dd)
        self.mask_token = nn.Parameter(torch.randn(1, 1, dd))
        self.decoder_pos_embed = nn.Parameter(torch.randn(1, 17, dd), requires_grad=False)
        self.decoder_blocks = nn.ModuleList([Block(dd, dheads, 4.0, qkv_bias=True, norm_layer=norm)
                                             for _ in range(ddepth)])
        self.decoder_norm = norm(dd)
        self.decoder_pred = nn.Linear(dd, p * p * 3)
        for name, param in self.named_parameters():       # nothing at its init value: every tensor must be loaded
            if name.endswith(("norm1.weight", "norm2.weight", "norm.weight")):
                param.data.uniform_(0.5, 1.5)
            elif name.endswith(".bias"):
                param.data.normal_(0, 0.1)

    def forward_encoder(self, x, noise, mask_ratio):
        x = self.patch_embed(x) + self.pos_embed[:, 1:, :]
        N, L, D = x.shape
        len_keep = int(L * (1 - mask_ratio))
        ids_shuffle = torch.argsort(noise, dim=1)
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        ids_keep = ids_shuffle[:, :len_keep]
        x = torch.gather(x, dim=1, index=ids_keep.unsqueeze(-1).repeat(1, 1, D))
        cls_token = self.cls_token + self.pos_embed[:, :1, :]
        x = torch.cat((cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x), ids_restore, ids_keep

    def decoder_hidden(self, x, ids_restore, block):
        x = self.decoder_embed(x)
        mask_tokens = self.mask_token.repeat(x.shape[0], ids_restore.shape[1] + 1 - x.shape[1], 1)
        x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)
        x_ = torch.gather(x_, dim=1, index=ids_restore.unsqueeze(-1).repeat(1, 1, x.shape[2]))
        x = torch.cat([x[:, :1, :], x_], dim=1) + self.decoder_pos_embed
        for blk in self.decoder_blocks[:block + 1]:
            x = blk(x)
        return x


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
    assert (teacher.decoder_width, teacher.decoder_depth) == (16, 3)
    images = torch.randn(2, 3, 32, 32)
    noise = torch.rand(2, 16)
    with torch.no_grad():
        latent, ids_restore, ids_keep = official.forward_encoder(images, noise, 0.75)
        for block in (0, 2):
            expected = official.decoder_hidden(latent, ids_restore, block)
            torch.testing.assert_close(teacher.decoder_states(images, ids_keep, block), expected, rtol=1e-5,
                                       atol=1e-5)
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

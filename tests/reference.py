"""Independent references written for the tests: a ViT forward by hand (timm ViTs with CLS, registers or neither,
Eva with RoPE, open_clip towers), the mask rule as plain loops, MAE's model with its decoder (models_mae.py)."""
import functools
import math

import numpy as np
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Block, PatchEmbed
from torch import nn

from hdistill.precompute.teachers import OpenClipTeacher


def manual_attention(x, weight, bias, heads, q_norm, k_norm):
    """x [B, T, D] -> (softmax(q k^T / sqrt(d)) v with the heads concatenated [B, T, A], raw q k^T [B, H, T, T])."""
    B, T, D = x.shape
    qkv = x @ weight.T + (bias if bias is not None else 0)
    q, k, v = qkv.split(weight.shape[0] // 3, dim=-1)
    q, k, v = (t.reshape(B, T, heads, -1).transpose(1, 2) for t in (q, k, v))
    q, k = q_norm(q), k_norm(k)
    raw = torch.einsum("bhqd,bhkd->bhqk", q, k)
    attn = torch.softmax(raw / math.sqrt(q.shape[-1]), dim=-1)
    return (attn @ v).transpose(1, 2).reshape(B, T, -1), raw


def rotate_pairs(x, rope):
    """RoPE by hand, interleaved pairs (x0, x1) -> (x0 cos - x1 sin, x1 cos + x0 sin); rope [N, 2d] = (sin, cos)."""
    sin, cos = rope.tensor_split(2, -1)
    turned = torch.stack([-x[..., 1::2], x[..., ::2]], -1).reshape(x.shape)
    return x * cos + turned * sin


def eva_attention(a, x, rope):
    """timm EvaAttention by hand -> (softmax attention output before the norm and projection, raw q k^T)."""
    B, T, _ = x.shape
    if a.qkv is not None:
        d = a.qkv.weight.shape[0] // 3
        bias = torch.cat([a.q_bias, torch.zeros(d), a.v_bias])               # EVA has no k bias
        q, k, v = (x @ a.qkv.weight.T + bias).split(d, dim=-1)
    else:
        q, k, v = x @ a.q_proj.weight.T + a.q_proj.bias, x @ a.k_proj.weight.T, x @ a.v_proj.weight.T + a.v_proj.bias
    q, k, v = (t.reshape(B, T, a.num_heads, -1).transpose(1, 2) for t in (q, k, v))
    q, k = a.q_norm(q), a.k_norm(k)
    assert not a.rotate_half
    p = a.num_prefix_tokens
    q = torch.cat([q[:, :, :p], rotate_pairs(q[:, :, p:], rope)], 2)
    k = torch.cat([k[:, :, :p], rotate_pairs(k[:, :, p:], rope)], 2)
    raw = torch.einsum("bhqd,bhkd->bhqk", q, k)
    attn = torch.softmax(raw / math.sqrt(q.shape[-1]), dim=-1)
    return (attn @ v).transpose(1, 2).reshape(B, T, -1), raw


def stored(teacher, values, pairs=False):
    """A teacher's tensor over its own tokens -> over the stored ones: register tokens dropped (CLS kept)."""
    layout = teacher.info.layout
    keep = list(range(layout.stored_prefix)) + list(range(layout.prefix, values.shape[-2 if not pairs else -1]))
    values = values[..., keep, :] if not pairs else values[..., keep, :][..., keep]
    return values


def reference_embed(teacher, pixels):
    """uint8 views [B, S, S, 3] -> the tokens entering block 0 [B, prefix+N, D], by hand."""
    m = teacher.model
    x = (pixels.permute(0, 3, 1, 2).float() / 255 - torch.tensor(teacher.info.mean).view(1, 3, 1, 1)) \
        / torch.tensor(teacher.info.std).view(1, 3, 1, 1)
    if isinstance(teacher, OpenClipTeacher):
        p = F.conv2d(x, m.conv1.weight, stride=teacher.info.patch_size).flatten(2).transpose(1, 2)
        cls = m.class_embedding.view(1, 1, -1).expand(p.shape[0], -1, -1)
        return m.ln_pre(torch.cat([cls, p], 1) + m.positional_embedding)
    w = m.patch_embed.proj
    p = F.conv2d(x, w.weight, w.bias, stride=teacher.info.patch_size).flatten(2).transpose(1, 2)
    prefix = [t.expand(p.shape[0], -1, -1) for t in (m.cls_token, getattr(m, "reg_token", None)) if t is not None]
    if m.no_embed_class:                       # DINOv2 with registers: positions on the patches only
        return m.norm_pre(torch.cat(prefix + [p + m.pos_embed], 1))
    return m.norm_pre(torch.cat(prefix + [p], 1) + m.pos_embed)


def reference_block(teacher, i, x):
    """Block i by hand on tokens [B, T, D] -> (output, raw q k^T, MSA before the output projection)."""
    if isinstance(teacher, OpenClipTeacher):
        blk = teacher.model.transformer.resblocks[i]
        msa, raw = manual_attention(blk.ln_1(x), blk.attn.in_proj_weight, blk.attn.in_proj_bias, blk.attn.num_heads,
                                    torch.nn.Identity(), torch.nn.Identity())
        x = x + blk.ls_1(blk.attn.out_proj(msa))
        return x + blk.ls_2(blk.mlp(blk.ln_2(x))), raw, msa
    blk = teacher.model.blocks[i]
    a = blk.attn
    if hasattr(teacher.model, "rope"):         # Eva
        msa, raw = eva_attention(a, blk.norm1(x), teacher.model.rope.get_embed())
        gamma1, gamma2 = (g if g is not None else 1.0 for g in (blk.gamma_1, blk.gamma_2))
        x = x + gamma1 * a.proj(a.norm(msa))
        return x + gamma2 * blk.mlp(blk.norm2(x)), raw, msa
    msa, raw = manual_attention(blk.norm1(x), a.qkv.weight, a.qkv.bias, a.num_heads, a.q_norm, a.k_norm)
    x = x + blk.ls1(a.proj(a.norm(msa)))
    return x + blk.ls2(blk.mlp(blk.norm2(x))), raw, msa


def reference_forward(teacher, pixels):
    """(final tokens, {block: raw QK^T}, {block: block output}, {block: MSA}) computed by hand, over the stored
    tokens (CLS if the teacher has one, the patches; registers dropped).

    MSA is softmax(Q K^T / sqrt(d)) V with the heads concatenated, before the output projection (Eq. 2).
    """
    relations, outputs, msa = {}, {}, {}
    with torch.no_grad():
        x = reference_embed(teacher, pixels)
        depth = teacher.info.depth
        for i in range(depth):
            x, raw, attended = reference_block(teacher, i, x)
            relations[i], outputs[i], msa[i] = stored(teacher, raw, pairs=True), stored(teacher, x), \
                stored(teacher, attended)
        final = teacher.model.ln_post(x) if isinstance(teacher, OpenClipTeacher) else teacher.model.norm(x)
        return stored(teacher, final), relations, outputs, msa


def _rank(patches, kept, drop, normalized):
    """Plain loops: patches [len(kept), D] of the kept patch indices -> (dropped, kept) patch index lists."""
    patches = np.asarray(patches, dtype=np.float64)
    rows = range(len(kept))
    if normalized:
        mean = sum(patches[r] / np.linalg.norm(patches[r]) for r in rows) / len(kept)
    else:
        mean = sum(patches[r] for r in rows) / len(kept)
    sims = sorted((-float(np.dot(patches[r], mean) / (np.linalg.norm(patches[r]) * np.linalg.norm(mean))), kept[r])
                  for r in rows)
    return [p for _, p in sims[:drop]], sorted(p for _, p in sims[drop:])


def loop_mask(block_outputs, ratio_tenths, normalized=False, drops=None, prefix=1):
    """Plain-loop reference of the progressive mask for one view over a forward on all tokens.

    block_outputs: list of [prefix+N, D] arrays (prefix: the CLS token, or none); drops floor(ratio * kept) per stage, ratio = tenths/10, unless
    `drops` lists each stage's count. normalized: the average token is the mean of the kept tokens divided
    by their norms.
    """
    n = block_outputs[0].shape[0] - prefix
    kept = list(range(n))
    stage = [0] * n
    for s, tokens in enumerate(block_outputs, start=1):
        drop = len(kept) * ratio_tenths // 10 if drops is None else drops[s - 1]
        dropped, kept = _rank(np.asarray(tokens)[prefix:][kept], kept, drop, normalized)
        for p in dropped:
            stage[p] = s
    return np.array(stage, dtype=np.uint8), np.array(kept)


def loop_dropping_mask(teacher, pixels, blocks, ratio_tenths, normalized):
    """PCAE's forward, one view at a time: after each stage only CLS and the kept patches go on through
    the blocks (written by hand). -> (stage [N], kept patch indices) per view."""
    out = []
    with torch.no_grad():
        for v in range(pixels.shape[0]):
            x = reference_embed(teacher, pixels[v:v + 1])
            n = x.shape[1] - 1
            kept, stage, first = list(range(n)), [0] * n, 0
            for s, last in enumerate(blocks, start=1):
                for i in range(first, last + 1):
                    x = reference_block(teacher, i, x)[0]
                first = last + 1
                dropped, new_kept = _rank(x[0, 1:].numpy(), kept, len(kept) * ratio_tenths // 10, normalized)
                for p in dropped:
                    stage[p] = s
                rows = [0] + [1 + kept.index(p) for p in new_kept]
                x, kept = x[:, rows], new_kept
            out.append((np.array(stage, dtype=np.uint8), np.array(kept)))
    return out


class OfficialMae(nn.Module):
    """models_mae.MaskedAutoencoderViT's parameters, under its names (16 patches at the default 32 px), and its
    forward_encoder and forward_decoder (to a decoder block's output, before decoder_norm) as written there."""

    def __init__(self, size=32, p=8, d=24, depth=2, heads=2, dd=16, ddepth=3, dheads=2):
        super().__init__()
        norm = functools.partial(nn.LayerNorm, eps=1e-6)
        tokens = 1 + (size // p) ** 2
        self.patch_embed = PatchEmbed(size, p, 3, d)
        self.cls_token = nn.Parameter(torch.randn(1, 1, d))
        self.pos_embed = nn.Parameter(torch.randn(1, tokens, d), requires_grad=False)
        self.blocks = nn.ModuleList([Block(d, heads, 4.0, qkv_bias=True, norm_layer=norm) for _ in range(depth)])
        self.norm = norm(d)
        self.decoder_embed = nn.Linear(d, dd)
        self.mask_token = nn.Parameter(torch.randn(1, 1, dd))
        self.decoder_pos_embed = nn.Parameter(torch.randn(1, tokens, dd), requires_grad=False)
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


def mae_sincos(width: int, grid: int) -> np.ndarray:
    """MAE's util/pos_embed.get_2d_sincos_pos_embed(width, grid, cls_token=True), as written there."""
    def one_d(dim, pos):
        omega = np.arange(dim // 2, dtype=np.float64) / (dim / 2.0)
        out = np.einsum("m,d->md", pos.reshape(-1), 1.0 / 10000 ** omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)
    g = np.stack(np.meshgrid(np.arange(grid, dtype=np.float32), np.arange(grid, dtype=np.float32)), axis=0)
    g = g.reshape([2, 1, grid, grid])
    emb = np.concatenate([one_d(width // 2, g[0]), one_d(width // 2, g[1])], axis=1)
    return np.concatenate([np.zeros([1, width]), emb], axis=0)

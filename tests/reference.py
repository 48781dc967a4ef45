"""Independent references written for the tests: a ViT forward by hand, the mask rule as plain loops."""
import math

import numpy as np
import torch
import torch.nn.functional as F

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


def reference_embed(teacher, pixels):
    """uint8 views [B, S, S, 3] -> the tokens entering block 0 [B, 1+N, D], by hand."""
    m = teacher.model
    x = (pixels.permute(0, 3, 1, 2).float() / 255 - torch.tensor(teacher.info.mean).view(1, 3, 1, 1)) \
        / torch.tensor(teacher.info.std).view(1, 3, 1, 1)
    if isinstance(teacher, OpenClipTeacher):
        p = F.conv2d(x, m.conv1.weight, stride=teacher.info.patch_size).flatten(2).transpose(1, 2)
        cls = m.class_embedding.view(1, 1, -1).expand(p.shape[0], -1, -1)
        return m.ln_pre(torch.cat([cls, p], 1) + m.positional_embedding)
    w = m.patch_embed.proj
    p = F.conv2d(x, w.weight, w.bias, stride=teacher.info.patch_size).flatten(2).transpose(1, 2)
    return m.norm_pre(torch.cat([m.cls_token.expand(p.shape[0], -1, -1), p], 1) + m.pos_embed)


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
    msa, raw = manual_attention(blk.norm1(x), a.qkv.weight, a.qkv.bias, a.num_heads, a.q_norm, a.k_norm)
    x = x + blk.ls1(a.proj(a.norm(msa)))
    return x + blk.ls2(blk.mlp(blk.norm2(x))), raw, msa


def reference_forward(teacher, pixels):
    """(final tokens, {block: raw QK^T}, {block: block output}, {block: MSA}) computed by hand.

    MSA is softmax(Q K^T / sqrt(d)) V with the heads concatenated, before the output projection (Eq. 2).
    """
    relations, outputs, msa = {}, {}, {}
    with torch.no_grad():
        x = reference_embed(teacher, pixels)
        depth = teacher.info.depth
        for i in range(depth):
            x, relations[i], msa[i] = reference_block(teacher, i, x)
            outputs[i] = x
        final = teacher.model.ln_post(x) if isinstance(teacher, OpenClipTeacher) else teacher.model.norm(x)
        return final, relations, outputs, msa


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


def loop_mask(block_outputs, ratio_tenths, normalized=False, drops=None):
    """Plain-loop reference of the progressive mask for one view over a forward on all tokens.

    block_outputs: list of [1+N, D] arrays; drops floor(ratio * kept) per stage, ratio = tenths/10, unless
    `drops` lists each stage's count. normalized: the average token is the mean of the kept tokens divided
    by their norms.
    """
    n = block_outputs[0].shape[0] - 1
    kept = list(range(n))
    stage = [0] * n
    for s, tokens in enumerate(block_outputs, start=1):
        drop = len(kept) * ratio_tenths // 10 if drops is None else drops[s - 1]
        dropped, kept = _rank(np.asarray(tokens)[1:][kept], kept, drop, normalized)
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

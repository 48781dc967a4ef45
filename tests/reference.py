"""Independent references written for the tests: a ViT forward by hand, the mask rule as plain loops."""
import math

import numpy as np
import torch
import torch.nn.functional as F

from hdistill.precompute.teachers import OpenClipTeacher


def manual_attention(x, weight, bias, heads, q_norm, k_norm, proj):
    """x [B, T, D] -> (attention output [B, T, D], raw q k^T [B, H, T, T])."""
    B, T, D = x.shape
    qkv = x @ weight.T + (bias if bias is not None else 0)
    q, k, v = qkv.split(weight.shape[0] // 3, dim=-1)
    q, k, v = (t.reshape(B, T, heads, -1).transpose(1, 2) for t in (q, k, v))
    q, k = q_norm(q), k_norm(k)
    raw = torch.einsum("bhqd,bhkd->bhqk", q, k)
    attn = torch.softmax(raw / math.sqrt(q.shape[-1]), dim=-1)
    out = (attn @ v).transpose(1, 2).reshape(B, T, -1)
    return proj(out), raw


def reference_forward(teacher, pixels):
    """(final tokens, {block: raw QK^T}, {block: block output}, {block: attention output}) computed by hand.

    The attention output is the sub-layer's output after its output projection, before LayerScale
    and the residual add.
    """
    m = teacher.model
    x = (pixels.permute(0, 3, 1, 2).float() / 255 - torch.tensor(teacher.info.mean).view(1, 3, 1, 1)) \
        / torch.tensor(teacher.info.std).view(1, 3, 1, 1)
    relations, outputs, msa = {}, {}, {}
    with torch.no_grad():
        if isinstance(teacher, OpenClipTeacher):
            p = F.conv2d(x, m.conv1.weight, stride=teacher.info.patch_size).flatten(2).transpose(1, 2)
            cls = m.class_embedding.view(1, 1, -1).expand(p.shape[0], -1, -1)
            x = m.ln_pre(torch.cat([cls, p], 1) + m.positional_embedding)
            for i, blk in enumerate(m.transformer.resblocks):
                msa[i], relations[i] = manual_attention(blk.ln_1(x), blk.attn.in_proj_weight, blk.attn.in_proj_bias,
                                                        blk.attn.num_heads, torch.nn.Identity(), torch.nn.Identity(),
                                                        blk.attn.out_proj)
                x = x + blk.ls_1(msa[i])
                x = x + blk.ls_2(blk.mlp(blk.ln_2(x)))
                outputs[i] = x
            return m.ln_post(x), relations, outputs, msa
        w = m.patch_embed.proj
        p = F.conv2d(x, w.weight, w.bias, stride=teacher.info.patch_size).flatten(2).transpose(1, 2)
        x = torch.cat([m.cls_token.expand(p.shape[0], -1, -1), p], 1) + m.pos_embed
        x = m.norm_pre(x)
        for i, blk in enumerate(m.blocks):
            a = blk.attn
            msa[i], relations[i] = manual_attention(blk.norm1(x), a.qkv.weight, a.qkv.bias, a.num_heads,
                                                    a.q_norm, a.k_norm, a.proj)
            x = x + blk.ls1(msa[i])
            x = x + blk.ls2(blk.mlp(blk.norm2(x)))
            outputs[i] = x
        return m.norm(x), relations, outputs, msa


def loop_mask(block_outputs, ratio_tenths, normalized=False):
    """Plain-loop reference of the progressive mask for one view.

    block_outputs: list of [1+N, D] arrays; drops floor(ratio * kept) per stage, ratio = tenths/10.
    normalized: the average token is the mean of the kept tokens divided by their norms.
    """
    n = block_outputs[0].shape[0] - 1
    kept = list(range(n))
    stage = [0] * n
    for s, tokens in enumerate(block_outputs, start=1):
        patches = np.asarray(tokens, dtype=np.float64)[1:]
        if normalized:
            mean = sum(patches[p] / np.linalg.norm(patches[p]) for p in kept) / len(kept)
        else:
            mean = sum(patches[p] for p in kept) / len(kept)
        sims = []
        for p in kept:
            cos = float(np.dot(patches[p], mean) / (np.linalg.norm(patches[p]) * np.linalg.norm(mean)))
            sims.append((-cos, p))
        n_drop = len(kept) * ratio_tenths // 10
        for _, p in sorted(sims)[:n_drop]:
            stage[p] = s
        kept = sorted(p for _, p in sorted(sims)[n_drop:])
    return np.array(stage, dtype=np.uint8), np.array(kept)

"""How a target's float32 values become stored arrays, and back (common.targets.ENCODINGS).

    fp16  float16                                                       lossless w.r.t. float16
    int8  q = round(x / s) in [-127, 127], s = float16(max|row| / 127) per row of the last axis,
          stored as <name> (int8) and scale.<name> (float16, the shape without the last axis);
          decoded x' = q * s                          error per value <= s / 2 = max|row| / 254
    bf16  float16 with the mantissa rounded to 7 bits (round half to even, numcodecs BitRound);
          applied by the zarr writer as a filter, so the stored and decoded arrays are float16

Encoding runs on the teachers' device, batched; decoding is numpy per sample (`decode`), or torch per batch
on the training device (`decode_batch`: int8 crosses the bus as int8).
"""
from __future__ import annotations

import numpy as np
import torch

from hdistill.common.errors import HdistillError
from hdistill.common.targets import TargetSpec

BF16_KEEPBITS = 7


def encode(spec: TargetSpec, values: torch.Tensor, who) -> dict[str, torch.Tensor]:
    """float32 [B, *spec.shape] -> {array name: tensor [B, ...]}; `who(rows)` names the samples of bad rows."""
    if spec.encoding == "int8":
        scale = (values.abs().amax(-1) / 127).half()                          # [B, ...] per row
        safe = torch.where(scale > 0, scale.float(), torch.ones_like(scale, dtype=torch.float32))
        q = torch.round(values / safe[..., None]).clamp_(-127, 127).to(torch.int8)
        _check_finite(spec, scale, who)
        return {spec.name: q, f"scale.{spec.name}": scale}
    stored = values.half()
    _check_finite(spec, stored, who)
    return {spec.name: stored}


def decode(spec: TargetSpec, arrays: dict[str, np.ndarray]) -> np.ndarray:
    """One sample's stored arrays -> the target's values (float16, or float32 for int8)."""
    if spec.encoding == "int8":
        return arrays[spec.name].astype(np.float32) * arrays[f"scale.{spec.name}"][..., None].astype(np.float32)
    return arrays[spec.name]


def _check_finite(spec: TargetSpec, stored: torch.Tensor, who):
    bad = ~torch.isfinite(stored.flatten(1)).all(1)
    if bad.any():
        raise HdistillError(f"non-finite {spec.name} in float16 for {who(torch.nonzero(bad).flatten().tolist())}: "
                            "the teacher's values overflow float16 or are NaN; check the teacher weights")


def decode_batch(targets: dict[str, torch.Tensor], scales: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A batch's stored targets -> values, on the tensors' device: an int8 target (one with a scale) times its
    float16 row scale, in float32; the others as they are."""
    return {name: t.float() * scales[name].float()[..., None] if name in scales else t for name, t in targets.items()}

"""How a target's float32 values become stored arrays, and back: one class per encoding, one row of ENCODINGS.

    fp16  float16                                                       lossless w.r.t. float16
    int8  q = round(x / s) in [-127, 127], s = float16(max|row| / 127) per row of the last axis,
          stored as <name> (int8) and scale.<name> (float16, the shape without the last axis);
          decoded x' = q * s                          error per value <= s / 2 = max|row| / 254
    bf16  float16 with the mantissa rounded to 7 bits (round half to even, numcodecs BitRound);
          applied by the zarr writer as a filter, so the stored and decoded arrays are float16
    int4  the last axis cut into blocks of 32 values (the last block shorter), s = float16(max|block| / 7) per block,
          q = round(x / s) in [-7, 7] stored as q + 8, two per byte (even index in the low nibble; the last axis
          padded to even with q = 0): <name> (uint8, last axis ceil(D / 2)) and scale.<name> (float16, last axis
          ceil(D / 32));                             error per value <= s / 2 = max|block| / 14

An encoding declares its stored dtype, its companion arrays, the store formats it can be written in and any
zarr filter. Encoding runs on the teachers' device, batched; decoding is numpy per sample (`decode`), or torch
per batch on the training device (`decode_batch`: int8 crosses the bus as int8). A new encoding is one class
here and one row of ENCODINGS.
"""
from __future__ import annotations

import numpy as np
import torch

from hdistill.common.errors import HdistillError
from hdistill.common.targets import TargetSpec


class Encoding:
    """float16, as computed: the default, and the base of the others."""

    name = "fp16"
    help = "float16 (the default; the targets are computed in float32)"
    dtype = "float16"
    formats: tuple[str, ...] | None = None      # the store formats it can be written in; None: all
    by_token = True                             # the stored arrays can be cut by token (a --tokens full store's loader
                                                # takes the rows and columns of the patches it chooses); if not, that
                                                # loader decodes the target first

    def arrays(self, spec: TargetSpec) -> dict[str, tuple[tuple[int, ...], str]]:
        """Stored array name -> (per-sample shape, dtype): the target, then any companion array."""
        return {spec.name: (spec.shape, self.dtype)}

    def encode(self, spec: TargetSpec, values: torch.Tensor, who) -> dict[str, torch.Tensor]:
        """float32 [B, *spec.shape] -> {array name: tensor [B, ...]}; `who(rows)` names the samples of bad rows."""
        stored = values.half()
        _check_finite(spec, stored, who)
        return {spec.name: stored}

    def decode(self, spec: TargetSpec, arrays: dict[str, np.ndarray]) -> np.ndarray:
        """One sample's stored arrays -> the target's values."""
        return arrays[spec.name]

    def decode_batch(self, spec: TargetSpec, arrays: dict[str, torch.Tensor]) -> torch.Tensor:
        """A batch's stored arrays -> the target's values, on the arrays' device."""
        return arrays[spec.name]

    def zarr_filters(self) -> list:
        return []


class Int8(Encoding):
    name = "int8"
    help = "symmetric int8 per row (the last axis) with a float16 scale per row in scale.<name>"
    dtype = "int8"

    def arrays(self, spec):
        return {spec.name: (spec.shape, self.dtype), scale_name(spec): (spec.shape[:-1], "float16")}

    def encode(self, spec, values, who):
        scale = (values.abs().amax(-1) / 127).half()                          # [B, ...] per row
        safe = torch.where(scale > 0, scale.float(), torch.ones_like(scale, dtype=torch.float32))
        q = torch.round(values / safe[..., None]).clamp_(-127, 127).to(torch.int8)
        _check_finite(spec, scale, who)
        return {spec.name: q, scale_name(spec): scale}

    def decode(self, spec, arrays):
        """float32: q times its row's scale."""
        return arrays[spec.name].astype(np.float32) * arrays[scale_name(spec)][..., None].astype(np.float32)

    def decode_batch(self, spec, arrays):
        return arrays[spec.name].float() * arrays[scale_name(spec)].float()[..., None]


class Int4(Encoding):
    name = "int4"
    help = ("symmetric 4-bit, two values per byte, a float16 scale per block of 32 values of the last axis in "
            "scale.<name>: a quarter of fp16's bytes")
    dtype = "uint8"
    by_token = False                 # a pair target's columns are packed two per byte and scaled in blocks
    block = 32
    levels = 7                       # q in [-7, 7], stored as q + 8 in a nibble

    def blocks(self, spec: TargetSpec) -> int:
        return -(-spec.shape[-1] // self.block)

    def arrays(self, spec):
        *rows, width = spec.shape
        return {spec.name: ((*rows, -(-width // 2)), self.dtype), scale_name(spec): ((*rows, self.blocks(spec)),
                                                                                      "float16")}

    def encode(self, spec, values, who):
        width, nb = spec.shape[-1], self.blocks(spec)
        padded = torch.nn.functional.pad(values.float(), (0, nb * self.block - width))
        blocks = padded.unflatten(-1, (nb, self.block))                        # [B, ..., nb, block]
        scale = (blocks.abs().amax(-1) / self.levels).half()                   # [B, ..., nb]
        _check_finite(spec, scale, who)
        safe = torch.where(scale > 0, scale.float(), torch.ones_like(scale, dtype=torch.float32))
        q = torch.round(blocks / safe[..., None]).clamp_(-self.levels, self.levels).flatten(-2)[..., :width]
        q = torch.nn.functional.pad(q, (0, width % 2)).to(torch.int16) + 8                    # [B, ..., 2 ceil(w/2)]
        packed = (q[..., 0::2] | (q[..., 1::2] << 4)).to(torch.uint8)          # [B, ..., ceil(width / 2)]
        return {spec.name: packed, scale_name(spec): scale}

    def decode(self, spec, arrays):
        """float32: each nibble minus 8, times its block's scale."""
        packed = arrays[spec.name]
        q = np.stack([packed & 15, packed >> 4], -1).reshape(*packed.shape[:-1], -1)[..., :spec.shape[-1]]
        scale = np.repeat(arrays[scale_name(spec)].astype(np.float32), self.block, -1)[..., :spec.shape[-1]]
        return (q.astype(np.float32) - 8) * scale

    def decode_batch(self, spec, arrays):
        packed = arrays[spec.name]
        q = torch.stack([packed & 15, packed >> 4], -1).flatten(-2)[..., :spec.shape[-1]]
        scale = arrays[scale_name(spec)].float().repeat_interleave(self.block, -1)[..., :spec.shape[-1]]
        return (q.float() - 8) * scale


class BitRoundedFloat16(Encoding):
    name = "bf16"
    help = ("float16 with the mantissa rounded to bfloat16's 7 bits (numcodecs BitRound), zarr only: it saves bytes "
            "through zarr's compressor")
    formats = ("zarr",)
    keepbits = 7

    def zarr_filters(self):
        from zarr.codecs.numcodecs import BitRound
        return [BitRound(keepbits=self.keepbits)]


ENCODINGS: dict[str, Encoding] = {e.name: e for e in [Encoding(), Int8(), Int4(), BitRoundedFloat16()]}


def encoding_of(spec: TargetSpec) -> Encoding:
    return ENCODINGS[spec.encoding]


def scale_name(spec: TargetSpec) -> str:
    return f"scale.{spec.name}"


def target_arrays(spec: TargetSpec) -> dict[str, tuple[tuple[int, ...], str]]:
    """A target's stored arrays -> (per-sample shape, dtype), as its encoding stores them."""
    return encoding_of(spec).arrays(spec)


def encode(spec: TargetSpec, values: torch.Tensor, who) -> dict[str, torch.Tensor]:
    return encoding_of(spec).encode(spec, values, who)


def decode(spec: TargetSpec, arrays: dict[str, np.ndarray]) -> np.ndarray:
    return encoding_of(spec).decode(spec, arrays)


def decode_batch(specs: list[TargetSpec], arrays: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A batch's stored arrays (targets and companions) -> {target name: values}, on the arrays' device."""
    return {spec.name: encoding_of(spec).decode_batch(spec, arrays) for spec in specs}


def parse_encodings(values) -> dict[str, str]:
    """`--encoding [KEY=]ENC` values -> {key: encoding}; KEY is a kind or a target name, none means all."""
    out = {}
    for value in values:
        key, sep, enc = value.rpartition("=")
        key = key if sep else "*"
        if enc not in ENCODINGS or (sep and not key):
            raise HdistillError(f"--encoding {value!r}: expected [KIND|TARGET=]ENCODING with ENCODING one of "
                                f"{', '.join(ENCODINGS)}, e.g. rel=int8 or rel.mae.b9=int8")
        out[key] = enc
    return out


def check_formats(encodings: dict[str, str], formats: list[str]):
    """Refuse an encoding (`parse_encodings`' answer) in a store format it cannot be written in."""
    for name in sorted(set(encodings.values())):
        enc = ENCODINGS[name]
        wrong = [f for f in formats if enc.formats is not None and f not in enc.formats]
        if wrong:
            raise HdistillError(f"--encoding {name} cannot be written in --format {','.join(wrong)}: it is for "
                                f"{', '.join(enc.formats)} only ({enc.help})")


def _check_finite(spec: TargetSpec, stored: torch.Tensor, who):
    bad = ~torch.isfinite(stored.flatten(1)).all(1)
    if bad.any():
        raise HdistillError(f"non-finite {spec.name} in float16 for {who(torch.nonzero(bad).flatten().tolist())}: "
                            "the teacher's values overflow float16 or are NaN; check the teacher weights")

"""The target table: every stored teacher target is a TargetSpec, one row of the manifest.

A target is (kind, teacher role, block) with a stable name:

    kind  block  name               what                                                  shape
    feat  -      feat.<role>        last block's tokens after the final norm              [1+n, D]
    feat  B      feat.<role>.b<B>   residual stream after 0-indexed block B (no norm)     [1+n, D]
    rel   B      rel.<role>.b<B>    raw per-head Q K^T at block B (no scale, no softmax)  [H, 1+n, 1+n]
    msa   B      msa.<role>.b<B>    block B's attention output after its out-projection,  [1+n, D]
                                    before LayerScale and the residual add

n is the number of stored patches. The name is the webdataset entry (`<name>.npy`) and the zarr
array (`targets.zarr/<name>`). How a target's values are stored is its encoding (ENCODINGS); an
encoding may add a companion array (`scale.<name>` for int8).
"""
from __future__ import annotations

from dataclasses import dataclass

from .errors import HdistillError

KINDS = {
    "feat": "the last block's tokens after the final norm, or with @B the residual stream after block B",
    "rel": "raw per-head Q K^T at block B",
    "msa": "block B's attention sub-layer output (after its output projection, before LayerScale and the residual)",
}

ENCODINGS = {
    "fp16": "float16 (the default; the targets are computed in float32)",
    "int8": "symmetric int8 per row (the last axis) with a float16 scale per row in scale.<name>",
    "bf16": "float16 with the mantissa rounded to bfloat16's 7 bits (numcodecs BitRound), zarr only: "
            "it saves bytes through zarr's compressor",
}


@dataclass(frozen=True)
class TargetSpec:
    """One stored target: what it is, its per-sample shape over the stored tokens, how it is encoded."""

    kind: str
    role: str
    block: int | None = None            # None: the final features (kind "feat" only)
    shape: tuple[int, ...] = ()
    encoding: str = "fp16"

    def __post_init__(self):
        if self.kind not in KINDS:
            raise HdistillError(f"unknown target kind {self.kind!r}; known kinds: {', '.join(KINDS)}")
        if self.block is None and self.kind != "feat":
            raise HdistillError(f"target kind {self.kind!r} needs a block: {self.role}:{self.kind}@B")
        if self.encoding not in ENCODINGS:
            raise HdistillError(f"unknown encoding {self.encoding!r} for {self.name}; known: {', '.join(ENCODINGS)}")

    @property
    def name(self) -> str:
        return f"{self.kind}.{self.role}" + ("" if self.block is None else f".b{self.block}")

    @property
    def tap(self) -> str:
        """The CLI form: ROLE:KIND[@B]."""
        return f"{self.role}:{self.kind}" + ("" if self.block is None else f"@{self.block}")

    @property
    def dtype(self) -> str:
        return "int8" if self.encoding == "int8" else "float16"

    def arrays(self) -> dict[str, tuple[tuple[int, ...], str]]:
        """Stored array name -> (per-sample shape, dtype): the target, then any companion array."""
        out = {self.name: (self.shape, self.dtype)}
        if self.encoding == "int8":
            out[f"scale.{self.name}"] = (self.shape[:-1], "float16")
        return out

    def to_dict(self) -> dict:
        return {"name": self.name, "kind": self.kind, "role": self.role, "block": self.block,
                "shape": list(self.shape), "dtype": self.dtype, "encoding": self.encoding}

    @classmethod
    def from_dict(cls, d: dict) -> "TargetSpec":
        return cls(kind=d["kind"], role=d["role"], block=d["block"], shape=tuple(d["shape"]),
                   encoding=d["encoding"])


@dataclass(frozen=True)
class TargetRequest:
    """A target as the user names it, before the teacher's depth resolves negative blocks."""

    role: str
    kind: str
    block: int | None = None


def parse_targets(values) -> list[TargetRequest]:
    """`--target ROLE:KIND[@B[,B...]]` values -> requests, one per block."""
    out = []
    for value in values:
        role, sep, rest = value.partition(":")
        kind, at, blocks = rest.partition("@")
        if not sep or not role or kind not in KINDS or (at and not blocks):
            raise HdistillError(f"--target {value!r}: expected ROLE:KIND[@B[,B...]] with KIND one of "
                                f"{', '.join(KINDS)}, e.g. clip:feat, mae:rel@9,10, mae:feat@8")
        if not at:
            if kind != "feat":
                raise HdistillError(f"--target {value!r}: {kind} needs blocks, e.g. {role}:{kind}@9,10")
            out.append(TargetRequest(role, kind))
            continue
        try:
            out += [TargetRequest(role, kind, int(b)) for b in blocks.split(",")]
        except ValueError:
            raise HdistillError(f"--target {value!r}: blocks must be integers, e.g. {role}:{kind}@-3,-2") from None
    return out


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


def encoding_for(spec: TargetSpec, encodings: dict[str, str]) -> str:
    """The most specific of: the target's name, its kind, every target ('*'), else fp16."""
    for key in (spec.name, spec.kind, "*"):
        if key in encodings:
            return encodings[key]
    return "fp16"

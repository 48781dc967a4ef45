"""The target table: every stored teacher target is a TargetSpec, one row of the manifest.

A target is (kind, teacher role, block) with a stable name:

    kind  block  name               what                                                  shape
    feat  -      feat.<role>        last block's tokens after the final norm              [1+n, D]
    feat  B      feat.<role>.b<B>   residual stream after 0-indexed block B (no norm)     [1+n, D]
    rel   B      rel.<role>.b<B>    raw per-head Q K^T at block B (no scale, no softmax)  [H, 1+n, 1+n]
    msa   B      msa.<role>.b<B>    block B's softmax(Q K^T / sqrt(d)) V, heads           [1+n, D]
                                    concatenated, before the output projection
    dec   B      dec.<role>.b<B>    the teacher's decoder's hidden state after 0-indexed  [1+N, W]
                                    decoder block B (before its norm), the encoder having
                                    seen the sample's `visible` patches only (G2SD)

n is the number of stored patches, N every patch, W a decoder's width; each kind is a row of KINDS, which says how its arrays run over
tokens. The name is the webdataset entry (`<name>.npy`) and the zarr array (`targets.zarr/<name>`). How
a target's values are stored is its encoding (shards.encoding.ENCODINGS, which the manifest records); an
encoding may add a companion array (`scale.<name>` for int8).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import HdistillError
from .tokens import gather_along


@dataclass(frozen=True)
class Kind:
    """A target kind: what it holds, whether it is taken at a block, and its layout over the tokens.

    Row-shaped kinds hold a row per token, [T, D] (D the teacher's width); pair-shaped kinds hold a T x T map
    per head, [H, T, T]. The token axes of a per-sample array follow from that: a row target's rows, a pair
    target's rows and columns, and for a companion array with one axis less (the int8 scale, [T] or [H, T])
    its rows. Everything that selects, stores, reads or checks a target goes through these methods.
    """

    name: str
    help: str
    needs_block: bool          # False: the final features without @B, a block's with it
    pairs: bool
    decoded: bool = False      # taken in the teacher's decoder (its blocks and width), every token; the student's
                               # term is at its own decoder's output

    def depth(self, info) -> int:
        """How many blocks a teacher (TeacherInfo) has for this kind: its decoder's or its encoder's."""
        return info.decoder_depth if self.decoded else info.depth

    def shape(self, info, tokens: int) -> tuple[int, ...]:
        """The per-sample shape over `tokens` tokens of a teacher (TeacherInfo): its heads, or its width (its
        decoder's for a decoded kind)."""
        width = info.decoder_width if self.decoded else info.width
        return (info.heads, tokens, tokens) if self.pairs else (tokens, width)

    def token_axes(self, ndim: int) -> tuple[int, ...]:
        """The axes of a per-sample array of `ndim` axes (the target or its companion) that run over tokens."""
        return (1, 2)[:ndim - 1] if self.pairs else (0,)

    def token_shape(self, shape: tuple[int, ...], tokens: int) -> tuple[int, ...]:
        """A per-sample shape (the target's or its companion's) over `tokens` tokens instead."""
        axes = self.token_axes(len(shape))
        return tuple(tokens if axis in axes else size for axis, size in enumerate(shape))

    def take(self, values, tokens):
        """One sample's array (numpy or torch, the target or its companion) over the token indices `tokens`."""
        for axis in self.token_axes(values.ndim):
            values = values[(slice(None),) * axis + (tokens,)]
        return values

    def gather(self, values: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """A batch [B, ...] over per-sample token indices `tokens` [B, k]."""
        for axis in self.token_axes(values.dim() - 1):
            values = gather_along(values, axis + 1, tokens)
        return values

    def drop_leading(self, values: torch.Tensor, count: int) -> torch.Tensor:
        """A batch [B, ...] without its first `count` tokens on every token axis (the student's CLS, for a target
        of a teacher without one)."""
        for axis in self.token_axes(values.dim() - 1):
            values = values[(slice(None),) * (axis + 1) + (slice(count, None),)]
        return values

    def channels(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """What a teacher fixes in the shape, whatever the token count: its heads, or its width."""
        return shape[:1] if self.pairs else shape[-1:]


KINDS: dict[str, Kind] = {k.name: k for k in [
    Kind("feat", "the last block's tokens after the final norm, or with @B the residual stream after block B",
         needs_block=False, pairs=False),
    Kind("rel", "raw per-head Q K^T at block B", needs_block=True, pairs=True),
    Kind("msa", "block B's attention output: softmax(Q K^T / sqrt(d)) V, heads concatenated, before the output "
         "projection", needs_block=True, pairs=False),
    Kind("dec", "the teacher's decoder's hidden state after decoder block B, before its norm, at every token, its "
         "encoder having seen the view's teacher-visible patches (G2SD)", needs_block=True, pairs=False, decoded=True),
]}


@dataclass(frozen=True)
class TargetSpec:
    """One stored target: what it is, its per-sample shape over the stored tokens, how it is encoded."""

    kind: str
    role: str
    block: int | None = None            # None: the final features (kind "feat" only)
    shape: tuple[int, ...] = ()
    encoding: str = "fp16"
    cls: bool = True                    # the teacher's CLS token is the first stored token (TokenLayout)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise HdistillError(f"unknown target kind {self.kind!r}; known kinds: {', '.join(KINDS)}")
        if self.block is None and KINDS[self.kind].needs_block:
            raise HdistillError(f"target kind {self.kind!r} needs a block: {self.role}:{self.kind}@B")

    @property
    def name(self) -> str:
        return f"{self.kind}.{self.role}" + ("" if self.block is None else f".b{self.block}")

    @property
    def tap(self) -> str:
        """The CLI form: ROLE:KIND[@B]."""
        return f"{self.role}:{self.kind}" + ("" if self.block is None else f"@{self.block}")


@dataclass(frozen=True)
class TargetRequest:
    """A target as the user names it, before the teacher's depth resolves negative blocks."""

    role: str
    kind: str
    block: int | None = None


class TapError(ValueError):
    """A text that is not ROLE:KIND[@B[,B...]]: `reason` is "form", "needs_blocks" (a kind that needs blocks, given
    none) or "blocks" (a block that is not an integer)."""

    def __init__(self, reason: str, role: str = "", kind: str = ""):
        super().__init__(reason)
        self.reason, self.role, self.kind = reason, role, kind


def parse_tap(text: str) -> tuple[str, str, list[int] | None]:
    """ROLE:KIND[@B[,B...]] (the grammar of --target, and of --loss before its =WEIGHT) -> (role, kind, the blocks
    or None); TapError otherwise."""
    role, sep, rest = text.partition(":")
    kind, at, blocks = rest.partition("@")
    if not sep or not role or kind not in KINDS or (at and not blocks):
        raise TapError("form")
    if not at:
        if KINDS[kind].needs_block:
            raise TapError("needs_blocks", role, kind)
        return role, kind, None
    try:
        return role, kind, [int(b) for b in blocks.split(",")]
    except ValueError:
        raise TapError("blocks", role, kind) from None


def parse_targets(values) -> list[TargetRequest]:
    """`--target ROLE:KIND[@B[,B...]]` values -> requests, one per block."""
    out = []
    for value in values:
        try:
            role, kind, blocks = parse_tap(value)
        except TapError as err:
            raise HdistillError(f"--target {value!r}: " + {
                "form": f"expected ROLE:KIND[@B[,B...]] with KIND one of {', '.join(KINDS)}, e.g. clip:feat, "
                        "mae:rel@9,10, mae:feat@8",
                "needs_blocks": f"{err.kind} needs blocks, e.g. {err.role}:{err.kind}@9,10",
                "blocks": f"blocks must be integers, e.g. {err.role}:{err.kind}@-3,-2"}[err.reason]) from None
        out += [TargetRequest(role, kind, b) for b in (blocks or [None])]
    return out


def encoding_for(spec: TargetSpec, encodings: dict[str, str]) -> str:
    """The most specific of: the target's name, its kind, every target ('*'), else fp16."""
    for key in (spec.name, spec.kind, "*"):
        if key in encodings:
            return encodings[key]
    return "fp16"

"""The distillation objective: a weighted sum of one term per stored target (paper Eq. 1 and 3).

    feat      SmoothL1(proj(student's last tokens after the final norm), standardised teacher features)
    feat@B    SmoothL1(proj(student's residual stream after its paired block), standardised target)
    msa@B     SmoothL1(proj(student's softmax(Q K^T / sqrt(d)) V at its paired block), standardised target)
    rel@B     SmoothL1(student's raw Q K^T at its paired block, teacher's raw Q K^T)
    dec@B     SmoothL1(proj(student's decoder output), standardised teacher decoder state), every token (G2SD)

Feature-like targets are standardised per token (layer norm without affine), as FD and dBOT do;
each has its own linear projection from the student's width to the teacher's. Head counts may
differ: Q K^T of a group of heads taken together is the sum of its heads' Q K^T, so relations are
compared at gcd(H_teacher, H_student) relation heads, each the sum of a contiguous group of heads.

`--loss ROLE:KIND[@B[,B...]]=WEIGHT` names the terms; the default is Eq. 1: the feature teacher's
`feat` at weight 1 plus the MIM teacher's `rel` at its stored blocks, each at alpha / (number of
blocks), i.e. alpha times their mean.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from hdistill.common.errors import HdistillError
from hdistill.common.targets import KINDS, TargetSpec, parse_tap


@dataclass(frozen=True)
class LossRequest:
    """A term as the user names it: ROLE:KIND[@B]=WEIGHT (teacher block as given, may be negative)."""

    role: str
    kind: str
    block: int | None
    weight: float


def parse_losses(values) -> list[LossRequest]:
    """`--loss ROLE:KIND[@B[,B...]]=WEIGHT` values -> requests, one per block."""
    out = []
    for value in values:
        tap, sep, weight = value.rpartition("=")
        try:
            role, kind, blocks = parse_tap(tap)
            w = float(weight)
        except ValueError:                          # TapError, or a weight that is not a number
            sep = ""
        if not sep:
            raise HdistillError(f"--loss {value!r}: expected ROLE:KIND[@B[,B...]]=WEIGHT with KIND one of "
                                f"{', '.join(KINDS)}, e.g. clip:feat=1 or mae:rel@9,10=0.5")
        out += [LossRequest(role, kind, b, w) for b in (blocks or [None])]
    return out


@dataclass(frozen=True)
class LossTerm:
    """One term of the objective: a stored target, the student block it is matched at, its weight."""

    target: TargetSpec
    student_block: int | None      # None: the student's final tokens (final features)
    weight: float

    @property
    def name(self) -> str:
        return self.target.name

    @property
    def key(self) -> str:
        """The metrics name: loss/<target name>."""
        return f"loss/{self.target.name}"

    @property
    def pairs(self) -> bool:
        """A pair-shaped target (relations): compared as it is, over groups of heads; a row-shaped one through a
        projection of the student's width, standardised."""
        return KINDS[self.target.kind].pairs

    def student_tokens(self, values: torch.Tensor) -> torch.Tensor:
        """The student's tensor for this term [B, ...] over its tokens (CLS first) -> over the target's: pairs by
        token layout, so a target of a teacher without CLS (SigLIP) meets the student's patch tokens only."""
        return values if self.target.cls else KINDS[self.target.kind].drop_leading(values, 1)

    @property
    def student_tap(self) -> tuple[str, int] | None:
        """(kind, student block) the student must capture; None for its final tokens."""
        return None if self.student_block is None else (self.target.kind, self.student_block)

    def describe(self) -> str:
        where = ("decoder's output" if KINDS[self.target.kind].decoded else "final tokens") \
            if self.student_block is None else f"block {self.student_block}"
        return f"{self.weight:g} x {self.target.tap} (student {where})"


def group_heads(relations: torch.Tensor, groups: int) -> torch.Tensor:
    """[B, H, T, T] -> [B, groups, T, T]: each group the sum of H / groups contiguous heads."""
    B, H, T, _ = relations.shape
    return relations.reshape(B, groups, H // groups, T, T).sum(2)


def standardize(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Per-token standardisation over the channel axis (layer norm without affine)."""
    return F.layer_norm(x, x.shape[-1:], eps=eps)


@dataclass(frozen=True)
class LossConfig:
    beta: float = 2.0                 # SmoothL1 beta, as FD and dBOT
    standardize_targets: bool = True


class DistillLoss(nn.Module):
    """Holds one projection per feature-like term; returns {"loss": total, "loss/<target>": term, ...}. The final
    terms' projections start from `final_width` (a decoder's width) when given."""

    def __init__(self, terms: list[LossTerm], student_width: int, student_heads: int, cfg: LossConfig,
                 final_width: int | None = None):
        super().__init__()
        self.terms, self.cfg = terms, cfg
        width = {True: final_width or student_width, False: student_width}
        self.proj = nn.ModuleDict({_module_key(t): nn.Linear(width[t.student_tap is None], t.target.shape[-1])
                                   for t in terms if not t.pairs})
        self.groups = {t.name: math.gcd(student_heads, t.target.shape[0]) for t in terms if t.pairs}

    def forward(self, tokens: torch.Tensor, taps: dict[tuple[str, int], torch.Tensor],
                targets: dict[str, torch.Tensor], weights: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """tokens: the student's final tokens [B, T, D_s]; taps: (kind, block) -> its captured tensor;
        targets: target name -> the teacher's values over the same tokens; `weights` [B, T]: how much each final
        token counts in the final feature terms (a masked input: 1 at the masked patches), else (and in dec terms:
        G2SD's, at every token) every token alike."""
        out = {}
        for term in self.terms:
            student = term.student_tokens(tokens if term.student_tap is None else taps[term.student_tap])
            target = targets[term.name].float()
            if term.pairs:
                g = self.groups[term.name]
                out[term.key] = F.smooth_l1_loss(group_heads(student.float(), g), group_heads(target, g),
                                                 beta=self.cfg.beta)
                continue
            if self.cfg.standardize_targets:
                target = standardize(target)
            predicted = self.proj[_module_key(term)](student).float()
            if weights is None or term.student_tap is not None or KINDS[term.target.kind].decoded:
                out[term.key] = F.smooth_l1_loss(predicted, target, beta=self.cfg.beta)
            else:
                per_token = F.smooth_l1_loss(predicted, target, beta=self.cfg.beta, reduction="none").mean(-1)
                w = term.student_tokens(weights)                                      # [B, T]
                out[term.key] = (per_token * w).sum() / w.sum()
        return {"loss": sum(t.weight * out[t.key] for t in self.terms), **out}


def _module_key(term: LossTerm) -> str:
    return term.name.replace(".", "_")          # ModuleDict keys hold no dots


def plan_losses(manifest, requests: list[LossRequest] | None, student_depth: int, alpha: float = 1.0,
                feature_teacher: str | None = None, relation_teacher: str | None = None,
                relation_blocks: list[int] | None = None,
                student_blocks: dict[int, int] | None = None) -> list[LossTerm]:
    """The run's terms, checked against the store's target table (shards.manifest.Manifest).

    Without requests: the paper's Eq. 1 from --feature-teacher, --relation-teacher, --relation-blocks
    and --alpha. A teacher block B pairs with the student block at the same offset from the end
    (B - L_teacher + L_student) unless `student_blocks` maps it.
    """
    if requests is None:
        requests = _default_requests(manifest, alpha, feature_teacher, relation_teacher, relation_blocks)
    elif feature_teacher or relation_teacher or relation_blocks:
        raise HdistillError("--loss names every term: drop --feature-teacher, --relation-teacher and "
                            "--relation-blocks, which only shape the default objective")
    stored = {t.name: t for t in manifest.targets}
    terms = {}
    for req in requests:
        if req.role not in {t.role for t in manifest.teachers}:
            raise HdistillError(f"--loss {req.role}:{req.kind}: the store has no teacher {req.role!r} "
                                f"(teachers: {', '.join(t.role for t in manifest.teachers)})")
        depth = KINDS[req.kind].depth(manifest.teacher(req.role))
        block = None if req.block is None else req.block + depth if req.block < 0 else req.block
        name = f"{req.kind}.{req.role}" + ("" if block is None else f".b{block}")
        if name not in stored:
            raise HdistillError(f"--loss {req.role}:{req.kind}{'' if req.block is None else f'@{req.block}'}: the "
                                f"store holds no {name} (it holds {', '.join(stored)}); add it with "
                                "precompute --target")
        paired = None if KINDS[req.kind].decoded else _student_block(name, block, depth, student_depth,
                                                                      student_blocks)       # dec: at the decoder
        terms[name] = LossTerm(stored[name], paired, req.weight)
    if not terms:
        raise HdistillError("no loss term: give --loss ROLE:KIND[@B]=WEIGHT")
    return list(terms.values())


def _default_requests(manifest, alpha, feature_role, relation_role, relation_blocks) -> list[LossRequest]:
    feats = [t.role for t in manifest.targets if t.kind == "feat" and t.block is None]
    rels: dict[str, list[int]] = {}
    for t in manifest.targets:
        if t.kind == "rel":
            rels.setdefault(t.role, []).append(t.block)
    if feature_role is None and feats:
        feature_role = ([r for r in feats if r != manifest.mask.role] or feats)[0]
    if feature_role is not None and feature_role not in feats:
        raise HdistillError(f"--feature-teacher {feature_role}: the store holds features of "
                            f"{', '.join(feats) or 'no teacher'}")
    if relation_role is None and rels:
        relation_role = manifest.mask.role if manifest.mask.role in rels else next(iter(rels))
    blocks: list[int] = []
    if relation_role is not None:
        if relation_role not in rels:
            raise HdistillError(f"--relation-teacher {relation_role}: the store holds relations of "
                                f"{', '.join(rels) or 'no teacher'}")
        blocks = rels[relation_role] if relation_blocks is None else list(relation_blocks)
        missing = [b for b in blocks if b not in rels[relation_role]]
        if missing:
            raise HdistillError(f"--relation-blocks {','.join(map(str, blocks))}: the store holds relations of "
                                f"{relation_role} at blocks {rels[relation_role]} only")
    requests = [LossRequest(feature_role, "feat", None, 1.0)] if feature_role else []
    return requests + [LossRequest(relation_role, "rel", b, alpha / len(blocks)) for b in blocks]


def _student_block(name: str, block: int | None, teacher_depth: int, student_depth: int,
                   student_blocks: dict[int, int] | None) -> int | None:
    if block is None:
        return None
    given = (student_blocks or {}).get(block)
    paired = block - teacher_depth + student_depth if given is None else given
    if not 0 <= paired < student_depth:
        how = f"--student-blocks {block}={given}" if given is not None else \
            f"the same offset from the end ({block - teacher_depth})"
        raise HdistillError(f"{name}: teacher block {block} pairs with student block {paired} by {how}, outside "
                            f"a {student_depth}-block student; give --student-blocks {block}=S")
    return paired

"""A member of a run: one student and everything its steps change (loss, optimiser, gradient scaler, schedule,
health, its stochastic-depth RNG). A solo run is a loop of one member, a sweep a loop of many (train.loop).

Optimiser and schedule follow the paper (Sec. 4.1, dBOT settings): AdamW, lr 6e-4 at batch 1024 scaled linearly,
weight decay 0.05, linear warm-up then cosine decay, gradient clipping.
"""
from __future__ import annotations

import math
import random
import sys
from contextlib import contextmanager

import numpy as np
import torch

from hdistill.common.errors import HdistillError
from hdistill.common.grid import TokenGrid, check_same_grid
from hdistill.common.targets import KINDS
from hdistill.common.tokens import gather_along, gather_rows
from hdistill.shards.format import StoreLayout

from .config import DEFAULT_LR, TrainConfig
from .decoder import Decoder
from .dist import DistInfo
from .loss import DistillLoss, LossConfig, parse_losses, plan_losses
from .source import TargetSource
from .student import Student, build_student
from .validate import Evaluated

DWARFED = 10      # a first step's weighted term this many times another's is said to dwarf it
PRECISIONS = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def base_lr(cfg: TrainConfig) -> float:
    return cfg.lr if cfg.lr is not None else DEFAULT_LR * cfg.batch_size / 1024


def lr_factor(step: int, steps: int, warmup: int) -> float:
    """The lr of step `step` (0-based) over the peak: linear warm-up from 0, then cosine decay to 0."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def param_groups(modules: list[torch.nn.Module], weight_decay: float) -> list[dict]:
    """The trained (not frozen) parameters; no weight decay on biases, norms, position embeddings and the CLS token
    (timm's convention)."""
    decay, no_decay = [], []
    for module in modules:
        for name, p in module.named_parameters():
            if not p.requires_grad:
                continue
            skip = p.ndim <= 1 or name.endswith((".bias", "pos_embed", "cls_token"))
            (no_decay if skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def stochastic_depth_seed(seed: int, rank: int, restart: int = 0) -> int:
    """The seed of a rank's stochastic-depth stream, distinct for every (seed, rank, restart step): unlike seed + rank,
    seed s on rank 1 is not seed s + 1 on rank 0."""
    return int(np.random.SeedSequence([seed, rank, restart]).generate_state(1, np.uint64)[0])


def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class Distiller(torch.nn.Module):
    """Student (+ decoder) + loss as one module, so DDP sees every trained parameter (the projections too). With a
    `visible_key` the encoder sees only the batch's `visible[visible_key]` patches (a mask ratio of --reconstruct, or
    "teacher": the patches the teacher saw for the dec terms), and the decoder predicts every token; with
    `masked_only` the final feature terms count the patches the encoder did not see."""

    def __init__(self, student: Student, loss_fn: DistillLoss, decoder: Decoder | None = None,
                 visible_key: float | str | None = None, masked_only: bool = True):
        super().__init__()
        self.student, self.loss_fn, self.decoder = student, loss_fn, decoder
        self.visible_key, self.masked_only = visible_key, masked_only

    def forward(self, pixels, keep, targets: dict[str, torch.Tensor], visible: dict | None = None):
        weights = None
        if self.visible_key is not None:
            shown = visible[self.visible_key]                                 # [B, n] rows of the batch's N patches
            pixels, keep = gather_rows(pixels, shown), gather_along(keep, 1, shown)
        out = self.student(pixels, keep)
        tokens = out.tokens                                                   # [B, 1+n, D]
        if self.decoder is not None:
            tokens = self.decoder(tokens, keep)                               # [B, 1+N, W]
            if self.visible_key is not None and self.masked_only:             # 1 at the patches the encoder missed
                weights = torch.ones(tokens.shape[:2], device=tokens.device)
                weights[:, 0] = 0
                weights.scatter_(1, keep + 1, 0.0)
        return self.loss_fn(tokens, out.taps, targets, weights)


class Member:
    """One student of a run: built from `cfg` and the store's manifest with one seed (the same on every rank),
    stepped on batches as its `source` prepares them; train.run.build_member gives it its folder and sources."""

    def __init__(self, cfg: TrainConfig, manifest, steps: int, dist: DistInfo, device: str, compile: bool = False,
                 name: str = "train"):
        self.cfg, self.name, self.dist, self.device = cfg, name, dist, device
        self.steps = steps
        self.warmup = cfg.warmup_steps if cfg.warmup_steps is not None else max(1, steps // 20)
        self.steps_done = 0                              # steps taken (the run's step while the member runs)
        self.source: TargetSource | None = None
        self.folder = None                               # its RunFolder
        self.val_spec = None                             # what it reads of the held-out store (--val-shards)
        self._build(manifest, compile)

    def _build(self, manifest, compile: bool):
        """Student, loss terms and optimiser from the init seed, then this rank's stochastic-depth stream; DDP (and
        torch.compile) around the student and loss."""
        cfg, device, layout = self.cfg, self.device, manifest.layout
        self.init_seed = cfg.seed if cfg.init_seed is None else cfg.init_seed
        seed_everything(self.init_seed)
        self.student = build_student(cfg.student, layout.image_size, cfg.student_args, cfg.drop_path,
                                     cfg.student_mean, cfg.student_std).to(device)
        self.precision = cfg.precision or ("bf16" if device.startswith("cuda") else "fp32")
        if self.precision not in PRECISIONS:
            raise HdistillError(f"--precision {self.precision!r}: choose one of {', '.join(PRECISIONS)}")
        self.scaler = torch.amp.GradScaler(torch.device(device).type, enabled=self.precision == "fp16")
        _check_patch_size(cfg, layout, self.student)
        self.terms = plan_losses(manifest, parse_losses(cfg.losses) if cfg.losses else None,
                                 self.student.depth, cfg.alpha, cfg.feature_teacher, cfg.relation_teacher,
                                 cfg.relation_blocks, cfg.student_blocks)
        self.decoder = _build_decoder(cfg, self.student, self.terms, device)
        self.loss_fn = DistillLoss(self.terms, self.student.width, self.student.heads,
                                   LossConfig(cfg.beta, cfg.standardize_targets),
                                   final_width=self.decoder.width if self.decoder else None).to(device)
        taps = sorted({t.student_tap for t in self.terms if t.student_tap})
        self.student.capture(taps)
        self.frozen = self.student.freeze_unreached(taps, final=any(t.student_tap is None for t in self.terms))
        trained = [self.student, self.loss_fn] + ([self.decoder] if self.decoder else [])
        self.optimizer = torch.optim.AdamW(param_groups(trained, cfg.weight_decay), lr=base_lr(cfg),
                                           betas=(0.9, 0.95), fused=True)
        self.model = Distiller(self.student, self.loss_fn, self.decoder, _visible_key(cfg, self.terms),
                               cfg.reconstruct_tokens == "masked")
        self.health = StepHealth([t.name for t in self.terms], device, self.dist)
        # from here on its RNG draws only the student's stochastic depth, and each rank draws its own (MAE and nanoGPT
        # offset the seed by the rank); the member holds it, and puts it in the global RNG while it steps
        torch.manual_seed(stochastic_depth_seed(self.init_seed, self.dist.rank))
        self.rng = self.rank_rng_state()
        # Plain DDP (no find_unused_parameters, so no extra graph walk a step): the parameters that no loss term
        # reaches are frozen above, and DDP leaves frozen parameters out of its buckets.
        self.ddp = self.model if self.dist.world_size == 1 else torch.nn.parallel.DistributedDataParallel(
            self.model, device_ids=[device] if device.startswith("cuda") else None)
        if compile:
            self.ddp = torch.compile(self.ddp)

    # ---------------------------------------------------------------- the step

    def lr(self, step: int) -> float:
        """The learning rate of step `step` (0-based), from the schedule; set on the optimiser before each step."""
        return base_lr(self.cfg) * lr_factor(step, self.steps, self.warmup)

    def autocast(self):
        return torch.autocast(torch.device(self.device).type, dtype=PRECISIONS[self.precision],
                              enabled=self.precision != "fp32")

    def step(self, batch: dict) -> dict[str, torch.Tensor]:
        """One step on a prepared batch, enqueued without waiting on the device: finite-ness is recorded (StepHealth)
        and checked at the next log or checkpoint step, and a non-finite gradient is never applied (the fused AdamW
        skips it on the device, as it does under a GradScaler)."""
        targets = batch["targets"]                            # on the device already (StoreLoader, or the source)
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr(self.steps_done)
        with self.autocast():
            terms = self.ddp(batch["pixels"], batch["keep"], targets, batch.get("visible"))
        self.health.record(self.steps_done + 1, terms["loss"], targets)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(terms["loss"]).backward()          # fp16: scaled against underflow; else as is
        self.scaler.unscale_(self.optimizer)
        norm = torch.nn.utils.clip_grad_norm_([p for g in self.optimizer.param_groups for p in g["params"]],
                                              self.cfg.clip_grad)
        if not self.scaler.is_enabled():   # (the GradScaler sets it itself) the same on every rank: grads are reduced
            self.optimizer.found_inf = (~torch.isfinite(norm)).float()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.steps_done += 1
        return terms

    def evaluated(self, prepare=lambda batch: batch) -> Evaluated:
        """The student and loss as held-out batches are evaluated (no gradient, no stochastic depth); `prepare` takes
        the member's share of a batch of the held-out store (its stored targets: never the run's source)."""
        return Evaluated(self.model, ["loss", *(t.key for t in self.terms)], prepare, self.autocast())

    # ---------------------------------------------------------------- its RNG

    def rank_rng_state(self) -> dict:
        cuda = self.device.startswith("cuda")
        return {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(self.device) if cuda else None}

    def set_rank_rng_state(self, state: dict):
        torch.set_rng_state(state["torch"])
        if state["cuda"] is not None and self.device.startswith("cuda"):
            torch.cuda.set_rng_state(state["cuda"], self.device)

    @contextmanager
    def own_rng(self):
        """The member's stochastic-depth RNG in the global torch RNG while it steps (as if it ran alone)."""
        self.set_rank_rng_state(self.rng)
        try:
            yield
        finally:
            self.rng = self.rank_rng_state()

    # ---------------------------------------------------------------- state

    def state_dict(self) -> dict:
        """Tensors, numbers and containers only (torch.load(weights_only=True) loads them); this rank's RNG is not in
        it (the checkpoint holds every rank's: train.checkpoint.assemble)."""
        decoder = {"decoder": self.decoder.state_dict()} if self.decoder else {}
        return {"step": self.steps_done, "steps": self.steps, "warmup": self.warmup,
                "student": self.student.state_dict(), **decoder, "loss": self.loss_fn.state_dict(),
                "optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: dict, rng: dict | None):
        """A state_dict() of the same member, perhaps of a shorter run (the warm-up stays, the cosine ends at this
        run's last step); `rng` this rank's RNG as saved, or None to restart the stream at the step."""
        self.warmup = state["warmup"]
        self.student.load_state_dict(state["student"])
        if self.decoder:
            self.decoder.load_state_dict(state["decoder"])
        self.loss_fn.load_state_dict(state["loss"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.steps_done = state["step"]
        if rng is not None:
            self.rng = rng
        else:
            with self.own_rng():
                torch.manual_seed(stochastic_depth_seed(self.init_seed, self.dist.rank, restart=self.steps_done))

    @property
    def finished(self) -> bool:
        return self.steps_done >= self.steps

    # ---------------------------------------------------------------- what it says

    def say(self, text: str):
        if self.dist.main:
            print(f"{self.name}: {text}", file=sys.stderr, flush=True)

    def introduce(self):
        """Once, at the start: the objective, and the parameters no term reaches."""
        self.say("loss = " + " + ".join(t.describe() for t in self.terms))
        if self.frozen:
            self.say(f"no loss term reaches {len(self.frozen)} student parameter tensors "
                     f"({self.student.modules_of(self.frozen)}); they keep their initial values and are left out of "
                     "the optimiser and of DDP")

    def describe_terms(self, losses: dict[str, float]):
        """The first step's terms and their weighted shares: a term that dwarfs the others is visible at once."""
        parts = [f"{t.name} {losses[t.key]:.4g} x {t.weight:g} = {losses[t.key] * t.weight:.4g}" for t in self.terms]
        self.say(f"step {self.steps_done} terms: {'; '.join(parts)}; loss {losses['loss']:.4g} "
                 f"(peak lr {base_lr(self.cfg):.3g})")
        weighted = {t.name: losses[t.key] * t.weight for t in self.terms}
        big, small = max(weighted, key=weighted.get), min(weighted, key=weighted.get)
        if weighted[small] > 0 and weighted[big] >= DWARFED * weighted[small]:
            balance = "the --loss weights" if self.cfg.losses else \
                "--alpha (the weight of the relation terms against the features')"
            self.say(f"warning: at step {self.steps_done} {small} is {100 * weighted[small] / losses['loss']:.1f}% "
                     f"of the loss ({big} is {weighted[big] / weighted[small]:.0f}x it), so the student learns "
                     f"little from it; balance the terms with {balance}")


def _visible_key(cfg: TrainConfig, terms) -> float | str | None:
    """Which of a batch's `visible` patch sets the encoder sees: the teacher's for dec terms, --reconstruct's ratio,
    or none (every patch of the batch)."""
    return "teacher" if any(KINDS[t.target.kind].decoded for t in terms) else cfg.reconstruct or None


def _build_decoder(cfg: TrainConfig, student: Student, terms, device: str) -> Decoder | None:
    """The student's decoder (--decoder-depth), checked against the objective: it predicts every patch, so the
    batch must hold every patch (--mask none), and with a masked input (--reconstruct, or the teacher's patches of
    dec terms) every term is taken at the decoder's output."""
    decoded = [t.target.tap for t in terms if KINDS[t.target.kind].decoded]
    masked = f"--reconstruct {cfg.reconstruct:g}" if cfg.reconstruct else f"--loss {decoded[0]}" if decoded else None
    if decoded and cfg.reconstruct:
        raise HdistillError(f"--reconstruct {cfg.reconstruct:g} and --loss {decoded[0]}: a dec term's student sees the "
                            "patches its teacher saw (stored with the target), not a mask of its own; drop "
                            "--reconstruct")
    if masked and not cfg.decoder_depth:
        raise HdistillError(f"{masked}: the decoder predicts the patches the encoder does not see; give "
                            "--decoder-depth (MAE's light decoder: 8, dBOT and G2SD use fewer)")
    if not cfg.decoder_depth:
        return None
    if cfg.mask != "none":
        raise HdistillError(f"--decoder-depth {cfg.decoder_depth}: the decoder predicts every patch, so the batch must "
                            f"hold every patch: give --mask none (a store made with --tokens full), not --mask "
                            f"{cfg.mask}")
    inner = [t.target.tap for t in terms if t.student_tap is not None or t.pairs]
    if masked and inner:
        raise HdistillError(f"{masked} trains its terms at the decoder's output; {', '.join(inner)} read the "
                            "encoder's blocks over the patches it sees: give --loss ROLE:feat or ROLE:dec@B terms "
                            "only")
    if cfg.decoder_width % 4 or cfg.decoder_width % cfg.decoder_heads:
        raise HdistillError(f"--decoder-width {cfg.decoder_width}: a multiple of 4 (its sin-cos position embeddings) "
                            f"and of --decoder-heads {cfg.decoder_heads}")
    return Decoder(student.width, student.grid.num_patches, cfg.decoder_width, cfg.decoder_depth,
                   cfg.decoder_heads).to(device)


def _check_patch_size(cfg: TrainConfig, layout: StoreLayout, student: Student):
    try:
        check_same_grid({f"the store {cfg.shards}": TokenGrid(layout.image_size, layout.patch_size),
                         f"student {cfg.student}": student.grid})
    except HdistillError as err:
        raise HdistillError(f"{err} Give the student the store's patch size: --student-arg "
                            f"patch_size={layout.patch_size}") from None


class StepHealth:
    """Whether each step's loss and batch targets were finite, kept on the device between checks: `record` adds no
    host-device sync to a step; `check`, at log and checkpoint steps, is one (and one reduction over the ranks, so
    every rank stops together) and raises naming the first bad step and what was non-finite."""

    NONE = 2 ** 62                               # no bad step yet

    def __init__(self, targets: list[str], device: str, dist: DistInfo):
        self.names, self.dist = ["loss", *targets], dist
        self.first_bad = torch.full((len(self.names),), self.NONE, dtype=torch.int64, device=device)
        self.checked_at = None

    def record(self, step: int, loss: torch.Tensor, targets: dict[str, torch.Tensor]):
        finite = torch.stack([torch.isfinite(loss)] + [torch.isfinite(targets[n]).all() for n in self.names[1:]])
        self.first_bad = torch.where(finite, self.first_bad, self.first_bad.clamp(max=step))

    def check(self, step: int):
        """At `step` (a second call at the same step costs nothing)."""
        if step == self.checked_at:
            return
        self.checked_at = step
        first = self.first_bad.clone()
        if self.dist.world_size > 1:
            torch.distributed.all_reduce(first, op=torch.distributed.ReduceOp.MIN)
        bad = {name: step for name, step in zip(self.names, first.tolist()) if step != self.NONE}
        if not bad:
            return
        skipped = "its update was not applied, and nothing after it is checkpointed"
        targets = [name for name in bad if name != "loss"]
        if targets:
            step = min(bad[name] for name in targets)
            raise HdistillError(f"the batch of step {step} holds NaN or Inf in {', '.join(targets)}: the store is "
                                f"damaged; check it with hdistill verify ({skipped})")
        raise HdistillError(f"the loss became NaN or Inf at step {bad['loss']}; lower --lr or check the store with "
                            f"hdistill verify ({skipped})")

"""`hdistill train`: the student's training loop, from stored targets only (no teacher is loaded).

Optimiser and schedule follow the paper (Sec. 4.1, dBOT settings): AdamW, lr 6e-4 at batch 1024
scaled linearly, weight decay 0.05, linear warm-up then cosine decay, gradient clipping.
The run counts steps; `--epochs` converts to steps from the store's sample count.

RUN/
  checkpoint.pt        complete state, written atomically every --checkpoint-every steps
  metrics.jsonl        one JSON object per logged step
  student.safetensors  the backbone, loadable by timm (written with every checkpoint)
"""
from __future__ import annotations

import functools
import json
import math
import os
import random
import shutil
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from hdistill.common.atomic import atomic_open, remove_stale_temporaries, write_error
from hdistill.common.errors import HdistillError
from hdistill.common.files import NewEntries
from hdistill.common.lock import hold_lock
from hdistill.common.options import option_name
from hdistill.common.processes import StopRequest, Stopped, duration
from hdistill.common.grid import TokenGrid, check_same_grid
from hdistill.shards.manifest import Manifest

from .data import AllSamples, StreamSpec, check_lanes, check_mask, default_lanes, epoch_samples, steps_per_epoch
from .dist import barrier, gather_objects, init_distributed, mean_over_ranks
from .loader import Store, StoreLoader
from .config import DEFAULT_LR, TrainConfig, TrainRuntime
from .loss import DistillLoss, LossConfig, parse_losses, plan_losses
from .source import SourceFactory, SourcePlan, StoredTargets
from .student import Student, build_student, export_student
from .validate import Evaluated, evaluate, open_val_store
from .checkpoint import CHECKPOINT, EXPORT, HISTORY, LOCK, METRICS, OPTIONS

DWARFED = 10      # a first step's weighted term this many times another's is said to dwarf it
PRECISIONS = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
LENGTH_OPTIONS = ("steps", "epochs")     # a run may be extended
STORE_OPTIONS = ("shards", "val_shards")  # a store may move (a bucket, a local copy) if its manifest is the same


def base_lr(cfg: TrainConfig) -> float:
    return cfg.lr if cfg.lr is not None else DEFAULT_LR * cfg.batch_size / 1024


def total_steps(cfg: TrainConfig, manifest: Manifest) -> int:
    if (cfg.steps is None) == (cfg.epochs is None):
        raise HdistillError("give exactly one of --steps and --epochs")
    if cfg.steps is not None:
        return cfg.steps
    full, frac = int(cfg.epochs), cfg.epochs - int(cfg.epochs)
    lanes = cfg.lanes or default_lanes(cfg.batch_size)
    steps = [steps_per_epoch(epoch_samples(manifest, e), lanes, cfg.batch_size) for e in range(full + 1)]
    return max(1, sum(steps[:full]) + int(frac * steps[full]))


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


class Distiller(torch.nn.Module):
    """Student + loss as one module, so DDP sees every trained parameter (the projection too)."""

    def __init__(self, student: Student, loss_fn: DistillLoss):
        super().__init__()
        self.student, self.loss_fn = student, loss_fn

    def forward(self, pixels, keep, targets: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = self.student(pixels, keep)
        return self.loss_fn(out.tokens, out.taps, targets)


class Trainer:
    """Builds the student, loss, optimiser and loader from a store, then runs steps.

    Under torchrun each rank reads its lanes and takes --batch-size / world_size samples of every
    global batch; the checkpoint keeps the global data position; rank 0 writes the files.
    `source` makes the run's targets from a SourcePlan (train.source; default: the store's own).
    """

    def __init__(self, cfg: TrainConfig, out: str, rt: TrainRuntime, source: SourceFactory = StoredTargets):
        self.cfg, self.out = cfg, Path(out)
        rt = rt.resolved()
        self.dist, device = init_distributed(rt.device)
        self.rt = replace(rt, device=device)
        self.show_progress = self.rt.progress and self.dist.main
        self.store = Store(cfg.shards, rt.format)
        self.manifest = self.store.manifest
        self.steps = total_steps(cfg, self.manifest)
        self.warmup = cfg.warmup_steps if cfg.warmup_steps is not None else max(1, self.steps // 20)
        self.warnings: list[str] = []        # what the run's data and options say, shown once it starts (introduce)
        self._build_model()
        self._build_data(source)
        self._build_validation()
        self.step, self.epoch, self.epoch_batches = 0, 0, 0
        self.name = "train"                  # how its messages begin (a sweep names its members)
        self.lock, self.opened, self.resumed, self.stop = None, False, False, StopRequest()
        self.created: NewEntries | None = None    # what open() found in the run folder (rank 0)

    def _build_model(self):
        """Student, loss terms and optimiser, from one seed (the same on every rank), then each rank's stochastic-depth
        stream; DDP (and torch.compile) around the student and loss."""
        cfg, device, layout = self.cfg, self.rt.device, self.manifest.layout
        self.init_seed = cfg.seed if cfg.init_seed is None else cfg.init_seed
        _seed_everything(self.init_seed)
        self.student = build_student(cfg.student, layout.image_size, cfg.student_args, cfg.drop_path,
                                     cfg.student_mean, cfg.student_std).to(device)
        self.precision = cfg.precision or ("bf16" if device.startswith("cuda") else "fp32")
        if self.precision not in PRECISIONS:
            raise HdistillError(f"--precision {self.precision!r}: choose one of {', '.join(PRECISIONS)}")
        self.scaler = torch.amp.GradScaler(torch.device(device).type, enabled=self.precision == "fp16")
        try:
            check_same_grid({f"the store {cfg.shards}": TokenGrid(layout.image_size, layout.patch_size),
                             f"student {cfg.student}": self.student.grid})
        except HdistillError as err:
            raise HdistillError(f"{err} Give the student the store's patch size: --student-arg "
                                f"patch_size={layout.patch_size}") from None
        self.terms = plan_losses(self.manifest, parse_losses(cfg.losses) if cfg.losses else None,
                                 self.student.depth, cfg.alpha, cfg.feature_teacher, cfg.relation_teacher,
                                 cfg.relation_blocks, cfg.student_blocks)
        self.loss_fn = DistillLoss(self.terms, self.student.width, self.student.heads,
                                   LossConfig(cfg.beta, cfg.standardize_targets)).to(device)
        taps = sorted({t.student_tap for t in self.terms if t.student_tap})
        self.student.capture(taps)
        self.frozen = self.student.freeze_unreached(taps, final=any(t.student_tap is None for t in self.terms))
        self.optimizer = torch.optim.AdamW(param_groups([self.student, self.loss_fn], cfg.weight_decay),
                                           lr=base_lr(cfg), betas=(0.9, 0.95), fused=True)
        self.model = Distiller(self.student, self.loss_fn)
        self.health = StepHealth([t.name for t in self.terms], device, self.dist)
        # from here on the global RNG draws only the student's stochastic depth, and each rank draws its own (MAE and
        # nanoGPT offset the seed by the rank)
        torch.manual_seed(stochastic_depth_seed(self.init_seed, self.dist.rank))
        # Plain DDP (no find_unused_parameters, so no extra graph walk a step): the parameters that no loss term
        # reaches are frozen above, and DDP leaves frozen parameters out of its buckets.
        self.ddp = self.model if self.dist.world_size == 1 else torch.nn.parallel.DistributedDataParallel(
            self.model, device_ids=[device] if device.startswith("cuda") else None)
        if self.rt.compile:
            self.ddp = torch.compile(self.ddp)

    def _build_data(self, source: SourceFactory):
        """The run's share of every global batch, through its target source."""
        cfg = self.cfg
        self.lanes = cfg.lanes or default_lanes(cfg.batch_size)
        check_lanes(self.lanes, cfg.batch_size, self.dist.world_size)
        self.local_batch = cfg.batch_size // self.dist.world_size
        samples = epoch_samples(self.manifest, 0)
        if steps_per_epoch(samples, self.lanes, cfg.batch_size) == 0:
            raise HdistillError(f"--batch-size {cfg.batch_size}: the store's epoch holds {samples} samples, too few for "
                                f"one global batch of {cfg.batch_size} over {self.lanes} lanes; give a smaller "
                                "--batch-size (or --lanes)")
        lanes_here = self.lanes // self.dist.world_size
        if self.rt.workers > lanes_here:
            self.warnings.append(f"--workers {self.rt.workers}: each rank reads {lanes_here} lane(s), and a lane is "
                                 f"read by one loader process, so {self.rt.workers - lanes_here} of them would have "
                                 f"nothing to read and {lanes_here} are started; give --lanes a multiple of "
                                 f"{self.dist.world_size * self.rt.workers} (ranks x workers) to use them all")
        self.mask = check_mask(self.manifest, cfg.mask)
        self.source = source(SourcePlan(self.store, StreamSpec(
            tuple(t.target for t in self.terms), self.mask, cfg.seed, self.lanes, cfg.batch_size, cfg.lane_buffer_mb,
            self.dist.rank, self.dist.world_size, self.rt.retry), self.rt.device))
        if self.source.stream is not None:          # (a sweep member's stream is its sweep's, checked there)
            self.source.stream.check_present(self.views_read())

    def _build_validation(self):
        """The held-out store's samples, all of them, split over the ranks (--val-shards)."""
        cfg = self.cfg
        self.val, self.stores = None, {"shards": self.manifest.digest(), "val_shards": None}
        if not cfg.val_shards:
            return
        val_store, val_targets, warnings = open_val_store(cfg.val_shards, cfg.shards, self.manifest,
                                                             [t.target for t in self.terms], self.mask)
        self.warnings += warnings
        stream = val_store.stream(StreamSpec(tuple(val_targets), self.mask, cfg.seed, rank=self.dist.rank,
                                             world_size=self.dist.world_size, retry=self.rt.retry))
        stream.check_present([0])
        self.val = AllSamples(stream, self.local_batch)
        self.stores["val_shards"] = val_store.manifest.digest()

    def lr(self, step: int) -> float:
        """The learning rate of step `step` (0-based), from the schedule; set on the optimiser before each step."""
        return base_lr(self.cfg) * lr_factor(step, self.steps, self.warmup)

    # ---------------------------------------------------------------- state

    def state(self, rng: list[dict]) -> dict:
        """Tensors, numbers, strings and containers only, so the checkpoint loads with
        torch.load(weights_only=True). The data position is global, the same on every rank; `rng` holds
        every rank's RNG state (rank_rng_state), in rank order."""
        return {"config": asdict(self.cfg), "step": self.step, "steps": self.steps, "warmup": self.warmup,
                "world_size": self.dist.world_size, "position": (self.epoch, self.epoch_batches),
                "stores": self.stores, "source": self.source.record(),
                "student": self.student.state_dict(),
                "loss": self.loss_fn.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict(), "rng": rng}

    def rank_rng_state(self) -> dict:
        cuda = self.rt.device.startswith("cuda")
        return {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(self.rt.device) if cuda else None}

    def set_rank_rng_state(self, state: dict):
        torch.set_rng_state(state["torch"])
        if state["cuda"] is not None and self.rt.device.startswith("cuda"):
            torch.cuda.set_rng_state(state["cuda"], self.rt.device)

    def save(self):
        """checkpoint.pt and student.safetensors, atomically; with --keep-checkpoints N, the last N by step too."""
        self.write_checkpoint(self.out / CHECKPOINT)
        self.publish()

    def write_checkpoint(self, path: Path):
        """The complete state at `path`, atomically (rank 0; every rank gives its RNG state)."""
        rng = gather_objects(self.rank_rng_state(), self.dist)
        if self.dist.main:
            with atomic_open(path) as f:
                torch.save(self.state(rng), f)
        barrier(self.dist)

    def publish(self):
        """What goes with a checkpoint: student.safetensors and, with --keep-checkpoints, the history."""
        if self.dist.main:
            export_student(self.student, self.out / EXPORT)
            if self.rt.keep_checkpoints:
                keep_history(self.out, self.step, self.rt.keep_checkpoints)
        barrier(self.dist)

    def open(self):
        """Take the run folder: create it, lock it against a second run (rank 0; released when the process dies),
        remove what a killed run left half-written, and resume from its checkpoint if it holds one. Every refusal
        comes before anything is written."""
        if self.opened:
            return
        self.opened = True
        self.created = NewEntries(self.out) if self.dist.main else None
        if self.dist.main:
            try:
                self.out.mkdir(parents=True, exist_ok=True)
            except OSError as err:
                raise write_error(self.out, err) from None
            self.lock = hold_lock(self.out / LOCK, f"the run {self.out}")
            for name in (CHECKPOINT, EXPORT, METRICS, OPTIONS):
                remove_stale_temporaries(self.out / name)
        barrier(self.dist)
        try:
            self.resumed = self.resume()
        except BaseException:
            self.close()
            raise
        if self.resumed and not self.finished and self.dist.main:
            print(f"{self.name}: resuming {self.out / CHECKPOINT} at step {self.step} of {self.steps} (epoch "
                  f"{self.epoch + 1} of {self.epochs}, after its batch {self.epoch_batches})", file=sys.stderr)

    def write_options(self, options: bytes):
        """RUN/config.yaml (common.options.options_yaml): the run's options, which `hdistill train --config` loads
        again; written by rank 0 once the run folder is open, unless the run had finished before."""
        if self.dist.main and not self.finished:
            with atomic_open(self.out / OPTIONS) as f:
                f.write(options)

    def close(self):
        if self.lock is not None:
            self.lock.close()
            self.lock = None

    @property
    def finished(self) -> bool:
        return self.step >= self.steps

    def resume(self) -> bool:
        path = self.out / CHECKPOINT
        if not path.exists():
            return False
        state = torch.load(path, map_location="cpu", weights_only=True)
        old, new = json.loads(json.dumps(state["config"])), json.loads(json.dumps(asdict(self.cfg)))
        for k in STORE_OPTIONS:     # the same path may now hold another store: compare what it holds, always
            if state.get("stores", {}).get(k) != self.stores[k]:
                raise HdistillError(f"{option_name(TrainConfig, k)} {new[k]} is not the store {self.out} was "
                                    f"trained on (its manifest differs from the one recorded in {path}); give the run's own store, "
                                    "or a new --out for a new run")
        if state["source"] != self.source.record():
            raise HdistillError(f"{self.out} was trained from {state['source']}, this run's targets come from "
                                f"{self.source.record()}; use a new --out or the run's own --online options")
        diff = [k for k in new if old.get(k) != new[k] and k not in LENGTH_OPTIONS + STORE_OPTIONS]
        if diff:
            raise HdistillError(f"{self.out} holds a run with other options "
                                f"({', '.join(option_name(TrainConfig, d) for d in diff)}); use a new --out or the "
                                "original options to resume (only --steps / --epochs may change, and --shards / --val-shards "
                                "may name the same store in another place)")
        if self.steps < state["step"]:
            raise HdistillError(f"{path} is at step {state['step']}; --steps/--epochs give {self.steps}, "
                                "which is behind it")
        self.warmup = state["warmup"]
        if self.steps != state["steps"] and self.dist.main:
            print(f"{self.name}: the run is extended from {state['steps']} to {self.steps} steps: warm-up stays "
                  f"{self.warmup} steps, the cosine decay now ends at step {self.steps} (lr at step {state['step']}: "
                  f"{lr_factor(state['step'], state['steps'], self.warmup) * base_lr(self.cfg):.3g} -> "
                  f"{self.lr(state['step']):.3g})", file=sys.stderr)
        self.student.load_state_dict(state["student"])
        self.loss_fn.load_state_dict(state["loss"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.step = state["step"]
        self.epoch, self.epoch_batches = state["position"]           # global: any rank count resumes it
        if len(state["rng"]) == self.dist.world_size:
            self.set_rank_rng_state(state["rng"][self.dist.rank])
        else:
            torch.manual_seed(stochastic_depth_seed(self.init_seed, self.dist.rank, restart=self.step))
            if self.dist.main and self.cfg.drop_path > 0:
                print(f"{self.name}: {path} holds the stochastic-depth RNG of {len(state['rng'])} rank(s), this run has "
                      f"{self.dist.world_size}: each rank's stochastic-depth stream restarts at step {self.step} (from "
                      "the seed, the rank and the step); the data order and every other state resume exactly",
                      file=sys.stderr)
        return True

    # ---------------------------------------------------------------- data

    def batches(self):
        """Endless local batches from the saved position (StoreLoader, the public loader), through the source."""
        loader = StoreLoader(self.source.stream, self.rt.workers, self.rt.device, self.epoch, self.epoch_batches)
        while True:
            for batch in loader:
                self.epoch, self.epoch_batches = loader.epoch, loader.batch
                yield self.source.prepare(batch)
            self.epoch, self.epoch_batches = loader.epoch, loader.batch

    # ---------------------------------------------------------------- steps

    def autocast(self):
        return torch.autocast(torch.device(self.rt.device).type, dtype=PRECISIONS[self.precision],
                              enabled=self.precision != "fp32")

    def evaluated(self, prepare=lambda batch: batch) -> Evaluated:
        """The student and loss as the held-out batches are evaluated (no gradient, no stochastic depth)."""
        return Evaluated(self.model, ["loss", *(t.key for t in self.terms)], prepare, self.autocast())

    def validate(self) -> dict[str, float]:
        """The loss on the held-out store: {"step", "val/loss", ...}."""
        return {"step": self.step, **evaluate({"": self.evaluated()}, self.val, self.rt.workers, self.rt.device,
                                              self.dist)[""]}

    def train_step(self, batch: dict) -> dict[str, torch.Tensor]:
        """One step, enqueued without waiting on the device: finite-ness is recorded (StepHealth) and checked at the
        next log or checkpoint step, and a non-finite gradient is never applied (the fused AdamW skips it on the
        device, as it does under a GradScaler)."""
        targets = batch["targets"]                            # on the device already (StoreLoader, or the source)
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr(self.step)
        with self.autocast():
            terms = self.ddp(batch["pixels"], batch["keep"], targets)
        self.health.record(self.step + 1, terms["loss"], targets)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(terms["loss"]).backward()          # fp16: scaled against underflow; else as is
        self.scaler.unscale_(self.optimizer)
        norm = torch.nn.utils.clip_grad_norm_([p for g in self.optimizer.param_groups for p in g["params"]],
                                              self.cfg.clip_grad)
        if not self.scaler.is_enabled():   # (the GradScaler sets it itself) the same on every rank: grads are reduced
            self.optimizer.found_inf = (~torch.isfinite(norm)).float()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.step += 1
        return terms

    def stop_requested(self, step: int) -> bool:
        """SIGTERM reached a rank; under torchrun the ranks agree after logged steps (a reduction they make anyway),
        so every rank stops after the same step."""
        if self.dist.world_size == 1:
            return bool(self.stop)
        if step % self.rt.log_every:
            return False
        flag = torch.tensor([1.0 if self.stop else 0.0], device=self.rt.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item())

    def run(self) -> Path:
        self.open()
        try:
            if self.finished:
                if self.dist.main:
                    print(f"{self.name}: {self.out} is finished (step {self.step} of {self.steps}); the student is "
                          f"{self.out / EXPORT}. Give a larger --steps or --epochs to extend it.", file=sys.stderr)
                return self.out / EXPORT
            self.introduce()
            with self.stop.listening():
                self._steps()
        finally:
            self.close()
            if self.step == 0 and self.created is not None:
                # a fresh run that failed before its first step (a shard found damaged, say) leaves its folder as it
                # found it: its config.yaml, metrics.jsonl, tensorboard/ and lock are removed
                self.created.remove()
        barrier(self.dist)
        return self.out / EXPORT

    def introduce(self, shared: bool = True):
        """Once, at the start (rank 0): the objective, parameters no term reaches and, with `shared` (a sweep says them
        once for its members), what the data and options warn about and the views the run reads again."""
        if not self.dist.main:
            return
        print(f"{self.name}: loss = " + " + ".join(t.describe() for t in self.terms), file=sys.stderr)
        if shared:
            for warning in self.warnings:
                print(f"{self.name}: warning: {warning}", file=sys.stderr)
            self._say_if_views_repeat()
        if self.frozen:
            print(f"{self.name}: no loss term reaches {len(self.frozen)} student parameter tensors "
                  f"({self.student.modules_of(self.frozen)}); they keep their initial values and are left out of the "
                  "optimiser and of DDP", file=sys.stderr)

    def _say_if_views_repeat(self):
        """Once, at the start: a run longer than the store has views reads each fixed view again."""
        views, epochs = self.manifest.layout.views, self.epochs
        if self.source.record().get("fresh_views") or epochs <= views:
            return
        print(f"{self.name}: {epochs} epochs from a store of {views} view(s) per image: epoch e reads view e mod "
              f"{views}, so each view is read about {epochs / views:.0f} times. Fixed views cost held-out loss "
              "against fresh ones (BENCHMARKS.md, Fidelity: 1 view +15.7%, 4 views +3.0% on a small run); more "
              "views (precompute --views) or --online --fresh-views narrow it", file=sys.stderr)

    def views_read(self) -> range:
        """The store's views the run's epochs read (epoch e reads view e mod V)."""
        return range(min(self.manifest.layout.views, self.epochs))

    @functools.cached_property
    def epochs(self) -> int:
        """The epochs the run's steps reach into (the last may be partial)."""
        epoch, steps = 0, 0
        while steps < self.steps:
            per_epoch = steps_per_epoch(epoch_samples(self.manifest, epoch), self.lanes, self.cfg.batch_size)
            if per_epoch == 0:
                break
            steps, epoch = steps + per_epoch, epoch + 1
        return epoch

    def _log_line(self, text: str):
        if self.dist.main and self.rt.log_lines:
            print(f"{self.name}: step {self.step}/{self.steps} {text}", file=sys.stderr, flush=True)

    def _steps(self):
        with self.progress() as progress:
            if self.val and self.step == 0:                   # where the curve starts: the student as initialised
                self.log_validation(self.validate(), progress)
            data = self.batches()
            while self.step < self.steps:
                self.record(self.train_step(next(data)), progress)
                stop = self.stop_requested(self.step) and self.step < self.steps
                if stop or self.checkpoint_due(self.step):
                    self.health.check(self.step)                 # nothing non-finite is ever checkpointed
                    self.save()
                if stop:
                    raise Stopped(f"train: {self.stop.name or 'a stop request'} at step {self.step} of "
                                  f"{self.steps}: checkpoint written to {self.out / CHECKPOINT}; run the same "
                                  "command to resume", self.stop.signum or 15)

    def checkpoint_due(self, step: int) -> bool:
        """Whether a checkpoint follows step `step` (this run's, or its sweep's)."""
        return step % self.rt.checkpoint_every == 0 or step == self.steps

    @contextmanager
    def progress(self):
        """The run's metrics.jsonl and TensorBoard log (rank 0) and its progress bar, for `record`."""
        metrics = _MetricsLog(self.out / METRICS, keep_until=self.step if self.resumed else 0) \
            if self.dist.main else None
        bar = tqdm(total=self.steps, initial=self.step, unit="step", disable=not self.show_progress)
        try:
            yield _Progress(metrics, bar, time.perf_counter(), self.step, self.step + 1)
        finally:
            bar.close()
            if metrics:
                metrics.close()

    def record(self, terms: dict[str, torch.Tensor], progress: "_Progress"):
        """After a step: its losses at logged steps (checking they were finite), and the held-out loss when due."""
        logged = self.step % self.rt.log_every == 0 or self.step == self.steps
        first = self.step == progress.first_step
        if logged or first:                                  # one reduction serves both
            self.health.check(self.step)
            losses = mean_over_ranks(terms, self.dist)
        if first:
            self._describe_terms(losses)
        progress.bar.update(1)
        if logged:
            now = time.perf_counter()
            rate = (self.step - progress.last_step) * self.cfg.batch_size / max(now - progress.last_time, 1e-9)
            lr = self.lr(self.step - 1)
            if progress.metrics:
                progress.metrics.write({"step": self.step, "epoch": self.epoch, "lr": lr, "samples_per_s": rate,
                                        **losses})
            progress.postfix["loss"] = f"{losses['loss']:.4f}"
            progress.bar.set_postfix(progress.postfix, refresh=False)
            self._log_line(f"epoch {self.epoch + 1}/{self.epochs} loss {losses['loss']:.4f} lr {lr:.3g} "
                           f"{rate:.1f} samples/s "
                           f"eta {duration((self.steps - self.step) * self.cfg.batch_size / max(rate, 1e-9))}")
            progress.last_time, progress.last_step = now, self.step
        if self.val and self.validation_due(self.step):
            self.log_validation(self.validate(), progress)

    def validation_due(self, step: int) -> bool:
        """Whether the held-out store is evaluated after step `step`."""
        return step % self.cfg.val_every == 0 or step == self.steps

    def log_validation(self, record: dict, progress: "_Progress"):
        if progress.metrics:
            progress.metrics.write(record)
        progress.postfix["val_loss"] = f"{record['val/loss']:.4f}"
        progress.bar.set_postfix(progress.postfix, refresh=False)
        self._log_line(f"val/loss {record['val/loss']:.4f}")

    def _describe_terms(self, losses: dict[str, float]):
        """The first step's terms and their weighted shares: a term that dwarfs the others is visible at once."""
        if not self.dist.main:
            return
        parts = [f"{t.name} {losses[t.key]:.4g} x {t.weight:g} = {losses[t.key] * t.weight:.4g}" for t in self.terms]
        print(f"{self.name}: step {self.step} terms: {'; '.join(parts)}; loss {losses['loss']:.4g} "
              f"(peak lr {base_lr(self.cfg):.3g})", file=sys.stderr)
        weighted = {t.name: losses[t.key] * t.weight for t in self.terms}
        big, small = max(weighted, key=weighted.get), min(weighted, key=weighted.get)
        if weighted[small] > 0 and weighted[big] >= DWARFED * weighted[small]:
            balance = "the --loss weights" if self.cfg.losses else \
                "--alpha (the weight of the relation terms against the features')"
            print(f"{self.name}: warning: at step {self.step} {small} is {100 * weighted[small] / losses['loss']:.1f}% "
                  f"of the loss ({big} is {weighted[big] / weighted[small]:.0f}x it), so the student learns little "
                  f"from it; balance the terms with {balance}", file=sys.stderr)


@dataclass
class _Progress:
    """A run's logging between steps: where records go, and the last logged step and time (for samples/s)."""

    metrics: "_MetricsLog | None"
    bar: tqdm
    last_time: float
    last_step: int
    first_step: int                 # the first step this process takes
    postfix: dict = field(default_factory=dict)


class StepHealth:
    """Whether each step's loss and batch targets were finite, kept on the device between checks: `record` adds no
    host-device sync to a step; `check`, at log and checkpoint steps, is one (and one reduction over the ranks, so
    every rank stops together) and raises naming the first bad step and what was non-finite."""

    NONE = 2 ** 62                               # no bad step yet

    def __init__(self, targets: list[str], device: str, dist):
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


class _MetricsLog:
    """metrics.jsonl, and TensorBoard scalars; on resume, records after the checkpoint's step are dropped."""

    def __init__(self, path: Path, keep_until: int):
        kept = []
        if path.exists() and keep_until:
            kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= keep_until]
        path.write_text("".join(line + "\n" for line in kept))
        self.file = open(path, "a")
        from torch.utils.tensorboard import SummaryWriter
        self.tb = SummaryWriter(str(path.parent / "tensorboard"), purge_step=keep_until + 1 if keep_until else None)

    def write(self, record: dict):
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        for key, value in record.items():     # the tags are the metrics.jsonl keys
            if key != "step":
                self.tb.add_scalar(key, value, record["step"])

    def close(self):
        self.file.close()
        self.tb.close()


def keep_history(out: Path, step: int, keep: int):
    """checkpoints/step-<step>.pt for the latest checkpoint (a hard link: no copy), the oldest beyond `keep` removed."""
    folder = out / HISTORY
    folder.mkdir(exist_ok=True)
    target = folder / f"step-{step:09d}.pt"
    target.unlink(missing_ok=True)
    try:
        os.link(out / CHECKPOINT, target)
    except OSError:
        shutil.copyfile(out / CHECKPOINT, target)
    for old in sorted(folder.glob("step-*.pt"))[:-keep]:
        old.unlink()


def stochastic_depth_seed(seed: int, rank: int, restart: int = 0) -> int:
    """The seed of a rank's stochastic-depth stream, distinct for every (seed, rank, restart step): unlike seed + rank,
    seed s on rank 1 is not seed s + 1 on rank 0."""
    return int(np.random.SeedSequence([seed, rank, restart]).generate_state(1, np.uint64)[0])


def _seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def run_train(cfg: TrainConfig, out: str, rt: TrainRuntime, source: SourceFactory = StoredTargets) -> Path:
    return Trainer(cfg, out, rt, source).run()

"""`hdistill train --sweep SWEEP.yaml`: K students from one pass over the store (the paper's ablation tables as one
run).

A sweep file holds the shared options (keys as in --config) and a list `members`, each a `name` and the options
it overrides (MEMBER_OPTIONS: the objective, the student, the optimiser, the mask, the initialisation seed).
Every batch is read, checked and moved to the device once, then stepped by every member in turn (and every
held-out batch evaluated by every member in turn); each member
is a Trainer of its own (model, optimiser, schedule, RNG, metrics, export) in RUN/<member>/, and with the same
options and seed it computes exactly what `hdistill train` run alone with that member's options computes (its
RUN/<member>/config.yaml is that run's --config).

RUN/
  sweep.json            the members, their overrides and states, and the step every checkpoint below is at
  <member>/             checkpoint.pt, metrics.jsonl, tensorboard/, student.safetensors, config.yaml
  sweep-report.csv/.md  one row per member: overrides, final training loss, final and best held-out losses
  sweep-report.png      the held-out loss of every member against the step

Checkpoints are a two-phase commit: every member writes checkpoint.pt.pending-<step>, then sweep.json records
the step, then each pending file replaces checkpoint.pt. A sweep killed at any moment resumes every member at
the step sweep.json records: a pending file of that step is rolled forward, any other is removed.
"""
from __future__ import annotations

import json
import os
import re
import resource
import sys
from contextlib import ExitStack, contextmanager
from dataclasses import replace
from pathlib import Path

import torch

from hdistill.common.atomic import atomic_open, remove_stale_temporaries
from hdistill.common.errors import HdistillError
from hdistill.common.files import NewEntries
from hdistill.common.lock import hold_lock
from hdistill.common.options import fields_by_key, params_from_yaml
from hdistill.common.processes import StopRequest, Stopped
from hdistill.common.targets import KINDS
from hdistill.common.tokens import gather_along, gather_rows, token_index

from .config import OnlineConfig, TrainConfig, TrainRuntime
from .data import AllSamples, StoreStream, StreamSpec
from .dist import barrier
from .loader import Store, StoreLoader
from .checkpoint import CHECKPOINT, LOCK, PENDING, RECORD
from .run import Trainer
from .source import SourcePlan, StoredTargets
from .validate import evaluate

# TrainConfig fields a member may set; every other option decides which samples a step sees, or when
MEMBER_OPTIONS = ("losses", "alpha", "beta", "standardize_targets", "feature_teacher", "relation_teacher",
                  "relation_blocks", "student_blocks", "student", "student_args", "drop_path", "student_mean",
                  "student_std", "precision", "lr", "weight_decay", "warmup_steps", "clip_grad", "mask", "init_seed")
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def check_members(members, where: str) -> list[tuple[str, dict]]:
    """The sweep file's `members` -> [(name, {YAML key: value})], refusing what a member may not set, naming it."""
    if not isinstance(members, list) or not members:
        raise HdistillError(f"{where}: `members` must be a non-empty list of mappings with a name")
    every = fields_by_key((TrainConfig, TrainRuntime, OnlineConfig))
    out, seen = [], set()
    for i, member in enumerate(members):
        if not isinstance(member, dict) or not isinstance(member.get("name"), str) or not NAME.fullmatch(member["name"]):
            raise HdistillError(f"{where}: member {i + 1} needs a `name` of letters, digits, '.', '_' or '-' (its "
                                "folder in the run)")
        name = member["name"]
        if name in seen:
            raise HdistillError(f"{where}: two members are named {name!r}")
        seen.add(name)
        overrides = {k: v for k, v in member.items() if k != "name"}
        for key in overrides:
            norm = str(key).lstrip("-").replace("-", "_")
            if norm not in every:
                raise HdistillError(f"{where}: member {name!r}: {key!r} is not an option of hdistill train")
            if every[norm].name not in MEMBER_OPTIONS:
                flag = every[norm].metadata["option"].name(every[norm].name)
                raise HdistillError(f"{where}: member {name!r}: {flag} is shared by every member of a sweep "
                                    "(its members step on the same batches, as many of them, at the same time); set "
                                    "it in the sweep's shared options or run another sweep")
        out.append((name, overrides))
    return out


def member_options(shared: dict, members: list[tuple[str, dict]]) -> dict[str, dict]:
    """{member: its command's parameters}: the shared ones with the member's overrides (check_members)."""
    return {name: {**shared, **params_from_yaml([TrainConfig], overrides, f"sweep member {name!r}")}
            for name, overrides in members}


def shared_stream(store: Store, specs: list[StreamSpec]) -> StoreStream:
    """One stream of `store` for the members' specs: the union of their targets, one mask or, when their masks
    differ, every patch of a full store with each member's patch choice alongside (StoreStream.selections)."""
    targets = {t.name: t for spec in specs for t in spec.targets}
    masks = sorted({spec.mask for spec in specs})
    mask = masks[0] if len(masks) == 1 else "none"
    stream = store.stream(replace(specs[0], targets=tuple(targets.values()), mask=mask))
    stream.selections = tuple(m for m in masks if m != mask)
    return stream


class SharedTargets:
    """The members' target sources over one stream (shared_stream)."""

    def __init__(self):
        self.plans: list[SourcePlan] = []
        self.stream = None

    def member(self, plan: SourcePlan) -> "MemberTargets":
        self.plans.append(plan)
        return MemberTargets(self, plan)

    def build(self):
        self.stream = shared_stream(self.plans[0].store, [plan.spec for plan in self.plans])


class MemberTargets:
    """One member's view of the shared batch: its mask's patches and its targets (train.source.TargetSource)."""

    def __init__(self, shared: SharedTargets, plan: SourcePlan):
        self.shared, self.plan = shared, plan

    @property
    def stream(self):
        return self.shared.stream

    def prepare(self, batch: dict) -> dict:
        selections = batch.get("selections", {})
        if self.plan.spec.mask not in selections:
            return batch
        sel = selections[self.plan.spec.mask]                          # [B, n] of the batch's N patches
        return {"count": batch["count"], "pixels": gather_rows(batch["pixels"], sel),
                "keep": gather_along(batch["keep"], 1, sel),
                "targets": {t.name: KINDS[t.kind].gather(batch["targets"][t.name], token_index(sel, t.cls))
                            for t in self.plan.spec.targets}}

    record = staticmethod(StoredTargets.record)      # the store's targets, as a solo run reads them


class Sweep:
    """The members' Trainers over one loader, stepped in turn, checkpointed together."""

    def __init__(self, members: list[tuple[str, TrainConfig]], out: str, rt: TrainRuntime,
                 overrides: dict[str, dict] | None = None, file: str = "the sweep"):
        self.out, self.overrides = Path(out), overrides or {name: {} for name, _ in members}
        self.shared = SharedTargets()
        self.members: dict[str, Trainer] = {}
        self.rng: dict[str, dict] = {}             # each member's stochastic-depth RNG, as its build left it
        for name, cfg in members:
            try:
                trainer = Trainer(cfg, str(self.out / name), rt, source=self.shared.member)
            except HdistillError as err:
                raise HdistillError(f"{file}: member {name!r}: {err}") from None
            trainer.name = f"train {name}"
            self.members[name], self.rng[name] = trainer, trainer.rank_rng_state()
        self.stop = StopRequest()                  # one request stops every member after the same step
        for trainer in self.members.values():
            trainer.stop = self.stop
        self.shared.build()
        self.lead = next(iter(self.members.values()))
        self.shared.stream.check_present(self.lead.views_read())
        # one pass over the held-out store evaluates every member (each member's own would read it K times)
        self.val = None if self.lead.val is None else AllSamples(
            shared_stream(self.lead.val.stream.store, [t.val.stream.spec for t in self.members.values()]),
            self.lead.val.batch_size)
        for trainer in self.members.values():
            trainer.val = None
        self.dist, self.rt, self.steps = self.lead.dist, self.lead.rt, self.lead.steps
        self.lock, self.opened, self.created = None, False, None
        self.status = {name: {"state": "running"} for name in self.members}
        self.step = 0
        self._check_memory()

    # ---------------------------------------------------------------- memory

    def _check_memory(self):
        """Refuse at start-up a sweep whose optimiser states cannot fit beside the built models (an estimate:
        gradients and AdamW's two moments, 3 x each member's parameters, activations on top, one member's at a
        time)."""
        need = sum(3 * sum(p.numel() * p.element_size() for p in t.model.parameters() if p.requires_grad)
                   for t in self.members.values())
        device = torch.device(self.rt.device)
        if device.type == "cuda":
            free = torch.cuda.mem_get_info(device)[0]
        else:
            free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        if need > free:
            raise HdistillError(f"the sweep's {len(self.members)} members need about {need / 2 ** 30:.1f} GiB more "
                                f"for their gradients and optimiser states, and {device} has {free / 2 ** 30:.1f} "
                                "GiB free: run fewer members per sweep, smaller students, or more GPUs")

    def peak_memory(self) -> str:
        device = torch.device(self.rt.device)
        if device.type == "cuda":
            return f"{torch.cuda.max_memory_allocated(device) / 2 ** 30:.2f} GiB on {device}"
        return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20:.2f} GiB resident (CPU)"

    # ---------------------------------------------------------------- opening, resuming

    def open(self):
        """Take the run folder, roll each member's pending checkpoint forward or back to the step sweep.json
        records, then open (and resume) every member."""
        if self.opened:
            return
        self.opened = True
        self.created = NewEntries(self.out) if self.dist.main else None
        if self.dist.main:
            self.out.mkdir(parents=True, exist_ok=True)
            self.lock = hold_lock(self.out / LOCK, f"the sweep {self.out}")
            remove_stale_temporaries(self.out / RECORD)
        record = self._read_record()
        self.step = record["step"] if record else 0
        if self.dist.main:
            for name in self.members:
                self._settle_pending(self.out / name, self.step)
        barrier(self.dist)
        if record:
            self.status = {m["name"]: m["status"] for m in record["members"]}
        for name, trainer in self.members.items():
            with self._own_rng(name):              # a resume sets it from the member's checkpoint
                trainer.open()
            if self.status[name]["state"] == "finished" and not trainer.finished:      # --steps extended
                self.status[name] = {"state": "running"}
            if self.status[name]["state"] == "running" and trainer.step != self.step:
                raise HdistillError(f"{self.out / name / CHECKPOINT} is at step {trainer.step}, {self.out / RECORD} "
                                    f"at {self.step}: the sweep's checkpoints were not written by one sweep")

    def _read_record(self) -> dict | None:
        path = self.out / RECORD
        if not path.exists():
            return None
        record = json.loads(path.read_text())
        changes = member_changes({m["name"]: m["overrides"] for m in record["members"]},
                                 json.loads(json.dumps({n: self.overrides[n] for n in self.members})))
        if changes:
            raise HdistillError(f"{self.out} holds a sweep of other members ({'; '.join(changes)}); use a new --out, "
                                "or the sweep's own file to resume")
        return record

    @staticmethod
    def _settle_pending(folder: Path, step: int):
        for pending in folder.glob(PENDING + "*") if folder.exists() else ():
            if int(pending.name[len(PENDING):]) == step:
                os.replace(pending, folder / CHECKPOINT)        # written, recorded, not yet in place: forward
            else:
                pending.unlink()                                # written, never recorded: back

    def close(self):
        for trainer in self.members.values():
            trainer.close()
        if self.lock is not None:
            self.lock.close()
            self.lock = None

    # ---------------------------------------------------------------- steps

    @contextmanager
    def _own_rng(self, name: str):
        """The member's stochastic-depth RNG in the global torch RNG while it steps (as if it ran alone)."""
        trainer = self.members[name]
        trainer.set_rank_rng_state(self.rng[name])
        try:
            yield
        finally:
            self.rng[name] = trainer.rank_rng_state()

    def running(self) -> list[str]:
        return [n for n, s in self.status.items() if s["state"] == "running"]

    def run(self) -> Path:
        self.open()
        try:
            if self.step >= self.steps or not self.running():
                if self.dist.main:
                    print(f"sweep: {self.out} is finished (step {self.step} of {self.steps})", file=sys.stderr)
                return self.out
            for i, name in enumerate(self.running()):
                with self._own_rng(name):
                    self.members[name].introduce(shared=i == 0)
            with self.stop.listening():
                self._steps()
        finally:
            self.close()
            if self.step == 0 and self.created is not None:       # a failed start leaves the folder as it was
                self.created.remove()
        barrier(self.dist)
        return self.out

    def _steps(self):
        at = self.members[self.running()[0]]       # every running member is at the sweep's step and position
        loader = StoreLoader(self.shared.stream, self.rt.workers, self.rt.device, at.epoch, at.epoch_batches)
        with ExitStack() as stack:
            progress = {n: stack.enter_context(self.members[n].progress()) for n in self.running()}
            if self.val and self.step == 0:                    # where the curves start: the students as initialised
                self.validate(progress)
            batches = _endless(loader)
            while self.step < self.steps and self.running():
                batch = next(batches)
                for name in self.running():
                    trainer = self.members[name]
                    trainer.epoch, trainer.epoch_batches = loader.epoch, loader.batch
                    try:
                        with self._own_rng(name):
                            trainer.record(trainer.train_step(trainer.source.prepare(batch)), progress[name])
                    except HdistillError as err:
                        self._stop_member(name, err)
                self.step += 1
                if self.val and self.running() and self.lead.validation_due(self.step):
                    self.validate(progress)
                stop = self.lead.stop_requested(self.step) and self.step < self.steps
                if stop or self.lead.checkpoint_due(self.step):
                    self.save()
                if stop:
                    raise Stopped(f"sweep: {self.stop.name or 'a stop request'} at step {self.step} of {self.steps}: "
                                  f"every member's checkpoint written ({self.out / RECORD}); run the same command to "
                                  "resume", self.stop.signum or 15)
        if self.dist.main:
            print(f"sweep: peak memory {self.peak_memory()}", file=sys.stderr)

    def validate(self, progress: dict):
        """Every running member on each held-out batch in turn, from one pass over the held-out store."""
        running = self.running()
        results = evaluate({n: self.members[n].evaluated(self.members[n].source.prepare) for n in running},
                           self.val, self.rt.workers, self.rt.device, self.dist)
        for name in running:
            self.members[name].log_validation({"step": self.step, **results[name]}, progress[name])

    def _stop_member(self, name: str, err: HdistillError):
        self.status[name] = {"state": "stopped", "step": self.members[name].step, "reason": str(err)}
        if self.dist.main:
            print(f"sweep: member {name} stopped at step {self.members[name].step}: {err}; the other members go on",
                  file=sys.stderr)

    def save(self):
        """Every running member's checkpoint, then the sweep record, then the checkpoints in place (see the module
        docstring); a member found non-finite here is stopped, and keeps its last checkpoint."""
        for name in self.running():
            try:
                self.members[name].health.check(self.step)
            except HdistillError as err:
                self._stop_member(name, err)
        for name in self.running():
            with self._own_rng(name):
                self.members[name].write_checkpoint(self.out / name / f"{PENDING}{self.step}")
        if self.dist.main:
            for name in self.running():
                if self.step == self.steps:
                    self.status[name] = {"state": "finished"}
            write_record(self.out / RECORD, {"step": self.step, "members": [
                {"name": n, "overrides": self.overrides[n], "status": self.status[n]} for n in self.members]})
            for name in self.members:
                self._settle_pending(self.out / name, self.step)
        barrier(self.dist)
        for name in self.members:
            if self.status[name]["state"] != "stopped":
                self.members[name].publish()


def member_changes(recorded: dict[str, dict], given: dict[str, dict]) -> list[str]:
    """How the members and their overrides given differ from those a sweep recorded, one phrase per change."""
    changes = [f"member {n!r} is new" for n in given if n not in recorded]
    changes += [f"member {n!r} is left out" for n in recorded if n not in given]
    for name in (n for n in given if n in recorded):
        before, now = recorded[name], given[name]
        changes += [f"member {name!r} sets {key}: {json.dumps(now.get(key))}, it had {json.dumps(before.get(key))}"
                    for key in sorted(set(before) | set(now)) if before.get(key) != now.get(key)]
    return changes


def write_record(path: Path, record: dict):
    with atomic_open(path) as f:
        f.write(json.dumps(record, indent=1).encode())


def _endless(loader: StoreLoader):
    while True:
        yield from loader


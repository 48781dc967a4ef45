"""The training loop: members stepped on the batches of one loader. A solo run (`hdistill train`) is a loop of one
member, a sweep (`hdistill train --sweep`) a loop of many; the step rules (when to log, validate, checkpoint and
agree on a stop) are written once, here, and take the loop's step.

Every batch is read, checked and moved to the device once, then stepped by every running member in turn, each with
its own stochastic-depth RNG in the global one, so that a member computes what it computes alone. The loader owns
the data position; the checkpoint stores its state_dict().
"""
from __future__ import annotations

import functools
import resource
import sys
from contextlib import ExitStack, contextmanager
from typing import TYPE_CHECKING

import torch

from hdistill.common.errors import HdistillError
from hdistill.common.processes import StopRequest, Stopped

from .checkpoint import CHECKPOINT, EXPORT, Record, RunFolder, assemble, check_resumable, rank_rng, say_extension
from .data import AllSamples
from .dist import barrier, gather_objects
from .loader import StoreLoader
from .log import MemberLog
from .member import Member
from .source import member_share
from .validate import evaluate

if TYPE_CHECKING:
    from .run import RunPlan


class Loop:
    """`members` ({name: Member}) stepped on `loader`'s batches, validated on `val` (one pass for every member),
    checkpointed into `folder` (a solo run's folder is its member's). With a `record` (a sweep's sweep.json) a
    member that fails is stopped and the others go on; without, the run stops with its error."""

    def __init__(self, plan: "RunPlan", members: dict[str, Member], loader: StoreLoader, val: AllSamples | None,
                 folder: RunFolder, record: Record | None = None, name: str = "train"):
        self.plan, self.members, self.loader, self.val = plan, members, loader, val
        self.folder, self.record, self.name = folder, record, name
        self.rt, self.dist, self.steps = plan.rt, plan.dist, plan.steps
        self.step = 0
        self.status = {n: {"state": "running"} for n in members}
        self.stop = StopRequest()                  # one request stops every member after the same step
        self.opened = False

    def running(self) -> list[str]:
        return [n for n, s in self.status.items() if s["state"] == "running"]

    @property
    def finished(self) -> bool:
        return self.step >= self.steps or not self.running()

    # ---------------------------------------------------------------- the steps

    def run(self):
        self.open()
        try:
            if self.finished:
                self.say_finished()
                return
            self.introduce()
            with self.stop.listening():
                self.train()
        finally:
            self.close()
            if self.step == 0:             # a fresh run that failed before its first step leaves the folder as it was
                self.folder.leave_as_found()
        barrier(self.dist)

    def train(self):
        """MAE's train_one_epoch, for N members and from the loader's position to the run's last step."""
        with self.logs() as logs:
            if self.val and self.step == 0:                    # where the curves start: the students as initialised
                self.validate(logs)
            batches = self.batches()
            while self.step < self.steps and self.running():
                batch = next(batches)
                for name in self.running():
                    member = self.members[name]
                    try:
                        with member.own_rng():
                            terms = member.step(member.source.prepare(batch))
                        logs[name].record(terms, self.loader.epoch)
                    except HdistillError as err:
                        self.fail(name, err)
                self.step += 1
                if self.val and self.running() and (self.step % self.plan.val_every == 0 or self.step == self.steps):
                    self.validate(logs)
                stop = self.stop_agreed() and self.step < self.steps
                if stop or self.step % self.rt.checkpoint_every == 0 or self.step == self.steps:
                    self.save()
                if stop:
                    raise Stopped(f"{self.name}: {self.stop.name or 'a stop request'} at step {self.step} of "
                                  f"{self.steps}: checkpoint written to {self.commit_point()}; run the same command "
                                  "to resume", self.stop.signum or 15)
        self.say(f"peak memory {peak_memory(self.rt.device)}")

    def batches(self):
        """The loader's batches, epoch after epoch, from its position."""
        while True:
            yield from self.loader

    @contextmanager
    def logs(self):
        """Each running member's MemberLog, for the steps of this process."""
        with ExitStack() as stack:
            logs = {}
            for name in self.running():
                logs[name] = MemberLog(self.members[name], self.plan.epochs, self.rt.log_every, self.rt.progress,
                                       self.rt.log_lines)
                stack.callback(logs[name].close)
            yield logs

    def validate(self, logs: dict[str, MemberLog]):
        """Every running member on each held-out batch in turn, from one pass over the held-out store."""
        running = self.running()
        evaluated = {n: self.members[n].evaluated(functools.partial(member_share, spec=self.members[n].val_spec))
                     for n in running}
        results = evaluate(evaluated, self.val, self.rt.workers, self.rt.device, self.dist)
        for name in running:
            logs[name].validation({"step": self.step, **results[name]})

    def stop_agreed(self) -> bool:
        """SIGTERM reached a rank; under torchrun the ranks agree after logged steps (a reduction they make anyway),
        so every rank stops after the same step."""
        if self.dist.world_size == 1:
            return bool(self.stop)
        if self.step % self.rt.log_every:
            return False
        flag = torch.tensor([1.0 if self.stop else 0.0], device=self.rt.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item())

    def fail(self, name: str, err: HdistillError):
        """A member's step or check failed: a sweep stops that member (it keeps its last checkpoint), a run of one
        stops."""
        if self.record is None:
            raise err
        member = self.members[name]
        self.status[name] = {"state": "stopped", "step": member.steps_done, "reason": str(err)}
        self.say(f"member {name} stopped at step {member.steps_done}: {err}; the other members go on")

    # ---------------------------------------------------------------- checkpoints

    def save(self):
        """Every running member's checkpoint, committed together (train.checkpoint); nothing non-finite is ever
        checkpointed: a member found so here fails (Loop.fail)."""
        for name in self.running():
            try:
                self.members[name].health.check(self.step)
            except HdistillError as err:
                self.fail(name, err)
        position = self.loader.state_dict()
        for name in self.running():
            member = self.members[name]
            rng = gather_objects(member.rng, self.dist)
            if self.dist.main:
                member.folder.write_pending(self.step, assemble(member, position, self.plan.stores, rng))
        if self.dist.main:
            if self.step == self.steps:
                self.status.update({name: {"state": "finished"} for name in self.running()})
            if self.record:
                self.record.write(self.step, self.status)
            for name, member in self.members.items():
                if self.status[name]["state"] != "stopped":
                    member.folder.publish(member, self.step, self.rt.keep_checkpoints)
            for member in self.members.values():
                member.folder.settle(self.step if self.record else None)
        barrier(self.dist)

    def commit_point(self):
        return self.record.path if self.record else self.folder.path / CHECKPOINT

    # ---------------------------------------------------------------- opening, resuming

    def open(self):
        """Take the run folder and the members', settle them to the committed step and resume every member there;
        every refusal comes before anything is written."""
        if self.opened:
            return
        self.opened = True
        try:
            self.folder.open()
            self._resume()
        except BaseException:
            self.close()
            raise

    def _resume(self):
        recorded = self.record.read() if self.record else None
        unpublished = self._settle(recorded["step"] if recorded else None)
        if recorded:
            self.status = {m["name"]: m["status"] for m in recorded["members"]}
        positions = {name: self._load(name, name in unpublished) for name in self.members}
        self.step = recorded["step"] if recorded else next(iter(self.members.values())).steps_done
        for name in self.running():
            member = self.members[name]
            if member.steps_done != self.step:
                raise HdistillError(f"{member.folder.path / CHECKPOINT} is at step {member.steps_done}, "
                                    f"{self.commit_point()} at {self.step}: the checkpoints were not written by one "
                                    "run")
        position = next((positions[n] for n in self.running() if positions[n] is not None), None)
        if position is not None:
            self.loader.load_state_dict(position)
            if not self.finished:
                for name in self.running():
                    self.members[name].say(f"resuming {self.members[name].folder.path / CHECKPOINT} at step "
                                           f"{self.step} of {self.steps} ({self.describe_position()})")

    def _settle(self, committed: int | None) -> set[str]:
        """The members' folders opened and settled to the committed step (rank 0); the members whose checkpoint was
        rolled forward before its export was written (none on other ranks)."""
        unpublished = set()
        if self.dist.main:
            for name, member in self.members.items():
                if member.folder is not self.folder:
                    member.folder.open()
                if member.folder.settle(committed):
                    unpublished.add(name)
        barrier(self.dist)
        return unpublished

    def _load(self, name: str, publish: bool) -> dict | None:
        """The member resumed from its checkpoint, if it has one, with its export written when `publish`; the
        loader position the checkpoint holds."""
        member = self.members[name]
        state = member.folder.load()
        if state is None:
            return None
        path = member.folder.path / CHECKPOINT
        check_resumable(state, member, self.plan.stores, path)
        member.load_state_dict(state, rank_rng(state, member, path))
        say_extension(state, member)
        if publish:
            member.folder.publish(member, member.steps_done, self.rt.keep_checkpoints)
        if self.status[name]["state"] == "finished" and not member.finished:     # --steps extended
            self.status[name] = {"state": "running"}
        return state["loader"]

    def describe_position(self) -> str:
        epoch, batch = self.loader.epoch, self.loader.batch
        where = f"after its batch {batch}" if batch else "at its start"
        return f"epoch {epoch + 1} of {self.plan.epochs}, {where}"

    def write_options(self, options: dict[str, bytes]):
        """Each member's config.yaml (common.options.options_yaml), which `hdistill train --config` loads again;
        written by rank 0 once the folders are open, unless the member had finished before."""
        if self.dist.main:
            for name, member in self.members.items():
                if not member.finished:
                    member.folder.write_options(options[name])

    def close(self):
        for member in self.members.values():
            member.folder.close()
        self.folder.close()

    # ---------------------------------------------------------------- what it says

    def say(self, text: str):
        if self.dist.main:
            print(f"{self.name}: {text}", file=sys.stderr, flush=True)

    def say_finished(self):
        student = f"; the student is {self.folder.path / EXPORT}" if self.record is None else ""
        self.say(f"{self.folder.path} is finished (step {self.step} of {self.steps}){student}. Give a larger --steps "
                 "or --epochs to extend it.")

    def introduce(self):
        """Once, at the start: what the data and options warn about, the views the run reads again, and each member's
        objective."""
        for warning in self.plan.warnings:
            self.say(f"warning: {warning}")
        views, epochs = self.plan.store.manifest.layout.views, self.plan.epochs
        fresh = next(iter(self.members.values())).source.record().get("fresh_views")
        if not fresh and epochs > views:
            self.say(f"{epochs} epochs from a store of {views} view(s) per image: epoch e reads view e mod {views}, "
                     f"so each view is read about {epochs / views:.0f} times. Fixed views cost held-out loss against "
                     "fresh ones (BENCHMARKS.md, Fidelity: 1 view +15.7%, 4 views +3.0% on a small run); more views "
                     "(precompute --views) or --online --fresh-views narrow it")
        for name in self.running():
            self.members[name].introduce()


def peak_memory(device: str) -> str:
    if device.startswith("cuda"):
        return f"{torch.cuda.max_memory_allocated(device) / 2 ** 30:.2f} GiB on {device}"
    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20:.2f} GiB resident (CPU)"

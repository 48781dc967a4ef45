"""The run folder: its names, its lock, what a killed run left half-written, the checkpoint (assembled, committed,
checked on resume) and its history.

A checkpoint is a two-phase commit: every member writes checkpoint.pt.pending-<step> (atomically), then the commit
point, then each member's export and history, then each pending file replaces checkpoint.pt. A run of one member
commits when its pending file is complete; a sweep when sweep.json records the step. Opened again after a kill at
any moment, a folder settles to the committed step: a pending file of that step is rolled forward (and its export
written again), any other is removed.

RUN/
  checkpoint.pt        complete state (Member.state_dict, the loader's position, every rank's RNG)
  checkpoints/         step-<step>.pt, the last --keep-checkpoints of them
  metrics.jsonl        one JSON object per logged step and evaluation (and tensorboard/)
  student.safetensors  the backbone, loadable by timm (written with every checkpoint)
  decoder.safetensors  the student's decoder, with --decoder-depth
  config.yaml          the run's options, which hdistill train --config loads again
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path

import torch

from hdistill.common.atomic import atomic_open, remove_stale_temporaries, write_error
from hdistill.common.errors import HdistillError
from hdistill.common.files import NewEntries
from hdistill.common.lock import hold_lock
from hdistill.common.options import option_name

from .config import TrainConfig
from .member import base_lr, lr_factor
from .decoder import export_decoder
from .student import export_student

CHECKPOINT = "checkpoint.pt"           # the latest checkpoint (torch.save, loads with weights_only=True)
HISTORY = "checkpoints"                # earlier checkpoints kept by --keep-checkpoints, one file per step
METRICS = "metrics.jsonl"              # one record per logged step and evaluation
EXPORT = "student.safetensors"         # the student's backbone, for timm's pretrained path
DECODER = "decoder.safetensors"        # the student's decoder (--decoder-depth), apart from the backbone
OPTIONS = "config.yaml"                # the run's options, which hdistill train --config loads again
LOCK = ".lock"                         # held while a process writes the folder
RECORD = "sweep.json"                  # a sweep's step and its members' states
PENDING = CHECKPOINT + ".pending-"     # a checkpoint of step N, written but not yet committed

LENGTH_OPTIONS = ("steps", "epochs")     # a run may be extended
STORE_OPTIONS = ("shards", "val_shards")  # a store may move (a bucket, a local copy) if its manifest is the same


class RunFolder:
    """A folder one run writes (rank 0 only): locked while open, written atomically, settled on opening."""

    def __init__(self, path: str | Path, what: str, main: bool = True):
        self.path, self.what, self.main = Path(path), what, main
        self.lock = None
        self.created: NewEntries | None = None      # what the folder held when opened, to leave it so (rank 0)

    def open(self):
        """Create the folder, lock it against a second run (released when the process dies) and remove what a killed
        writer left half-written."""
        if not self.main:
            return
        self.created = NewEntries(self.path)
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise write_error(self.path, err) from None
        self.lock = hold_lock(self.path / LOCK, f"{self.what} {self.path}")
        for name in (CHECKPOINT, EXPORT, DECODER, METRICS, OPTIONS, RECORD):
            remove_stale_temporaries(self.path / name)

    def close(self):
        if self.lock is not None:
            self.lock.close()
            self.lock = None

    def leave_as_found(self):
        """A fresh run that failed before its first step leaves the folder as it found it (config.yaml, metrics.jsonl,
        tensorboard/ and the lock removed)."""
        if self.created is not None:
            self.created.remove()

    # ---------------------------------------------------------------- the checkpoint

    def load(self) -> dict | None:
        path = self.path / CHECKPOINT
        return torch.load(path, map_location="cpu", weights_only=True) if path.exists() else None

    def write_pending(self, step: int, state: dict):
        with atomic_open(self.path / f"{PENDING}{step}") as f:
            torch.save(state, f)

    def settle(self, step: int | None) -> bool:
        """Roll the pending checkpoint of the committed `step` forward, remove any other; with None (a run of one
        member) every pending file is committed. True if one was rolled forward: its export is still to publish."""
        forward = False
        for pending in self.path.glob(PENDING + "*") if self.path.exists() else ():
            if step is None or int(pending.name[len(PENDING):]) == step:
                os.replace(pending, self.path / CHECKPOINT)      # written, committed, not yet in place: forward
                forward = True
            else:
                pending.unlink()                                 # written, never committed: back
        return forward

    def publish(self, member, step: int, keep: int):
        """What goes with the checkpoint of `step` (pending, or in place): student.safetensors (and a decoder's
        decoder.safetensors) and, with `keep`, the history."""
        export_student(member.student, self.path / EXPORT)
        if member.decoder is not None:
            export_decoder(member.decoder, self.path / DECODER)
        if keep:
            pending = self.path / f"{PENDING}{step}"
            keep_history(pending if pending.exists() else self.path / CHECKPOINT, step, keep)

    def write_options(self, options: bytes):
        with atomic_open(self.path / OPTIONS) as f:
            f.write(options)


def keep_history(checkpoint: Path, step: int, keep: int):
    """checkpoints/step-<step>.pt for `checkpoint` (a hard link: no copy), the oldest beyond `keep` removed."""
    folder = checkpoint.parent / HISTORY
    folder.mkdir(exist_ok=True)
    target = folder / f"step-{step:09d}.pt"
    target.unlink(missing_ok=True)
    try:
        os.link(checkpoint, target)
    except OSError:
        shutil.copyfile(checkpoint, target)
    for old in sorted(folder.glob("step-*.pt"))[:-keep]:
        old.unlink()


def assemble(member, loader: dict, stores: dict, rng: list[dict]) -> dict:
    """A member's checkpoint: its state, its options, the loader's position (global: any rank count resumes it), the
    stores' digests, its source and every rank's RNG, in rank order. Tensors, numbers, strings and containers only,
    so it loads with torch.load(weights_only=True)."""
    return {"config": asdict(member.cfg), **member.state_dict(), "world_size": member.dist.world_size,
            "loader": loader, "stores": stores, "source": member.source.record(), "rng": rng}


def check_resumable(state: dict, member, stores: dict, path: Path):
    """Refuse a checkpoint of another store, source or options, or beyond the run's end."""
    if "loader" not in state:
        raise HdistillError(f"{path} was written by an earlier hdistill (it holds no loader state_dict); train into a "
                            "new --out")
    old, new = json.loads(json.dumps(state["config"])), json.loads(json.dumps(asdict(member.cfg)))
    for k in STORE_OPTIONS:     # the same path may now hold another store: compare what it holds, always
        if state.get("stores", {}).get(k) != stores[k]:
            raise HdistillError(f"{option_name(TrainConfig, k)} {new[k]} is not the store {path.parent} was trained "
                                f"on (its manifest differs from the one recorded in {path}); give the run's own "
                                "store, or a new --out for a new run")
    if state["source"] != member.source.record():
        raise HdistillError(f"{path.parent} was trained from {state['source']}, this run's targets come from "
                            f"{member.source.record()}; use a new --out or the run's own --online options")
    diff = [k for k in new if old.get(k) != new[k] and k not in LENGTH_OPTIONS + STORE_OPTIONS]
    if diff:
        raise HdistillError(f"{path.parent} holds a run with other options "
                            f"({', '.join(option_name(TrainConfig, d) for d in diff)}); use a new --out or the "
                            "original options to resume (only --steps / --epochs may change, and --shards / "
                            "--val-shards may name the same store in another place)")
    if member.steps < state["step"]:
        raise HdistillError(f"{path} is at step {state['step']}; --steps/--epochs give {member.steps}, "
                            "which is behind it")


def say_extension(state: dict, member):
    """After a resume: a run given more steps than its checkpoint's keeps its warm-up and stretches its cosine."""
    if member.steps == state["steps"]:
        return
    step, before = state["step"], base_lr(member.cfg) * lr_factor(state["step"], state["steps"], member.warmup)
    member.say(f"the run is extended from {state['steps']} to {member.steps} steps: warm-up stays {member.warmup} "
               f"steps, the cosine decay now ends at step {member.steps} (lr at step {step}: {before:.3g} -> "
               f"{member.lr(step):.3g})")


def rank_rng(state: dict, member, path: Path) -> dict | None:
    """This rank's RNG from a checkpoint written by as many ranks; else None (each rank's stochastic-depth stream
    restarts at the step), said once."""
    if len(state["rng"]) == member.dist.world_size:
        return state["rng"][member.dist.rank]
    if member.cfg.drop_path > 0:
        member.say(f"{path} holds the stochastic-depth RNG of {len(state['rng'])} rank(s), this run has "
                   f"{member.dist.world_size}: each rank's stochastic-depth stream restarts at step {state['step']} "
                   "(from the seed, the rank and the step); the data order and every other state resume exactly")
    return None


class Record:
    """A sweep's sweep.json: the commit point of its members' checkpoints (the step they are at), with each member's
    overrides and state ("running", "finished", or "stopped" with its step and reason)."""

    def __init__(self, path: Path, overrides: dict[str, dict]):
        self.path, self.overrides = path, overrides

    def read(self) -> dict | None:
        """The record, refused if it holds other members or overrides than this sweep's."""
        if not self.path.exists():
            return None
        record = json.loads(self.path.read_text())
        changes = member_changes({m["name"]: m["overrides"] for m in record["members"]},
                                 json.loads(json.dumps(self.overrides)))
        if changes:
            raise HdistillError(f"{self.path.parent} holds a sweep of other members ({'; '.join(changes)}); use a new "
                                "--out, or the sweep's own file to resume")
        return record

    def write(self, step: int, status: dict[str, dict]):
        with atomic_open(self.path) as f:
            f.write(json.dumps({"step": step, "members": [
                {"name": n, "overrides": self.overrides[n], "status": status[n]} for n in self.overrides]},
                indent=1).encode())


def member_changes(recorded: dict[str, dict], given: dict[str, dict]) -> list[str]:
    """How the members and their overrides given differ from those a sweep recorded, one phrase per change."""
    changes = [f"member {n!r} is new" for n in given if n not in recorded]
    changes += [f"member {n!r} is left out" for n in recorded if n not in given]
    for name in (n for n in given if n in recorded):
        before, now = recorded[name], given[name]
        changes += [f"member {name!r} sets {key}: {json.dumps(now.get(key))}, it had {json.dumps(before.get(key))}"
                    for key in sorted(set(before) | set(now)) if before.get(key) != now.get(key)]
    return changes

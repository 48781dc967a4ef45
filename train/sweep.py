"""`hdistill train --sweep SWEEP.yaml`: K students from one pass over the store (the paper's ablation tables as one
run).

A sweep file holds the shared options (keys as in --config) and a list `members`, each a `name` and the options
it overrides (MEMBER_OPTIONS: the objective, the student, the optimiser, the mask, the initialisation seed).
The sweep is a loop of K members (train.loop): every batch is read, checked and moved to the device once, then
stepped by every member in turn (and every held-out batch evaluated by every member in turn). Each member (model,
optimiser, schedule, RNG, metrics, export) is in RUN/<member>/, and with the same options and seed it computes
exactly what `hdistill train` run alone with that member's options computes (its RUN/<member>/config.yaml is that
run's --config).

RUN/
  sweep.json            the members, their overrides and states, and the step every checkpoint below is at
  <member>/             checkpoint.pt, metrics.jsonl, tensorboard/, student.safetensors, config.yaml
  sweep-report.csv/.md  one row per member: overrides, final training loss, final and best held-out losses
  sweep-report.png      the held-out loss of every member against the step

Checkpoints are a two-phase commit whose commit point is sweep.json (train.checkpoint): a sweep killed at any
moment resumes every member at the step sweep.json records. A member that fails (a non-finite loss, a damaged
batch) is stopped and keeps its last checkpoint; the others go on.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from hdistill.common.errors import HdistillError
from hdistill.common.options import fields_by_key, params_from_yaml

from .checkpoint import RECORD, Record, RunFolder
from .config import OnlineConfig, TrainConfig, TrainRuntime
from .loop import Loop
from .member import Member
from .run import build_member, make_loop, plan_run
from .source import SharedTargets

# TrainConfig fields a member may set; every other option decides which samples a step sees, or when
MEMBER_OPTIONS = ("losses", "alpha", "beta", "standardize_targets", "feature_teacher", "relation_teacher",
                  "relation_blocks", "student_blocks", "student", "student_args", "drop_path", "student_mean",
                  "student_std", "precision", "lr", "weight_decay", "warmup_steps", "clip_grad", "mask", "init_seed",
                  "decoder_depth", "decoder_width", "decoder_heads", "reconstruct", "reconstruct_tokens")
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


def build_sweep(members: list[tuple[str, TrainConfig]], out: str, rt: TrainRuntime,
                overrides: dict[str, dict] | None = None, file: str = "the sweep") -> Loop:
    """The sweep's loop: the members (each in RUN/<member>/) over one stream of the store, committed by sweep.json."""
    out = Path(out)
    plan = plan_run(members[0][1], rt)                # the options that decide the batches are the members' shared ones
    shared = SharedTargets()
    built = {}
    for name, cfg in members:
        try:
            built[name] = build_member(cfg, plan, RunFolder(out / name, "the run", plan.dist.main), shared.member,
                                       f"train {name}")
        except HdistillError as err:
            raise HdistillError(f"{file}: member {name!r}: {err}") from None
    shared.build()
    check_memory(built, plan.rt.device)
    record = Record(out / RECORD, overrides or {name: {} for name, _ in members})
    return make_loop(plan, built, RunFolder(out, "the sweep", plan.dist.main), record=record, name="sweep")


def check_memory(members: dict[str, Member], device: str):
    """Refuse at start-up a sweep whose optimiser states cannot fit beside the built models (an estimate: gradients
    and AdamW's two moments, 3 x each member's parameters, activations on top, one member's at a time)."""
    need = sum(3 * sum(p.numel() * p.element_size() for p in m.model.parameters() if p.requires_grad)
               for m in members.values())
    if device.startswith("cuda"):
        free = torch.cuda.mem_get_info(torch.device(device))[0]
    else:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    if need > free:
        raise HdistillError(f"the sweep's {len(members)} members need about {need / 2 ** 30:.1f} GiB more for their "
                            f"gradients and optimiser states, and {device} has {free / 2 ** 30:.1f} GiB free: run "
                            "fewer members per sweep, smaller students, or more GPUs")

"""What a member's steps leave behind for people: metrics.jsonl and TensorBoard (rank 0), a progress bar on a
terminal, and a plain progress line every --log-every steps elsewhere (as under SLURM)."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from hdistill.common.processes import duration

from .checkpoint import METRICS
from .dist import mean_over_ranks


class MetricsLog:
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


class MemberLog:
    """One member's log from its current step on: `record` after each step, `validation` after each evaluation."""

    def __init__(self, member, epochs: int, log_every: int, progress: bool, lines: bool):
        self.member, self.epochs, self.log_every, self.lines = member, epochs, log_every, lines and member.dist.main
        step = member.steps_done
        self.metrics = MetricsLog(member.folder.path / METRICS, keep_until=step) \
            if member.dist.main else None
        self.bar = tqdm(total=member.steps, initial=step, unit="step", disable=not (progress and member.dist.main))
        self.last_time, self.last_step, self.first_step = time.perf_counter(), step, step + 1
        self.postfix: dict = {}

    def record(self, terms: dict[str, torch.Tensor], epoch: int):
        """After a step of epoch `epoch` (0-based): its losses at logged steps (checking they were finite)."""
        member, step = self.member, self.member.steps_done
        logged = step % self.log_every == 0 or step == member.steps
        first = step == self.first_step
        if logged or first:                                  # one reduction serves both
            member.health.check(step)
            losses = mean_over_ranks(terms, member.dist)
        if first:
            member.describe_terms(losses)
        self.bar.update(1)
        if not logged:
            return
        now = time.perf_counter()
        rate = (step - self.last_step) * member.cfg.batch_size / max(now - self.last_time, 1e-9)
        lr = member.lr(step - 1)
        if self.metrics:
            self.metrics.write({"step": step, "epoch": epoch, "lr": lr, "samples_per_s": rate, **losses})
        self.show("loss", losses["loss"])
        self.line(f"epoch {epoch + 1}/{self.epochs} loss {losses['loss']:.4f} lr {lr:.3g} {rate:.1f} samples/s "
                  f"eta {duration((member.steps - step) * member.cfg.batch_size / max(rate, 1e-9))}")
        self.last_time, self.last_step = now, step

    def validation(self, record: dict):
        if self.metrics:
            self.metrics.write(record)
        self.show("val_loss", record["val/loss"])
        self.line(f"val/loss {record['val/loss']:.4f}")

    def show(self, key: str, value: float):
        self.postfix[key] = f"{value:.4f}"
        self.bar.set_postfix(self.postfix, refresh=False)

    def line(self, text: str):
        if self.lines:
            print(f"{self.member.name}: step {self.member.steps_done}/{self.member.steps} {text}", file=sys.stderr,
                  flush=True)

    def close(self):
        self.bar.close()
        if self.metrics:
            self.metrics.close()

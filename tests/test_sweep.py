"""`hdistill train --sweep`: K students from one pass, each exactly its solo run; resume, faults, DDP, the report."""
import csv
import json
import os
import subprocess
import sys

import pytest
import torch
import yaml
from click.testing import CliRunner
from safetensors.torch import load_file

from hdistill.cli import cli
from hdistill.common.errors import HdistillError

STUDENT_ARGS = ["depth=3", "embed_dim=24", "num_heads=6"]
SHARED = {"steps": 6, "batch_size": 4, "lr": 1e-3, "workers": 0, "device": "cpu", "lane_buffer_mb": 0.02,
          "student": "vit_base_patch16_224", "student_arg": STUDENT_ARGS, "log_every": 1, "quiet": True,
          "checkpoint_every": 3}
MEMBERS = [{"name": "hybrid"},
           {"name": "alpha-0.5", "alpha": 0.5, "lr": 2e-3, "warmup_steps": 2},
           {"name": "feat-only", "loss": ["clip:feat=1"], "init_seed": 3, "drop_path": 0.1,
            "student_arg": ["depth=2", "embed_dim=24", "num_heads=6"]},
           {"name": "random-mask", "mask": "random"}]


def sweep_file(path, store, members=MEMBERS, **shared):
    path.write_text(yaml.safe_dump({"shards": str(store), **SHARED, **shared, "members": members}))
    return path


def metrics(folder):
    return [{k: v for k, v in json.loads(line).items() if k != "samples_per_s"}
            for line in (folder / "metrics.jsonl").read_text().splitlines()]


def invoke(*args):
    result = CliRunner().invoke(cli, list(map(str, args)))
    assert result.exit_code == 0, result.output
    return result


def test_each_member_is_its_solo_run_bit_for_bit_and_the_report_shows_them(stores, tmp_path):
    """The central claim: each member's per-step losses, held-out losses and weights are those of `hdistill train`
    run alone from the member's own RUN/<member>/config.yaml (CPU, same operations: equal bit for bit)."""
    run = tmp_path / "sweep"
    invoke("train", "--sweep", sweep_file(tmp_path / "sweep.yaml", stores / "full", val_shards=str(stores / "full"),
                                           val_every=3), "--out", run)
    for member in MEMBERS:
        name = member["name"]
        solo = tmp_path / "solo" / name
        invoke("train", "--config", run / name / "config.yaml", "--out", solo)
        assert metrics(run / name) == metrics(solo), name
        swept, alone = load_file(run / name / "student.safetensors"), load_file(solo / "student.safetensors")
        assert swept.keys() == alone.keys() and all(torch.equal(swept[k], alone[k]) for k in swept), name
    losses = {m["name"]: metrics(run / m["name"])[-2]["loss"] for m in MEMBERS}
    assert len(set(losses.values())) == len(MEMBERS), "the members train different students"
    # the report: one row per member, its overrides, final training loss, final and best held-out loss per term
    rows = list(csv.DictReader(open(run / "sweep-report.csv")))
    assert [r["member"] for r in rows] == [m["name"] for m in MEMBERS]
    assert rows[1]["overrides"] == 'alpha=0.5; lr=0.002; warmup_steps=2' and rows[0]["overrides"] == "(shared)"
    for row, member in zip(rows, MEMBERS):
        records = metrics(run / member["name"])
        val = [r for r in records if "val/loss" in r]
        assert float(row["train loss"]) == [r for r in records if "loss" in r][-1]["loss"]
        assert float(row["final val/loss"]) == val[-1]["val/loss"]
        assert float(row["best val/loss"]) == min(r["val/loss"] for r in val)
        assert float(row["final val/loss/feat.clip"]) == val[-1]["val/loss/feat.clip"]
    assert "| feat-only |" in (run / "sweep-report.md").read_text()
    png = (run / "sweep-report.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    again = invoke("sweep-report", run)
    assert "sweep-report.csv" in again.output


def test_members_that_need_other_samples_are_refused_by_name(stores, tmp_path):
    for member, option in [({"name": "big", "batch_size": 8}, "--batch-size"), ({"name": "long", "steps": 9}, "--steps"),
                           ({"name": "other", "shards": str(stores / "kept")}, "--shards"),
                           ({"name": "w", "workers": 1}, "--workers")]:
        result = CliRunner().invoke(cli, ["train", "--sweep", str(sweep_file(tmp_path / "s.yaml", stores / "full",
                                                                              [{"name": "a"}, member])),
                                          "--out", str(tmp_path / "run")])
        assert result.exit_code == 2 and f"member {member['name']!r}" in result.output and option in result.output, \
            result.output
        assert "is shared by every member of a sweep" in result.output
    for members, message in [([{"name": "a"}, {"name": "a"}], "two members are named 'a'"),
                             ([{"alpha": 1}], "member 1 needs a `name`"),
                             ([{"name": "a", "alfa": 1}], "'alfa' is not an option of hdistill train")]:
        result = CliRunner().invoke(cli, ["train", "--sweep", str(sweep_file(tmp_path / "s.yaml", stores / "full",
                                                                              members)), "--out", str(tmp_path / "r")])
        assert result.exit_code == 2 and message in result.output, result.output
    assert not (tmp_path / "run").exists() and not (tmp_path / "r").exists()


def test_a_sweep_that_does_not_fit_is_refused_at_start_up_with_the_estimate(stores, tmp_path, monkeypatch):
    from hdistill.train.sweep import build_sweep
    from helpers import config, runtime
    monkeypatch.setattr(os, "sysconf", lambda name: 1 if name == "SC_AVPHYS_PAGES" else 4096)   # 4 kB free
    with pytest.raises(HdistillError,
                       match=r"the sweep's 2 members need about 0\.0 GiB more for their gradients and optimiser "
                             r"states, and cpu has 0\.0 GiB free"):
        build_sweep([("a", config(stores / "kept")), ("b", config(stores / "kept", alpha=0.5))], str(tmp_path / "run"),
              runtime())
    assert not (tmp_path / "run").exists()


def test_a_member_going_non_finite_is_stopped_and_the_others_finish(stores, tmp_path):
    run = tmp_path / "sweep"
    members = [{"name": "fine"}, {"name": "blows-up", "lr": 1e12, "warmup_steps": 1, "clip_grad": 1e12}]
    result = invoke("train", "--sweep", sweep_file(tmp_path / "s.yaml", stores / "kept", members), "--out", run)
    record = json.loads((run / "sweep.json").read_text())
    status = {m["name"]: m["status"] for m in record["members"]}
    assert status["fine"] == {"state": "finished"} and record["step"] == 6
    assert status["blows-up"]["state"] == "stopped" and "NaN or Inf" in status["blows-up"]["reason"]
    assert "member blows-up stopped at step" in result.output
    assert metrics(run / "fine")[-1]["step"] == 6
    rows = list(csv.DictReader(open(run / "sweep-report.csv")))
    assert rows[1]["state"].startswith("stopped at step")


def test_the_members_left_when_the_first_one_stops_still_run_as_alone(stores, tmp_path):
    """The first member stops at once: the others' checkpoints, held-out evaluations, stop checks and, after an
    extension of the run, their loader position follow the sweep's step, not the stopped member's."""
    run = tmp_path / "sweep"
    members = [{"name": "blows-up", "lr": 1e12, "warmup_steps": 1, "clip_grad": 1e12}, {"name": "fine"}]
    file = sweep_file(tmp_path / "s.yaml", stores / "kept", members, checkpoint_every=2, val_shards=str(stores / "kept"),
                      val_every=2)
    invoke("train", "--sweep", file, "--out", run)
    invoke("train", "--sweep", file, "--out", run, "--steps", "9")
    status = {m["name"]: m["status"]["state"] for m in json.loads((run / "sweep.json").read_text())["members"]}
    assert status == {"blows-up": "stopped", "fine": "finished"}
    solo = tmp_path / "solo"
    invoke("train", "--config", run / "fine" / "config.yaml", "--out", solo, "--steps", "6")
    invoke("train", "--config", run / "fine" / "config.yaml", "--out", solo)
    assert metrics(run / "fine") == metrics(solo)
    assert [r["step"] for r in metrics(solo) if "val/loss" in r] == [0, 2, 4, 6, 8, 9]
    swept, alone = load_file(run / "fine" / "student.safetensors"), load_file(solo / "student.safetensors")
    assert all(torch.equal(swept[k], alone[k]) for k in alone)


class Killed(BaseException):
    """A kill at a chosen point (BaseException: nothing on the way catches it)."""


TWO = [{"name": "hybrid"}, {"name": "alpha-0.5", "alpha": 0.5, "init_seed": 1}]


def sweep_command(file, out):
    return [sys.executable, "-m", "hdistill", "train", "--sweep", str(file), "--out", str(out)]


def test_a_sweep_killed_at_any_point_resumes_every_member_exactly(stores, tmp_path, monkeypatch):
    from hdistill.train.checkpoint import Record, RunFolder
    file = sweep_file(tmp_path / "s.yaml", stores / "kept", TWO, steps=6, checkpoint_every=2)
    invoke("train", "--sweep", file, "--out", tmp_path / "ref")

    def same_as_reference(run, ref=tmp_path / "ref"):
        for member in TWO:
            name = member["name"]
            assert metrics(run / name) == metrics(ref / name), name
            swept, alone = load_file(run / name / "student.safetensors"), load_file(ref / name / "student.safetensors")
            assert all(torch.equal(swept[k], alone[k]) for k in alone), name

    # killed after the members' step-4 checkpoints were written, before the sweep recorded step 4: rolled back
    original = Record.write

    def dies_at_step_4(record, step, status):
        if step == 4:
            raise Killed("killed")
        original(record, step, status)
    monkeypatch.setattr(Record, "write", dies_at_step_4)
    with pytest.raises(Killed):
        CliRunner().invoke(cli, ["train", "--sweep", str(file), "--out", str(tmp_path / "back")],
                           catch_exceptions=False)
    assert sorted(p.name for p in (tmp_path / "back" / "hybrid").glob("checkpoint.pt*")) == \
        ["checkpoint.pt", "checkpoint.pt.pending-4"]
    monkeypatch.setattr(Record, "write", original)
    invoke("train", "--sweep", file, "--out", tmp_path / "back")
    same_as_reference(tmp_path / "back")

    # killed after the sweep recorded step 4, with one member's checkpoint in place and the other's pending: forward
    settle = RunFolder.settle

    def dies_half_way(folder, step):
        if step == 4 and folder.path.name == "alpha-0.5":      # hybrid's checkpoint is already in place
            raise Killed("killed")
        settle(folder, step)
    monkeypatch.setattr(RunFolder, "settle", dies_half_way)
    with pytest.raises(Killed):
        CliRunner().invoke(cli, ["train", "--sweep", str(file), "--out", str(tmp_path / "forward")],
                           catch_exceptions=False)
    assert json.loads((tmp_path / "forward" / "sweep.json").read_text())["step"] == 4
    assert (tmp_path / "forward" / "alpha-0.5" / "checkpoint.pt.pending-4").exists()
    monkeypatch.setattr(RunFolder, "settle", settle)
    invoke("train", "--sweep", file, "--out", tmp_path / "forward")
    same_as_reference(tmp_path / "forward")

    # and a real SIGKILL of the process, wherever it lands (against an uninterrupted process of the same threads)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(sweep_command(file, tmp_path / "ref1"), check=True, env=env, capture_output=True)
    out = tmp_path / "killed"
    proc = subprocess.Popen(sweep_command(file, out), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    record = out / "sweep.json"
    while proc.poll() is None and not (record.exists() and json.loads(record.read_text())["step"] >= 2):
        pass
    proc.kill()
    proc.wait()
    assert 2 <= json.loads(record.read_text())["step"] < 6, "the kill should land mid-run"
    subprocess.run(sweep_command(file, out), check=True, env=env, capture_output=True)
    same_as_reference(out, tmp_path / "ref1")


def test_a_two_rank_sweep_is_the_one_rank_sweep(stores, tmp_path):
    """Every member is data-parallel over the same ranks: 2 ranks give the losses of 1 to float reduction order
    (no stochastic depth, which draws per rank)."""
    members = [{"name": "hybrid", "drop_path": 0.0}, {"name": "alpha-0.5", "alpha": 0.5, "drop_path": 0.0}]
    file = sweep_file(tmp_path / "s.yaml", stores / "kept", members, steps=4)
    invoke("train", "--sweep", file, "--out", tmp_path / "one")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    result = subprocess.run(torchrun + sweep_command(file, tmp_path / "two")[1:], capture_output=True, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("sweep of 2 members finished") == 1
    for member in members:
        one, two = metrics(tmp_path / "one" / member["name"]), metrics(tmp_path / "two" / member["name"])
        assert [r["step"] for r in two] == [1, 2, 3, 4]
        for a, b in zip(one, two):
            assert b["loss"] == pytest.approx(a["loss"], rel=1e-4), (member["name"], a["step"])


def test_sweep_messages_name_the_file_the_member_and_what_changed(stores, tmp_path):
    latin = tmp_path / "latin.yaml"
    latin.write_bytes("shards: x\nmembers: [{name: caf\xe9}]\n".encode("latin-1"))
    result = CliRunner().invoke(cli, ["train", "--sweep", str(latin), "--out", str(tmp_path / "r")])
    assert result.exit_code == 2 and f"{latin}: not UTF-8 text (byte " in result.output and \
        "Traceback" not in result.output, result.output
    for member, message in [({"name": "bad", "loss": ["clip:fet=1"]}, "--loss 'clip:fet=1': expected"),
                            ({"name": "grid", "student_arg": ["patch_size=8", *STUDENT_ARGS]}, "patch grid mismatch")]:
        file = sweep_file(tmp_path / "s.yaml", stores / "kept", [{"name": "a"}, member])
        result = CliRunner().invoke(cli, ["train", "--sweep", str(file), "--out", str(tmp_path / "r")])
        assert result.exit_code == 1 and f"{file}: member {member['name']!r}: " in result.output and message in \
            result.output, result.output
    assert not (tmp_path / "r").exists()
    # a sweep of 3 epochs over 2 views says so once, counts epochs from 1, and a resume names what changed
    members = [{"name": "a", "alpha": 0.5}, {"name": "b"}]
    file = sweep_file(tmp_path / "s.yaml", stores / "kept", members, steps=9, quiet=False, log_every=9)
    result = invoke("train", "--sweep", file, "--out", tmp_path / "run")
    assert result.output.count("epoch e reads view e mod 2") == 1, result.output
    assert "step 9/9 epoch 3/3 loss" in result.output
    file = sweep_file(tmp_path / "s.yaml", stores / "kept", [{"name": "a", "alpha": 0.7}, {"name": "c"}], steps=12)
    result = CliRunner().invoke(cli, ["train", "--sweep", str(file), "--out", str(tmp_path / "run")])
    assert result.exit_code == 1
    assert "member 'c' is new; member 'b' is left out; member 'a' sets alpha: 0.7, it had 0.5" in result.output

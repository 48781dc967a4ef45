"""Precompute as separate processes: SIGKILL then resume, and a 2-process torchrun run."""
import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import zarr

from helpers import precompute_command as command, precompute_env as env, write_photos

HERE = Path(__file__).resolve().parent


def store_digest(store: Path) -> dict:
    """Every committed file's sha256 and every zarr array's content, by relative path. locks/ holds the pid
    of each rank's last writer: bookkeeping, not content."""
    out = {}
    for path in sorted(store.rglob("*")):
        rel = path.relative_to(store)
        if path.is_file() and not path.name.startswith(".") and not {"targets.zarr", "locks"} & set(rel.parts):
            out[str(rel)] = hashlib.sha256(path.read_bytes()).hexdigest()
    group = zarr.open_group(store / "targets.zarr", mode="r")
    for name, member in group.members(max_depth=None):
        if isinstance(member, zarr.Array):
            values = member[:]
            data = repr(values.tolist()).encode() if values.dtype.kind not in "biuf" else values.tobytes()
            out[f"zarr:{name}"] = hashlib.sha256(data).hexdigest()
    return out


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("photos")
    write_photos(folder, 24, seed=3)
    return folder


@pytest.fixture(scope="module")
def reference_store(photos, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "store"
    subprocess.run(command(photos, out, "--views", "2", "--shard-size", "2"), check=True, env=env(),
                   capture_output=True)
    return out


def test_sigkill_then_resume_gives_identical_store(photos, reference_store, tmp_path):
    out = tmp_path / "store"
    commits = out / "commits"
    proc = subprocess.Popen(command(photos, out, "--views", "2", "--shard-size", "2"), env=env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not (commits.exists() and len(list(commits.glob("*.json"))) >= 3):
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(list(commits.glob("*.json")))
    assert 3 <= done < 24, f"the kill should land mid-run ({done} of 24 shards committed)"
    subprocess.run(command(photos, out, "--views", "2", "--shard-size", "2"), check=True, env=env(),
                   capture_output=True)
    assert store_digest(out) == store_digest(reference_store)
    assert not [p for p in out.rglob(".*tmp-*")], "temporaries of the killed run are gone"


def test_sigterm_commits_whole_shards_only_and_the_rerun_gives_the_identical_store(photos, reference_store, tmp_path):
    out = tmp_path / "store"
    commits = out / "commits"
    # SIGTERM to the whole process group, as a scheduler sends it; the loader workers must not die before the parent
    proc = subprocess.Popen(command(photos, out, "--views", "2", "--shard-size", "2", "--workers", "2"), env=env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (commits.exists() and len(list(commits.glob("*.json"))) >= 2):
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 143, stderr.decode()
    done = len(list(commits.glob("*.json")))
    assert 2 <= done < 24
    assert f"precompute: SIGTERM: stopped after committing {done} whole shard(s)" in stderr.decode()
    assert "Traceback" not in stderr.decode()
    subprocess.run(command(photos, out, "--views", "2", "--shard-size", "2"), check=True, env=env(),
                   capture_output=True)
    assert store_digest(out) == store_digest(reference_store)


def test_progress_lines_when_stderr_is_not_a_terminal(photos, tmp_path):
    cmd = [c for c in command(photos, tmp_path / "store", "--views", "2", "--shard-size", "4") if c != "--quiet"]
    result = subprocess.run(cmd, env=env(), capture_output=True, text=True, check=True)
    lines = [line for line in result.stderr.splitlines() if line.startswith("precompute: ") and "views (" in line]
    assert lines[0].startswith("precompute: 4/48 views (8%), ") and "views/s, eta " in lines[0]
    assert lines[-1].startswith("precompute: 48/48 views (100%), 12/12 shards committed, 0 skipped, ")


def test_two_process_torchrun_equals_single_process(photos, reference_store, tmp_path):
    out = tmp_path / "store"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    result = subprocess.run(torchrun + command(photos, out, "--views", "2", "--shard-size", "2")[1:],
                            env=env(), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "store complete" in result.stdout
    assert store_digest(out) == store_digest(reference_store)


def test_array_job_ranks_complete_the_store_when_the_last_finishes(photos, reference_store, tmp_path):
    out = tmp_path / "store"
    args = ["--views", "2", "--shard-size", "2", "--world-size", "3"]
    for rank in (2, 0, 1):
        result = subprocess.run(command(photos, out, *args, "--rank", str(rank)), env=env(),
                                capture_output=True, text=True, check=True)
        assert ("store complete" in result.stdout) == (rank == 1)
    assert store_digest(out) == store_digest(reference_store)


HOLD_LOCK = """
import sys, time
from hdistill.shards.writer import StoreWriter
from hdistill.shards.manifest import read_manifest
writer = StoreWriter(sys.argv[1], read_manifest(sys.argv[1]))
writer.lock_rank(int(sys.argv[2]), int(sys.argv[3]))
print("locked", flush=True)
time.sleep(120)
"""


def test_a_second_writer_of_the_same_rank_is_refused_until_the_first_dies(photos, reference_store, tmp_path):
    out = tmp_path / "store"
    args = ["--views", "2", "--shard-size", "2", "--limit", "8"]
    subprocess.run(command(photos, out, *args, "--world-size", "2", "--rank", "1"), check=True, env=env(),
                   capture_output=True)                      # makes the store; rank 1's shards are done
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(out), "0", "2"], env=env(),
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        refused = subprocess.run(command(photos, out, *args, "--world-size", "2", "--rank", "0"), env=env(),
                                 capture_output=True, text=True)
        assert refused.returncode == 1
        assert f"rank 0 of 2 is being written by pid {holder.pid}" in refused.stderr, refused.stderr
        assert not list((out / "commits").glob("view*-000000.json")), "the refused run wrote nothing"
        # another rank's lock is another file: rank 1 is free
        subprocess.run(command(photos, out, *args, "--world-size", "2", "--rank", "1"), check=True, env=env(),
                       capture_output=True)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    done = subprocess.run(command(photos, out, *args, "--world-size", "2", "--rank", "0"), env=env(),
                          capture_output=True, text=True)
    assert done.returncode == 0 and "store complete" in done.stdout, done.stderr

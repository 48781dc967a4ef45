"""Digests of what hdistill writes, to show that a change of code leaves its behaviour as it was, bit for bit.

    python benchmarks/behaviour.py > before.txt       # on the commit before the change
    python benchmarks/behaviour.py > after.txt        # on the change, same machine
    diff before.txt after.txt                         # no output: the same stores and the same runs

Through the command line only (what a user runs, whatever the code's inner shape), on the CPU with tiny teachers
and students of random weights:
  stores   `hdistill precompute` with several option sets (the exact kept store in both forms, the compact default,
           a --tokens full store, int8): the sha256 of every file, the lock files left out
  solo     `hdistill train` from the exact store, with validation and a checkpoint mid-run, then resumed to more
           steps: metrics.jsonl (throughput and times left out), the checkpoint's and the export's tensors
  sweep    `hdistill train --sweep` of three members: each member's metrics.jsonl and exported tensors
A float that differs in its last bit changes a digest; the figures are only comparable on one machine and one
torch build, so run both sides in the same environment.
"""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

TEACHERS = ["--teachers", "mae,clip", "--random-init", "--image-size", "64", "--batch-size", "4", "--shard-size", "4",
            "--model", "mae=vit_base_patch16_224", "--model-arg", "mae.depth=4", "--model-arg", "mae.embed_dim=32",
            "--model-arg", "mae.num_heads=4", "--model", "clip=vit_base_patch16_clip_quickgelu_224",
            "--model-arg", "clip.depth=3", "--model-arg", "clip.embed_dim=24", "--model-arg", "clip.num_heads=3",
            "--quiet"]
EXACT = ["--encoding", "fp16", "--pixels", "raw", "--compress", "none"]
STORES = {                                   # name -> precompute options beyond TEACHERS
    "exact": [*EXACT, "--format", "wds,zarr", "--views", "2"],
    "compact": [],
    "full": [*EXACT, "--tokens", "full"],
    "int8": ["--encoding", "int8", "--pixels", "raw", "--compress", "none"],
}
STUDENT = ["--student", "vit_base_patch16_224", "--student-arg", "depth=3", "--student-arg", "embed_dim=24",
           "--student-arg", "num_heads=6"]
RUN = ["--batch-size", "4", "--workers", "0", "--device", "cpu", "--lane-buffer-mb", "0.02", "--log-every", "1",
       "--quiet", *STUDENT]
VARYING = {"samples_per_s"}      # metrics that measure the machine, not the run


def hdistill(*args: str):
    result = subprocess.run([sys.executable, "-m", "hdistill", *args], capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(f"hdistill {' '.join(args)} failed:\n{result.stdout[-2000:]}{result.stderr[-2000:]}")


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def store_lines(name: str, store: Path) -> list[str]:
    return [f"store {name} {f.relative_to(store)} {sha(f.read_bytes())}" for f in sorted(store.rglob("*"))
            if f.is_file() and "locks" not in f.relative_to(store).parts]


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for key in sorted(tensors):
        h.update(key.encode() + tensors[key].reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def run_lines(label: str, run: Path) -> list[str]:
    metrics = [{k: v for k, v in json.loads(line).items() if k not in VARYING}
               for line in (run / "metrics.jsonl").read_text().splitlines()]
    lines = [f"{label} metrics {sha(json.dumps(metrics, sort_keys=True).encode())} ({len(metrics)} lines)"]
    for f in sorted(run.glob("*.safetensors")):
        lines.append(f"{label} {f.name} {tensors_digest(load_file(f))}")
    checkpoint = run / "checkpoint.pt"
    if checkpoint.exists():
        state = torch.load(checkpoint, weights_only=True)
        flat = {}

        def walk(prefix, value):
            if isinstance(value, torch.Tensor):
                flat[prefix] = value
            elif isinstance(value, dict):
                for k, v in value.items():
                    walk(f"{prefix}.{k}", v)
            elif isinstance(value, (list, tuple)):
                for i, v in enumerate(value):
                    walk(f"{prefix}.{i}", v)
        walk("", state)
        lines.append(f"{label} checkpoint tensors {tensors_digest(flat)} ({len(flat)})")
    return lines


def main():
    lines = [f"# torch {torch.__version__}"]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for name, options in STORES.items():
            hdistill("precompute", "--data", "synthetic:12", "--out", str(tmp / name), *TEACHERS, *options)
            lines += store_lines(name, tmp / name)
        exact = str(tmp / "exact")
        solo = tmp / "solo"
        hdistill("train", "--shards", exact, "--val-shards", exact, "--val-every", "3", "--checkpoint-every", "3",
                 "--out", str(solo), "--steps", "6", *RUN)
        lines += run_lines("solo", solo)
        hdistill("train", "--shards", exact, "--val-shards", exact, "--val-every", "3", "--checkpoint-every", "3",
                 "--out", str(solo), "--steps", "9", *RUN)
        lines += run_lines("solo resumed to 9", solo)
        members = [{"name": "hybrid"}, {"name": "alpha", "alpha": 0.5, "lr": 2e-3},
                   {"name": "random-mask", "mask": "random", "init_seed": 3}]
        sweep = {"shards": str(tmp / "full"), "steps": 6, "batch_size": 4, "workers": 0, "device": "cpu",
                 "lane_buffer_mb": 0.02, "log_every": 1, "quiet": True, "checkpoint_every": 3,
                 "student": STUDENT[1], "student_arg": STUDENT[3::2], "members": members}
        (tmp / "sweep.yaml").write_text(yaml.safe_dump(sweep))
        hdistill("train", "--sweep", str(tmp / "sweep.yaml"), "--out", str(tmp / "sweep"))
        for member in members:
            lines += run_lines(f"sweep {member['name']}", tmp / "sweep" / member["name"])
    print("\n".join(lines))


if __name__ == "__main__":
    main()

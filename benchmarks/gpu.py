"""The GPU check: what to run first on a machine with a GPU. One table, in a few minutes on one H100 / H200.

    bash benchmarks/gpu.sh             # CUDA, bf16, ViT-S and ViT-B students, ViT-B teachers
    bash benchmarks/gpu.sh --smoke     # the same path at toy sizes on the CPU (part of the test suite)

Rows:
  student   the student's training samples/s (forward, backward, AdamW) on a batch already on the device,
            eager and torch.compile, for ViT-S/16 and ViT-B/16 (bf16 autocast on CUDA)
  loader    the store loader's samples/s with 1, 2, 4, 8 workers (the fp16 MAE + CLIP ViT-B shapes)
  precompute  the teachers' plain forward and the whole precompute run, images/s, and their ratio
  online    ViT-B student steps with stored targets against live teachers (samples/s, ratio)
  resume    a bf16 run killed at a checkpoint and resumed: its losses against an uninterrupted run
  jpeg      the store's JPEG mosaics decoded on the device (nvJPEG, TorchCodec) against the loader's CPU decode
            (libjpeg-turbo): how many views come out bit for bit, the largest difference, the device's rate

Teachers have random weights (speed does not depend on them); images are generated.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from loader import loader_rate  # noqa: E402  (benchmarks/loader.py)
from precompute import teachers_only  # noqa: E402
from train import rate, sync  # noqa: E402  (benchmarks/train.py)

from hdistill.online import live_targets  # noqa: E402
from hdistill.precompute.config import PrecomputeConfig, Runtime  # noqa: E402
from hdistill.precompute.run import run_precompute  # noqa: E402
from hdistill.precompute.teachers import build_teachers  # noqa: E402
from hdistill.train.config import OnlineConfig, TrainConfig, TrainRuntime  # noqa: E402
from hdistill.train.run import solo  # noqa: E402

FULL = dict(images=1024, batch=256, steps=20, workers=[1, 2, 4, 8], resume_steps=200, image_size=224,
            compile=(False, True), teachers={"mae": {}, "clip": {}}, students={"ViT-S/16": ("vit_small_patch16_224", {}),
                                                        "ViT-B/16": ("vit_base_patch16_224", {})})
TINY_VIT = {"depth": 3, "embed_dim": 32, "num_heads": 2}
# (the smoke leaves torch.compile out: a cold compile costs the test suite 25 s, and tests/test_train.py compiles the
# same loop and member)
SMOKE = dict(images=16, batch=4, steps=2, workers=[0, 1], resume_steps=8, image_size=32, compile=(False,),
             teachers={"mae": {**TINY_VIT, "depth": 4}, "clip": TINY_VIT},
             students={"tiny": ("vit_base_patch16_224", TINY_VIT)})


def make_store(tmp: str, size: dict, device: str, precision: str) -> str:
    store = f"{tmp}/store"
    run_precompute(precompute_config(size, precision, f"synthetic:{size['images']}"), store,
                   Runtime(device=device, workers=0, quiet=True))
    return store


def precompute_config(size: dict, precision: str, data: str) -> PrecomputeConfig:
    return PrecomputeConfig(data=data, teachers=["mae", "clip"], model_args=size["teachers"], random_init=True,
                            batch_size=size["batch"], shard_size=max(4, size["images"] // 8), formats=["wds"],
                            image_size=size["image_size"], precision=precision)


def student_rows(store: str, size: dict, device: str, out: str) -> list[tuple[str, str]]:
    rows = []
    for label, (name, args) in size["students"].items():
        for compiled in size["compile"]:
            cfg = TrainConfig(shards=store, student=name, student_args=args, steps=10_000, batch_size=size["batch"])
            loop = solo(cfg, f"{out}/{label}-{compiled}", TrainRuntime(device=device, quiet=True, compile=compiled))
            member = loop.members["train"]
            batch = next(loop.batches())
            steps = rate(lambda: member.step(batch), device, 3 if compiled else 2, size["steps"])
            rows.append((f"student {label} {'compile' if compiled else 'eager'} {member.precision}",
                         f"{steps * size['batch']:.0f} samples/s"))
    return rows


def loader_rows(store: str, size: dict) -> list[tuple[str, str]]:
    lanes = 8 if size["batch"] % 8 == 0 else 2
    return [(f"loader {w} worker(s)", f"{loader_rate(store, w, size['batch'], lanes, 2, 'progressive', 'wds'):.0f} "
             "samples/s") for w in size["workers"]]


def precompute_rows(tmp: str, size: dict, device: str, precision: str) -> list[tuple[str, str]]:
    cfg = precompute_config(size, precision, f"synthetic:{size['images']}")
    teachers = build_teachers(cfg, device)
    forward = teachers_only(teachers, cfg, device, size["images"])
    start = time.perf_counter()
    sync(device)
    manifest = run_precompute(cfg, f"{tmp}/precompute", Runtime(device=device, workers=4 if device != "cpu" else 0,
                                                                quiet=True), teachers)
    sync(device)
    whole = manifest.samples / (time.perf_counter() - start)
    return [("precompute: teachers' forward", f"{forward:.0f} images/s"),
            ("precompute: end to end", f"{whole:.0f} images/s ({100 * whole / forward:.0f}% of the forward)")]


def online_rows(store: str, size: dict, device: str, out: str) -> list[tuple[str, str]]:
    name, args = list(size["students"].values())[-1]
    cfg = TrainConfig(shards=store, student=name, student_args=args, steps=10_000, batch_size=size["batch"])
    figures = {}
    for label, source in (("offline", {}), ("online", {"source": live_targets(OnlineConfig(online=True))})):
        loop = solo(cfg, f"{out}/{label}", TrainRuntime(device=device, quiet=True), **source)
        member, batches = loop.members["train"], loop.batches()
        figures[label] = rate(lambda: member.step(member.source.prepare(next(batches))), device, 2,
                              size["steps"]) * size["batch"]
    return [("offline student (stored targets)", f"{figures['offline']:.0f} samples/s"),
            ("online student (live teachers)", f"{figures['online']:.0f} samples/s "
                                               f"(offline is {figures['offline'] / figures['online']:.1f}x)")]


def resume_rows(store: str, size: dict, device: str, out: str) -> list[tuple[str, str]]:
    """A run killed (SIGKILL) right after a checkpoint, resumed, against the same run uninterrupted."""
    name, args = list(size["students"].values())[0]
    steps = size["resume_steps"]
    every = max(2, steps // 4)

    def command(run):
        return [sys.executable, "-m", "hdistill", "train", "--shards", store, "--out", run, "--steps", str(steps),
                "--batch-size", str(size["batch"]), "--device", device, "--log-every", "1", "--checkpoint-every",
                str(every), "--student", name, "--quiet", "--workers", "0",
                *[a for k, v in args.items() for a in ("--student-arg", f"{k}={v}")]]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(command(f"{out}/whole"), check=True, env=env, capture_output=True)
    proc = subprocess.Popen(command(f"{out}/killed"), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoint = Path(out, "killed", "checkpoint.pt")
    while proc.poll() is None and not checkpoint.exists():
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = torch.load(checkpoint, weights_only=True)["step"] if checkpoint.exists() else steps
    subprocess.run(command(f"{out}/killed"), check=True, env=env, capture_output=True)
    read = lambda run: [json.loads(line)["loss"] for line in Path(out, run, "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    whole, resumed = read("whole"), read("killed")
    exact = len(whole) == len(resumed) == steps and whole == resumed
    return [(f"resume: killed at step {killed_at} of {steps}, resumed",
             "losses equal bit for bit" if exact else f"LOSSES DIFFER (max {max(abs(a - b) for a, b in zip(whole, resumed)):.3g})")]


def jpeg_rows(store: str, device: str, repeats: int = 5) -> list[tuple[str, str]]:
    """The store's pixels.jpg members, decoded as one list on `device` and one by one on the CPU (the loader's
    decoder, which gave the teacher's pixels): the measurement a GPU decode of compact stores waits for."""
    from torchcodec.decoders import decode_jpeg

    from hdistill.shards import tarindex
    from hdistill.shards.manifest import read_manifest
    from hdistill.shards.reader import StoreReader

    manifest = read_manifest(store)
    reader = StoreReader(store, manifest)
    data = []
    for shard in manifest.shards:
        buf = reader.load(shard)
        data += [bytes(buf[o:o + n]) for _, entries in tarindex.samples(buf) for o, n in [entries["pixels.jpg"]]]
    on_cpu = [decode_jpeg(d) for d in data]
    try:
        on_device = [t.cpu() for t in decode_jpeg(data, device=device)]
    except Exception as err:  # noqa: BLE001 - the table's other rows stand; this one says what failed
        return [(f"jpeg: decoded on {device}", f"FAILED: {type(err).__name__}: {err}")]
    same = sum(torch.equal(a, b) for a, b in zip(on_cpu, on_device))
    worst = max(int((a.int() - b.int()).abs().max()) for a, b in zip(on_cpu, on_device))
    mean = sum(float((a.float() - b.float()).abs().mean()) for a, b in zip(on_cpu, on_device)) / len(data)
    sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        decode_jpeg(data, device=device)
    sync(device)
    per_s = repeats * len(data) / (time.perf_counter() - start)
    return [(f"jpeg: {len(data)} mosaics decoded on {device} against the CPU",
             f"{same} bit for bit; largest difference {worst}, mean {mean:.3f} levels; {per_s:.0f} mosaics/s")]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="toy sizes on the CPU: the same path, in seconds")
    args = ap.parse_args()
    size = SMOKE if args.smoke else FULL
    device = "cpu" if args.smoke else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu.sh: no CUDA device here; run with --smoke for the CPU path")
    precision = "fp32" if args.smoke else "bf16"
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU (smoke sizes)"
    rows = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        store = make_store(tmp, size, device, precision)
        for part in (lambda: student_rows(store, size, device, f"{tmp}/student"),
                     lambda: loader_rows(store, size),
                     lambda: precompute_rows(tmp, size, device, precision),
                     lambda: online_rows(store, size, device, f"{tmp}/online"),
                     lambda: resume_rows(store, size, device, f"{tmp}/resume"),
                     lambda: jpeg_rows(store, device)):
            rows += part()
    width = max(len(label) for label, _ in rows)
    print(f"GPU check: {name}; torch {torch.__version__}; teachers {precision}; batch {size['batch']}; "
          f"{time.perf_counter() - started:.0f} s")
    print(f"| {'what':{width}s} | figure |\n| {'-' * width} | --- |")
    for label, figure in rows:
        print(f"| {label:{width}s} | {figure} |")
    if any("DIFFER" in figure for _, figure in rows):
        raise SystemExit(1)


if __name__ == "__main__":
    main()

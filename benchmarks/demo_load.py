"""The demo's time on an idle CPU and beside one busy process, and where it goes.

Runs `hdistill demo` (the README's first command) as a subprocess and times each of its stages from its own
output lines: start-up (imports), precompute, train, analyze. "Busy" runs it beside one other process that keeps
both cores' worth of threads working (a 2-thread torch matmul loop, the kind of neighbour a shared machine or CI
has). `--wait-policy` also runs it with OpenMP's spinning threads (OMP_WAIT_POLICY=ACTIVE, torch's default before
hdistill set PASSIVE), the cause of the 10x slowdown beside a busy process.

    python benchmarks/demo_load.py                          # idle and busy, PASSIVE: about 4 minutes on 2 cores
    python benchmarks/demo_load.py --wait-policy PASSIVE,ACTIVE --steps 60
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

HOG = """
import time, torch
torch.set_num_threads(2)
a = torch.randn(512, 512)
end = time.time() + 1800
while time.time() < end:
    a = (a @ a).tanh()
"""
STAGES = [("demo: 1/3", "start-up"), ("demo: 2/3", "precompute"), ("demo: 3/3", "train"), ("demo: done", "analyze")]


def run_demo(steps: int, policy: str) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "OMP_WAIT_POLICY": policy}
        start = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "hdistill", "demo", "--out", tmp, "--steps", str(steps)],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        times, last = {}, start
        for line in proc.stdout:
            for prefix, stage in STAGES:
                if line.startswith(prefix):
                    now = time.perf_counter()
                    times[stage], last = now - last, now
        if proc.wait():
            raise SystemExit(f"hdistill demo failed with exit code {proc.returncode}")
        times["total"] = time.perf_counter() - start
    return times


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=300, help="student steps (the demo's default: 300)")
    ap.add_argument("--wait-policy", default="PASSIVE", help="comma-separated OMP_WAIT_POLICY values to run")
    args = ap.parse_args()
    print(f"{os.cpu_count()} CPUs; hdistill demo --steps {args.steps}")
    print(f"{'machine':8s} {'policy':8s} " + " ".join(f"{s:>10s}" for _, s in STAGES) + f" {'total s':>8s}")
    for policy in args.wait_policy.split(","):
        for busy in (False, True):
            hog = subprocess.Popen([sys.executable, "-c", HOG]) if busy else None
            try:
                if hog:
                    time.sleep(2)
                times = run_demo(args.steps, policy)
            finally:
                if hog:
                    hog.kill()
                    hog.wait()
            print(f"{'busy' if busy else 'idle':8s} {policy:8s} " +
                  " ".join(f"{times.get(s, float('nan')):10.1f}" for _, s in STAGES) + f" {times['total']:8.1f}",
                  flush=True)


if __name__ == "__main__":
    main()

"""The training loader's bandwidth: samples/s and GB/s with N workers, from local disk and from an S3 endpoint.

    python benchmarks/loader.py                                  # local disk, then a local S3 endpoint (moto)
    python benchmarks/loader.py --s3 s3://bucket/prefix          # local disk, then a real bucket (AWS_* variables)
    python benchmarks/loader.py --workers 0,2,4,8 --images 2048

A store with the default MAE + CLIP ViT-B/16 target shapes (feat.clip [69, 768], rel.mae.b9/b10 [12, 69, 69],
the kept store's 68 patches + CLS) is made by precompute from teachers of ViT-B width and heads but 3 blocks
with random weights: the loader's cost depends on the bytes per view, not on the teachers' depth or weights.
It is uploaded to the endpoint, and each source is read for one epoch through the trainer's loader
(StoreStream in a DataLoader, --lanes lanes, the workers sharing them). GB/s counts the store's bytes per view
(shards, commit records and manifest) times the samples delivered. The local endpoint is moto's Python server
on the same machine: it measures the client's path (ranged GETs through s3fs), not S3's bandwidth.
Then: the read bandwidth per GPU that a student needs at a given samples/s, for this store and its int8 form.
"""
from __future__ import annotations

import argparse
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager

import torch

from hdistill.precompute.run import PrecomputeConfig, Runtime, run_precompute
from hdistill.shards.format import store_bytes
from hdistill.train.data import StoreStream, open_store

VIT_B_SHALLOW = {"mae": {"depth": 3}, "clip": {"depth": 3}}   # ViT-B/16 width and heads; 3 blocks
INT8_KB_PER_VIEW = 233.3         # BENCHMARKS.md, the same store with --encoding int8


@contextmanager
def local_endpoint():
    """A moto S3 server on 127.0.0.1 in its own process (not competing with the loader for the GIL), with
    the AWS variables pointing at it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.1)
        os.environ.update(AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}", AWS_ACCESS_KEY_ID="bench",
                          AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1",
                          AWS_EC2_METADATA_DISABLED="true")
        yield
    finally:
        server.terminate()
        server.wait()


def loader_rate(store: str, workers: int, batch_size: int, lanes: int, epochs: int) -> float:
    """Samples/s of the training loader over `epochs` passes of the store, after a first pass that starts the
    workers (kept: persistent) and opens the connections."""
    manifest = open_store(store)
    stream = StoreStream(store, manifest, manifest.targets, "progressive", seed=0, lanes=lanes,
                         batch_size=batch_size, buffer_mb=16)
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=workers,
                                         prefetch_factor=4 if workers else None, persistent_workers=workers > 0)
    samples = 0
    for epoch in range(epochs + 1):
        if epoch == 1:
            samples, start = 0, time.perf_counter()
        for piece in loader:
            if "error" in piece:
                raise RuntimeError(piece["error"])
            samples += piece["samples"]["count"]
    return samples / (time.perf_counter() - start)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=512)
    ap.add_argument("--shard-size", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lanes", type=int, default=4,
                    help="lanes of the epoch; few, so that a lane spans whole shards at this small scale (a lane "
                         "streams its first shard from the start: at ImageNet scale that is one shard in hundreds)")
    ap.add_argument("--workers", default="0,1,2", help="comma-separated loader worker counts")
    ap.add_argument("--epochs", type=int, default=3, help="timed passes over the store, after one untimed")
    ap.add_argument("--s3", default=None, help="an s3:// prefix to upload the store to (default: a local endpoint)")
    ap.add_argument("--rates", default="500,1000,2000,4000",
                    help="student samples/s per GPU for the bandwidth table")
    args = ap.parse_args()
    workers = [int(w) for w in args.workers.split(",")]

    with tempfile.TemporaryDirectory() as tmp, (local_endpoint() if args.s3 is None else _nothing()):
        local = f"{tmp}/store"
        start = time.perf_counter()
        manifest = run_precompute(
            PrecomputeConfig(data=f"synthetic:{args.images}", teachers=["mae", "clip"], model_args=VIT_B_SHALLOW,
                             random_init=True, batch_size=32, shard_size=args.shard_size, formats=["wds"]),
            local, Runtime(workers=min(2, os.cpu_count() or 1), progress=False))
        per_view = store_bytes(local) / manifest.samples
        print(f"store: {manifest.samples} views, {per_view / 1000:.1f} kB/view, targets "
              f"{', '.join(f'{t.name} {list(t.shape)}' for t in manifest.targets)} "
              f"(made in {time.perf_counter() - start:.0f}s)")

        import s3fs
        remote = args.s3 or "s3://hdistill-bench/store"
        fs = s3fs.S3FileSystem()
        if args.s3 is None:
            fs.mkdir("hdistill-bench")
        fs.put(local, remote.removeprefix("s3://"), recursive=True)

        print(f"machine: {platform.processor() or 'cpu'}, {os.cpu_count()} cpus; torch {torch.__version__}; "
              f"batch {args.batch_size}, {args.lanes} lanes; endpoint {os.environ.get('AWS_ENDPOINT_URL', 'AWS')}")
        print(f"{'source':28s} {'workers':>7s} {'samples/s':>10s} {'GB/s':>7s}")
        for label, store in [("local disk", local), (remote, remote)]:
            for w in workers:
                rate = loader_rate(store, w, args.batch_size, args.lanes, args.epochs)
                print(f"{label:28s} {w:7d} {rate:10.0f} {rate * per_view / 1e9:7.3f}")

    print(f"\nread bandwidth one GPU needs (samples/s x bytes/view; {per_view / 1000:.0f} kB/view fp16, "
          f"{INT8_KB_PER_VIEW:.0f} kB/view int8):")
    for r in (int(x) for x in args.rates.split(",")):
        print(f"  {r:5d} samples/s: {r * per_view / 1e9:5.2f} GB/s fp16, {r * INT8_KB_PER_VIEW * 1e3 / 1e9:5.2f} GB/s "
              f"int8; 8 GPUs: {8 * r * per_view / 1e9:5.1f} GB/s")


@contextmanager
def _nothing():
    yield


if __name__ == "__main__":
    main()

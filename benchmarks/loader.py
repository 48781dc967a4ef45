"""The training loader's rate: samples/s and GB/s per loader process, next to a plain memory copy of the same bytes.

    python benchmarks/loader.py                                  # local disk, then a local S3 endpoint (moto)
    python benchmarks/loader.py --s3 s3://bucket/prefix          # local disk, then a real bucket (AWS_* variables)
    python benchmarks/loader.py --workers 0,2,4,8 --images 2048

Stores with the default MAE + CLIP ViT-B/16 target shapes (feat.clip [69, 768], two relation blocks
[12, 69, 69], the kept store's 68 patches + CLS) are made by precompute from teachers of ViT-B width and
heads but 3 blocks with random weights: the loader's cost depends on the bytes per view, not on the
teachers' depth or weights. Five forms: the exact fp16 kept store, the same with --encoding int8, the
compact store (--encoding int4 --compress zstd --pixels jpeg: every sample's JPEG and zstd frames are decoded by the
loader, on the CPU; int4 is unpacked where the batch lands, on the GPU, so not here), a --tokens full store read with
--mask random, and the kept store's zarr form. Each is read for `--epochs`
passes after an untimed one (so the files are in the page cache) through the training loop's loader
(StoreLoader: StoreStream in a DataLoader, --lanes lanes, the workers sharing them, their pieces joined into
batches, a shuffle buffer of 1 MB per lane: at ImageNet scale the default 64 MB is a small share of a lane, as
1 MB is here), each pass timed after its first quarter (loader_rate says why). GB/s counts the bytes per view of
the store's tar shards times the samples delivered (for the zarr reader too: the same arrays).

Side by side in the same run: a plain copy of the same bytes per sample from the page-cached shard files
into a reused [batch, bytes per view] buffer (the physical limit of a loader process that touches every
byte once), the crc32c of every shard (the integrity check each shard gets when it is loaded), as a
share of the loader's time, and the shards memory-mapped as the v4 reader mapped them (no copy into the
loader's own memory, and no protection against a shard changed or truncated while it is read). The fp16 store is then uploaded to the endpoint and read from there. The local
endpoint is moto's Python server on the same machine: it measures the client's path (ranged GETs through
s3fs), not S3's bandwidth.
"""
from __future__ import annotations

import argparse
import glob
import math
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager

import numpy as np
import torch

from hdistill.common.storage import Location
from hdistill.precompute.config import EXACT, PrecomputeConfig, Runtime
from hdistill.precompute.run import run_precompute
from hdistill.train.data import StreamSpec
from hdistill.train.loader import Store, StoreLoader

VIT_B_SHALLOW = {"mae": {"depth": 3}, "clip": {"depth": 3}}   # ViT-B/16 width and heads; 3 blocks


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


def loader_rate(store: str, workers: int, batch_size: int, lanes: int, epochs: int, mask: str, reader: str,
                checksum: bool = True) -> float:
    """Samples/s of the training loader (StoreLoader's joined batches, before they move to a device and int8/int4
    targets are decoded there) over `epochs` passes of the store, after a first pass that opens the connections.
    Each pass is timed after its first quarter: an epoch's new loader workers start cold (the fork, their first
    shards' and batches' memory), which at ImageNet scale is paid once in some 20,000 batches and here would be
    most of a pass. checksum=False: as if the commits had recorded no crc32c, to measure what the check costs."""
    opened = Store(store, reader)
    if not checksum:
        for shard in opened.manifest.shards:
            shard.crc32c = None
    stream = opened.stream(StreamSpec(tuple(opened.manifest.targets), mask, seed=0, lanes=lanes,
                                      batch_size=batch_size, buffer_mb=1))
    loader = StoreLoader(stream, workers, "cpu")
    samples, seconds = 0, 0.0
    for epoch in range(epochs + 1):
        stream.set_epoch(epoch)
        warm = stream.plan().steps // 4
        for i, (_index, batch) in enumerate(loader._joined(0)):
            if i == warm:
                start = time.perf_counter()
            elif i > warm and epoch:
                samples += batch["count"]
        seconds += time.perf_counter() - start if epoch else 0.0
    return samples / seconds


def check_cost(store: str, batch_size: int, lanes: int, epochs: int, mask: str,
               repeats: int) -> tuple[float, float, float]:
    """Median samples/s with the crc32c check, without it, and with the shards memory-mapped as the v4 reader
    mapped them (checked, then read through the map: no copy, but a shard changed or truncated while mapped
    reaches the batches, or kills the process with SIGBUS), over `repeats` runs of each taken in turn (a shared
    machine's speed drifts by more than the check costs)."""
    runs = []
    for _ in range(repeats):
        checked = loader_rate(store, 0, batch_size, lanes, epochs, mask, "wds", True)
        unchecked = loader_rate(store, 0, batch_size, lanes, epochs, mask, "wds", False)
        with mapped_shards():
            mapped = loader_rate(store, 0, batch_size, lanes, epochs, mask, "wds", True)
        runs.append((checked, unchecked, mapped))
    return tuple(statistics.median(r[i] for r in runs) for i in range(3))


@contextmanager
def mapped_shards():
    """Location.load as the v4 reader did it: the checksum over preads, then a memory map of the file."""
    import google_crc32c
    import mmap

    from hdistill.common.storage import CRC_BLOCK

    def load(self, name, checksum=True, buffers=None):
        crc = 0
        with open(self.url_of(name), "rb", buffering=0) as f:
            size = os.fstat(f.fileno()).st_size
            for start in range(0, size if checksum else 0, CRC_BLOCK):
                crc = google_crc32c.extend(crc, os.pread(f.fileno(), min(CRC_BLOCK, size - start), start))
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        return memoryview(buf), f"{crc:08x}" if checksum else None
    own, Location.load = Location.load, load
    try:
        yield
    finally:
        Location.load = own


def shard_files(store: str) -> list[str]:
    return sorted(glob.glob(f"{store}/wds/*.tar"))


def memcpy_rate(store: str, per_view: int, batch_size: int, epochs: int) -> float:
    """Samples/s of copying `per_view` bytes per sample from the page-cached shards into a reused batch buffer."""
    maps = [np.frombuffer(Location(store).load(os.path.relpath(f, store))[0], np.uint8) for f in shard_files(store)]
    records = [m[i * per_view:(i + 1) * per_view] for m in maps for i in range(len(m) // per_view)]
    out = np.empty((batch_size, per_view), np.uint8)
    start = time.perf_counter()
    for _ in range(epochs):
        for i, record in enumerate(records):
            out[i % batch_size] = record
    return epochs * len(records) / (time.perf_counter() - start)


def crc_seconds_per_sample(store: str, samples: int) -> float:
    """Seconds per sample of loading the shards with their checksum (a pass of preads through the CPU cache)."""
    start = time.perf_counter()
    for f in shard_files(store):
        Location(store).load(os.path.relpath(f, store))
    return (time.perf_counter() - start) / samples


def make_store(out: str, images: int, shard_size: int, **options) -> float:
    """Bytes per view of the webdataset form of a store made at `out` (its tar shards, what the loader reads)."""
    manifest = run_precompute(
        PrecomputeConfig(data=f"synthetic:{images}", teachers=["mae", "clip"], model_args=VIT_B_SHALLOW,
                         random_init=True, batch_size=32, shard_size=shard_size, **{**EXACT, **options}),
        out, Runtime(workers=min(2, os.cpu_count() or 1), quiet=True))
    return sum(os.path.getsize(f) for f in shard_files(out)) / manifest.samples


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=512)
    ap.add_argument("--shard-size", type=int, default=32,
                    help="images per shard: small, so that each lane streams several shards (it loads the next one "
                         "ahead, on a thread, while it gathers the current one)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lanes", type=int, default=4,
                    help="lanes of the epoch; few, so that a lane spans whole shards at this small scale (a lane "
                         "streams its first shard from the start: at ImageNet scale that is one shard in hundreds)")
    ap.add_argument("--workers", default="0,1,2", help="comma-separated loader worker counts")
    ap.add_argument("--epochs", type=int, default=3, help="timed passes over the store, after one untimed")
    ap.add_argument("--repeats", type=int, default=5, help="alternating runs with and without the checksum")
    ap.add_argument("--forms", default=None, help="only these rows, ';'-separated (e.g. 'fp16 kept')")
    ap.add_argument("--s3", default=None, help="an s3:// prefix to upload the store to (default: a local endpoint)")
    ap.add_argument("--rates", default="6000,11000",
                    help="student samples/s per GPU: how many loader processes each would need")
    args = ap.parse_args()
    workers = [int(w) for w in args.workers.split(",")]

    with tempfile.TemporaryDirectory() as tmp, (local_endpoint() if args.s3 is None else _nothing()):
        forms = {   # label -> (store, StoreStream mask)
            "fp16 kept": (f"{tmp}/kept", "progressive", dict(formats=["wds", "zarr"])),
            "int8 kept": (f"{tmp}/int8", "progressive", dict(formats=["wds"], encodings=["int8"])),
            "compact kept": (f"{tmp}/compact", "progressive", dict(formats=["wds"], encodings=["int4"],
                                                                 compress="zstd", pixels="jpeg")),
            "fp16 full, --mask random": (f"{tmp}/full", "random", dict(formats=["wds"], tokens="full")),
        }
        sizes = {}
        if args.forms:
            wanted = {f.split(",")[0] if f.startswith("fp16 kept") else f for f in args.forms.split(";")}
            forms = {label: form for label, form in forms.items() if label in wanted | {"fp16 kept"}}
        for label, (store, _mask, options) in forms.items():
            start = time.perf_counter()
            sizes[label] = make_store(store, args.images, args.shard_size, **options)
            print(f"store {label}: {args.images} views, {sizes[label] / 1000:.1f} kB/view "
                  f"(made in {time.perf_counter() - start:.0f}s)")
        kept, _, _ = forms["fp16 kept"]

        print(f"machine: {platform.processor() or 'cpu'}, {os.cpu_count()} cpus; torch {torch.__version__}; "
              f"batch {args.batch_size}, {args.lanes} lanes")
        print(f"{'source':34s} {'workers':>7s} {'samples/s':>10s} {'GB/s':>7s} {'memcpy samples/s':>17s} "
              f"{'loader/memcpy':>13s}")
        rates = {}
        rows = [(label, label, "wds") for label in forms] + [("fp16 kept, zarr reader", "fp16 kept", "zarr")]
        rows = [row for row in rows if row[0] in args.forms.split(";")] if args.forms else rows
        for label, form, reader in rows:
            (store, mask, _options), size = forms[form], sizes[form]
            copy = memcpy_rate(store, int(size), args.batch_size, args.epochs)
            crc = crc_seconds_per_sample(store, args.images) if reader == "wds" else 0.0
            for w in workers:
                rate = loader_rate(store, w, args.batch_size, args.lanes, args.epochs, mask, reader)
                rates[(label, w)] = rate
                print(f"{label:34s} {w:7d} {rate:10.0f} {rate * size / 1e9:7.3f} {copy:17.0f} {rate / copy:13.2f}")
            if reader == "wds":
                checked, unchecked, mapped = check_cost(store, args.batch_size, args.lanes, args.epochs, mask,
                                                        args.repeats)
                print(f"{label + ', no crc32c check':34s} {0:7d} {unchecked:10.0f} {unchecked * size / 1e9:7.3f}   "
                      f"(medians of {args.repeats} alternating runs: {checked:.0f} checked, so the check costs "
                      f"{100 * (1 - checked / unchecked):.0f}% of the rate; loading with the checksum, by itself: "
                      f"{1e6 * crc:.0f} us per view, on the loader's thread)")
                print(f"{label + ', memory-mapped (v4)':34s} {0:7d} {mapped:10.0f} {mapped * size / 1e9:7.3f}   "
                      f"(checked, then read through a map: the copy into the loader's own memory costs "
                      f"{100 * (1 - checked / mapped):.0f}% of the rate)")

        import s3fs
        remote = args.s3 or "s3://hdistill-bench/store"
        fs = s3fs.S3FileSystem()
        if args.s3 is None:
            fs.mkdir("hdistill-bench")
        fs.put(kept, remote.removeprefix("s3://"), recursive=True)
        for w in workers:
            rate = loader_rate(remote, w, args.batch_size, args.lanes, args.epochs, "progressive", "wds")
            print(f"{'fp16 kept, ' + os.environ.get('AWS_ENDPOINT_URL', 'S3'):34s} {w:7d} {rate:10.0f} "
                  f"{rate * sizes['fp16 kept'] / 1e9:7.3f}")

    best = max(rates[("fp16 kept", w)] for w in workers)
    print(f"\nloader processes one GPU needs for the fp16 kept store at the best rate above ({best:.0f} samples/s):")
    for r in (int(x) for x in args.rates.split(",")):
        print(f"  {r:6d} samples/s: {math.ceil(r / best)} process(es), {r * sizes['fp16 kept'] / 1e9:.2f} GB/s")


@contextmanager
def _nothing():
    yield


if __name__ == "__main__":
    main()

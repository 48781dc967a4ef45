"""Precompute's image reads from object storage: images/s of one loader process rendering views of remote images,
reading each batch's images one after the other against all at once (ViewDataset.__getitems__: fsspec's
cat_ranges, concurrent on one event loop).

    python benchmarks/image_reads.py                      # 30 ms per request, like S3's time to first byte
    python benchmarks/image_reads.py --latency-ms 0 --images 256

Images (the real ImageNet sample of ../shared/assets when present, else generated ones) are served by a local
threaded HTTP server in its own process that waits --latency-ms before answering each GET; the views are
rendered as precompute renders them (decode, RandomResizedCrop, flip). No teacher runs: the input side only.
"""
from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from hdistill.common.storage import Retry
from hdistill.precompute.data import ImageRef, synthetic_image
from hdistill.precompute.run import ViewDataset, collate_views

SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "assets" / "imagenet-sample-100"


SERVER = """
import functools, http.server, sys, time

class SlowHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        time.sleep(float(sys.argv[2]))
        super().do_GET()

http.server.ThreadingHTTPServer.request_queue_size = 1024      # many connections at once, like an object store
server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(SlowHandler, directory=sys.argv[1]))
print(server.server_port, flush=True)
server.serve_forever()
"""


class OneByOne(ViewDataset):
    """The same dataset, reading a batch's images one after the other."""

    def __getitems__(self, indices):
        return [ViewDataset.__getitems__(self, [i])[0] for i in indices]


def rate(dataset_cls, images, batch_size: int) -> float:
    items = [(0, 0, p) for p in range(len(images))]
    dataset = dataset_cls(images, list(range(len(images))), items, seed=0, size=224, crop="random", retry=Retry())
    batches = [list(range(i, min(i + batch_size, len(items)))) for i in range(0, len(items), batch_size)]
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches, collate_fn=collate_views, num_workers=0)
    start = time.perf_counter()
    done = sum(len(batch["ok"]) for batch in loader)
    return done / (time.perf_counter() - start)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--latency-ms", type=float, default=30.0)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if SAMPLE.is_dir():
            folder, source = SAMPLE, "the ImageNet sample"
        else:
            folder, source = Path(tmp), "generated images"
            for i in range(args.images):
                (folder / f"{i:05d}.png").write_bytes(synthetic_image(i))
        names = sorted(str(p.relative_to(folder)) for p in folder.rglob("*")
                       if p.suffix.lower() in (".jpeg", ".jpg", ".png"))
        server = subprocess.Popen([sys.executable, "-c", SERVER, str(folder), str(args.latency_ms / 1000)],
                                  stdout=subprocess.PIPE, text=True)
        try:
            base = f"http://127.0.0.1:{server.stdout.readline().strip()}"
            images = [ImageRef(f"img{i}", f"{base}/{names[i % len(names)]}") for i in range(args.images)]
            print(f"machine: {platform.processor() or 'cpu'}, {os.cpu_count()} cpus; {args.images} reads of {source} "
                  f"over http with {args.latency_ms:g} ms per request; batch {args.batch_size}; one loader process")
            one = rate(OneByOne, images, args.batch_size)
            together = rate(ViewDataset, images, args.batch_size)
        finally:
            server.terminate()
    print(f"one after the other : {one:7.1f} images/s")
    print(f"a batch at once     : {together:7.1f} images/s  ({together / one:.1f}x)")


if __name__ == "__main__":
    main()

"""Check a store against its manifest: every shard's checksum, every sample's arrays, in each stored format."""
from __future__ import annotations

from pathlib import Path

from hdistill.common.errors import HdistillError
from hdistill.common.files import stream_sha256
from hdistill.common.storage import Location, as_location

from .manifest import Manifest, ShardRecord, read_manifest
from .pixels import DECODERS, decoded_pixels_crc32c, describe_decoder
from .reader import StoreReader
from .zarr_store import array_shapes, read_region, region_digest


def _checksum(store: Location, manifest: Manifest, fmt: str, shard: ShardRecord) -> str | None:
    """A problem with the shard's recorded digest in `fmt`, or None."""
    if fmt == "wds":
        if not store.exists(shard.file):
            return f"{shard.file}: missing"
        with store.open(shard.file) as f:
            digest = stream_sha256(f)
        if digest != shard.sha256:
            return f"{shard.file}: sha256 differs from the manifest (the file was changed or damaged)"
        return None
    arrays = read_region(store, manifest, shard.view, shard.index, list(array_shapes(manifest)))
    if region_digest(arrays) != shard.zarr_sha256:
        return f"targets.zarr shard {shard.name}: content differs from its digest (the arrays were changed or damaged)"
    return None


def check_shard(store: Location, manifest: Manifest, reader: StoreReader, shard: ShardRecord) -> list[str]:
    """Problems of one shard in the reader's format, each worded with the shard (and sample) it concerns."""
    label = shard.file if reader.fmt == "wds" else f"targets.zarr shard {shard.name}"
    problems = []
    try:
        problem = _checksum(store, manifest, reader.fmt, shard)
        if problem and problem.endswith("missing"):
            return [problem]
        problems += [problem] if problem else []
        pixels = []
        count = 0
        for sample in reader.read(shard):
            count += 1
            if shard.pixels_crc32c is not None:
                pixels.append(sample.pixels)
        if shard.pixels_crc32c is not None and decoded_pixels_crc32c(pixels) != shard.pixels_crc32c:
            here = describe_decoder(DECODERS[reader.jpeg_decoder][1]())
            problems.append(f"{label}: its JPEG pixels decode here ({here}) to other pixels than the teacher saw "
                            f"({describe_decoder(manifest.pixels.decoder)})")
    except HdistillError as err:
        return problems + [str(err).replace(f"{store.url}/", "")]
    except Exception as err:  # noqa: BLE001 - any failure to read a shard is a problem of that shard
        return problems + [f"{label}: unreadable ({type(err).__name__}: {err})"]
    if count != shard.samples:
        problems.append(f"{label}: {count} samples, the manifest says {shard.samples}")
    return problems


def verify_store(store: str | Path | Location) -> tuple[Manifest, list[str]]:
    """(manifest, problems): no problems means every listed shard is intact in every stored format."""
    store = as_location(store)
    manifest = read_manifest(store)
    if not manifest.complete:
        return manifest, [f"{store}: the store is not complete (a run is unfinished)"]
    problems = []
    for fmt in manifest.formats:
        reader = StoreReader(store, manifest, fmt)
        for shard in manifest.shards:
            problems += check_shard(store, manifest, reader, shard)
    return manifest, problems

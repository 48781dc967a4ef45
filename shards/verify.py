"""Check a store against its manifest: every shard's checksum, every sample's arrays."""
from __future__ import annotations

import json
import tarfile
from pathlib import Path

from hdistill.common.files import file_sha256

from .format import StoreLayout, entry_specs, npy_load, read_manifest
from .wds import iter_samples


def check_shard(path: Path, record: dict, specs: dict) -> list[str]:
    """Problems of one tar shard, each worded with the shard (and sample) it concerns."""
    if not path.exists():
        return [f"{record['file']}: missing"]
    if file_sha256(path) != record["sha256"]:
        problems = [f"{record['file']}: sha256 differs from the manifest (the file was changed or damaged)"]
    else:
        problems = []
    count = 0
    try:
        for key, entries in iter_samples(path):
            count += 1
            missing = (set(specs) | {"json"}) - set(entries)
            if missing:
                problems.append(f"{record['file']}: sample {key} lacks {', '.join(sorted(missing))}")
            for name, (shape, dtype) in specs.items():
                if name in entries:
                    try:
                        arr = npy_load(entries[name])
                    except ValueError as err:
                        problems.append(f"{record['file']}: sample {key} {name} is not a valid npy ({err})")
                        continue
                    if arr.shape != shape or arr.dtype != dtype:
                        problems.append(f"{record['file']}: sample {key} {name} is {arr.dtype}{list(arr.shape)}, "
                                        f"expected {dtype}{list(shape)}")
            json.loads(entries.get("json", b"{}"))
    except (tarfile.TarError, ValueError, OSError) as err:
        problems.append(f"{record['file']}: unreadable tar ({err})")
    if count != record["samples"] and not problems:
        problems.append(f"{record['file']}: {count} samples, manifest says {record['samples']}")
    return problems


def verify_store(store: str | Path) -> tuple[dict, list[str]]:
    """(manifest, problems) — no problems means every listed shard is intact."""
    store = Path(store)
    manifest = read_manifest(store)
    problems = [] if manifest.get("complete") else [f"{store}: the store is not complete (a run is unfinished)"]
    specs = entry_specs(StoreLayout.from_dict(manifest["layout"]))
    for record in manifest.get("shards", []):
        if "file" in record:
            problems += check_shard(store / record["file"], record, specs)
    return manifest, problems

"""Writing a store: create or reopen it, lock a rank's shards, commit shards, finalize the manifest.

A shard is committed when its tar (whole: atomic rename, or one completed upload) and zarr region
are written and then its commit record commits/<shard>.json (likewise whole). A shard without a
commit record is not part of the store and is rewritten by the next run. The manifest is rewritten,
complete, by the last rank to finish. The same holds on object storage (common.storage): rank r only
ever writes its own shards' objects; the objects every rank may write (the first manifest, the zarr
metadata, the complete manifest) are the same bytes whichever rank writes them.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from hdistill.common.atomic import remove_stale_temporaries
from hdistill.common.errors import HdistillError
from hdistill.common.lock import hold_lock
from hdistill.common.storage import Location, as_location, remove_dead_staging

from . import wds, zarr_store
from .format import COMMITS_DIR, CONFIG, LOCKS_DIR, MANIFEST, STORE_ENTRIES, WDS_DIR, StoredSample, shard_name
from .manifest import Manifest, ShardRecord, read_manifest, write_manifest
from .pixels import decoded_pixels_crc32c, describe_decoder


class StoreWriter:
    def __init__(self, store: str | Path | Location, manifest: Manifest,
                 flag: Callable[[str], str] = lambda key: "--" + key.replace("_", "-")):
        self.store, self.manifest = as_location(store), manifest
        self.flag = flag                   # a config key's command-line option, for messages
        self._lock = None

    # ---------------------------------------------------------------- opening

    def open(self):
        """Create the store, or check that an existing one was made by the same configuration."""
        store = self.store
        if store.remote:
            remove_dead_staging()          # what a killed run of this machine left staged for upload
        if not store.remote and store.exists() and not store.isdir():
            raise HdistillError(f"--out {store} is a file; give a folder for the store")
        names = {name for name in store.listdir() if not name.startswith(".")}
        if MANIFEST in names:
            existing = read_manifest(store)
            if existing.identity() != self.manifest.identity():
                raise HdistillError(f"{store} holds a store made with another configuration ({self._diff(existing)}). "
                                    "Use a new --out, or rerun with the original options to resume.")
        elif names - set(STORE_ENTRIES):
            raise HdistillError(f"--out {store} exists and is not an hdistill store; choose an empty or new folder")
        else:   # new, or being created by a rank started at the same time: the same first manifest either way
            write_manifest(store, self.manifest)
        if "zarr" in self.manifest.formats:
            zarr_store.create(store, self.manifest)

    def _diff(self, existing: Manifest) -> str:
        old, new = existing.config, self.manifest.config
        diff = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
        if diff:
            return "options that differ: " + ", ".join(self.flag(d) for d in diff)
        if existing.pixels != self.manifest.pixels:
            return (f"its JPEG pixels were decoded by {describe_decoder(existing.pixels.decoder)}, this process decodes "
                    f"with {describe_decoder(self.manifest.pixels.decoder)}: the teacher would see other pixels")
        return "the teachers or their weights differ"

    def lock_rank(self, rank: int, world_size: int):
        """Hold locks/rank<r>-of<W>.lock for this process's life: a second writer of the same shards is refused.

        flock locks belong to the open file, so the kernel releases them when the process dies, SIGKILL
        included: a killed run's rerun is never locked out. Object storage has no locks: there, as on a
        file system without flock, start each rank once (ranks never share a shard, whatever happens).
        """
        if self.store.remote:
            return
        path = Path(self.store.url_of(f"{LOCKS_DIR}/rank{rank}-of{world_size}.lock"))
        self._lock = hold_lock(path, f"{self.store}: rank {rank} of {world_size}")

    def release(self):
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    # ---------------------------------------------------------------- shards

    @staticmethod
    def commit_name(shard: str) -> str:
        return f"{COMMITS_DIR}/{shard}.json"

    def committed(self) -> dict[str, ShardRecord]:
        """shard name -> commit record, for the shards of the layout committed so far (one listing, then reads)."""
        present = set(self.store.files(COMMITS_DIR))
        done = [s for s in (shard_name(v, k) for v, k in self.manifest.layout.shards()) if f"{s}.json" in present]
        found = self.store.read_many([self.commit_name(s) for s in done])
        return {s: ShardRecord.from_dict(json.loads(found[self.commit_name(s)]))
                for s in done if self.commit_name(s) in found}

    def commit(self, view: int, index: int, samples: list[tuple[int, StoredSample]], skipped: list[dict]):
        """Write one shard: `samples` are (position, sample); `skipped` holds one record per unreadable input
        ({"position", "source", "image_id", "view", "reason"})."""
        name = shard_name(view, index)
        samples = sorted(samples, key=lambda s: s[0])
        record = ShardRecord(name=name, view=view, index=index, samples=len(samples),
                             skipped=sorted(skipped, key=lambda s: s["position"]))
        tar_name = f"{WDS_DIR}/{name}.tar"
        if not self.store.remote:
            for path in (tar_name, self.commit_name(name)):  # this rank owns the shard (lock_rank);
                remove_stale_temporaries(self.store.url_of(path))  # a killed run may have left these
        if "wds" in self.manifest.formats:
            record.bytes, record.sha256, record.crc32c = wds.write_shard(self.store, tar_name, (s for _, s in samples),
                                                                         self.manifest.members())
            record.file = tar_name
        if self.manifest.pixels.encoding == "jpeg":
            record.pixels_crc32c = decoded_pixels_crc32c(s.arrays["pixels"] for _, s in samples)
        if "zarr" in self.manifest.formats:
            record.zarr_sha256 = zarr_store.write_shard(self.store, self.manifest, view, index, samples)
        self.store.write_bytes(self.commit_name(name), json.dumps(record.to_dict(), sort_keys=True).encode())

    def finalize(self) -> Manifest | None:
        """The complete manifest, written once every shard of every rank is committed; else None."""
        commits = self.committed()
        layout = self.manifest.layout
        if len(commits) < len(layout.shards()):
            return None
        shards = [commits[shard_name(v, k)] for v, k in layout.shards()]
        skipped = [{k: v for k, v in s.items() if k != "position"} for record in shards for s in record.skipped]
        for record in shards:
            record.skipped = []
        self.manifest.complete, self.manifest.shards, self.manifest.skipped = True, shards, skipped
        write_manifest(self.store, self.manifest)
        return self.manifest


def write_store_options(store: str | Path | Location, options: bytes):
    """STORE/config.yaml: the precompute options that made the store (common.options.options_yaml), which
    `hdistill precompute --config` loads again; every rank writes the same bytes."""
    as_location(store).write_bytes(CONFIG, options)

"""The manifest: what a store holds and how it was made, as one typed record (manifest.json)."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from hdistill.common.errors import HdistillError
from hdistill.common.storage import Location, as_location, storage_error
from hdistill.common.mask_spec import MaskSpec
from hdistill.common.teacher_info import TeacherInfo
from hdistill.common.targets import TargetSpec

from .encoding import ENCODINGS
from .format import FORMAT_VERSION, MANIFEST, StoreLayout, sample_arrays, sample_members
from .pixels import PixelSpec


@dataclass
class ShardRecord:
    """One committed shard (commits/<name>.json; the manifest lists them once the store is complete).

    file/bytes/sha256/crc32c: the webdataset tar (wds stores; readers check crc32c, hdistill verify sha256);
    zarr_sha256: digest of the shard's zarr region.
    pixels_crc32c: --pixels jpeg: the CRC32C of the shard's pixels as the teacher saw them (decoded), which a reader's
    decoder must give.
    skipped: the unreadable inputs of the shard (commit records only; the manifest gathers them).
    """

    name: str
    view: int
    index: int
    samples: int
    file: str | None = None
    bytes: int | None = None
    sha256: str | None = None
    crc32c: str | None = None
    zarr_sha256: str | None = None
    pixels_crc32c: str | None = None
    skipped: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if v is not None}

    @classmethod
    def from_dict(cls, d: dict) -> "ShardRecord":
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


@dataclass
class Manifest:
    config: dict                              # the precompute options that made the store
    teachers: list[TeacherInfo]
    targets: list[TargetSpec]
    mask: MaskSpec
    layout: StoreLayout
    formats: list[str]
    pixels: PixelSpec = PixelSpec()
    compress: str = "none"                   # none | zstd: the webdataset target members
    complete: bool = False
    shards: list[ShardRecord] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)
    format_version: int = FORMAT_VERSION

    # ---------------------------------------------------------------- questions readers ask

    @property
    def samples(self) -> int:
        return sum(s.samples for s in self.shards)

    @property
    def tokens(self) -> str:
        return "full" if self.layout.stored_patches == self.layout.num_patches else "kept"

    def teacher(self, role: str) -> TeacherInfo:
        return next(t for t in self.teachers if t.role == role)

    def target(self, name: str) -> TargetSpec:
        return next(t for t in self.targets if t.name == name)

    def has_target(self, name: str) -> bool:
        return any(t.name == name for t in self.targets)

    def targets_named(self, names: list[str], where) -> list[TargetSpec]:
        """The rows of `names`; a name the store does not hold is refused, naming `where` and what it holds."""
        missing = [n for n in names if not self.has_target(n)]
        if missing:
            raise HdistillError(f"{where}: no target {', '.join(missing)} in the store "
                                f"(it holds {', '.join(t.name for t in self.targets)})")
        return [self.target(n) for n in names]

    def arrays(self) -> dict[str, tuple[tuple[int, ...], str]]:
        return sample_arrays(self.layout, self.targets)

    def members(self) -> dict[str, str]:
        """Each array of a sample -> its webdataset entry."""
        return sample_members(self.layout, self.targets, self.pixels, self.compress)

    def view_shards(self, view: int) -> list[ShardRecord]:
        return [s for s in self.shards if s.view == view]

    # ---------------------------------------------------------------- json

    def digest(self) -> str:
        """sha256 of the whole manifest: equal for the same store wherever it lies."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()

    def identity(self) -> dict:
        """What must match for a run to continue an existing store."""
        d = self.to_dict()
        for key in ("complete", "shards", "skipped", "samples"):
            d.pop(key)
        return d

    def to_dict(self) -> dict:
        n, g = self.layout.stored_patches, self.layout.image_size // self.layout.patch_size
        return json.loads(json.dumps({
            "format_version": self.format_version, "config": self.config,
            "teachers": [t.to_dict() for t in self.teachers], "targets": [target_record(t) for t in self.targets],
            "mask": self.mask.to_dict(), "layout": self.layout.to_dict(), "formats": self.formats,
            "pixels": self.pixels.to_dict(), "compress": self.compress,
            "token_layout": {"order": "the teacher's CLS first if it has one (a target's 'cls'), then the stored "
                                      "patches in keep order; register tokens never stored",
                             "patch_order": "raster (row-major) over the patch grid", "grid": [g, g],
                             "patch_size": self.layout.patch_size, "num_patches": self.layout.num_patches,
                             "stored_patches": n},
            "complete": self.complete, "shards": [s.to_dict() for s in self.shards], "skipped": self.skipped,
            "samples": self.samples}))

    @classmethod
    def from_dict(cls, d: dict) -> "Manifest":
        return cls(config=d["config"], teachers=[TeacherInfo.from_dict(t) for t in d["teachers"]],
                   targets=[target_spec(t) for t in d["targets"]], mask=MaskSpec.from_dict(d["mask"]),
                   layout=StoreLayout.from_dict(d["layout"]), formats=list(d["formats"]),
                   pixels=PixelSpec.from_dict(d["pixels"]), compress=d["compress"], complete=d["complete"],
                   shards=[ShardRecord.from_dict(s) for s in d["shards"]], skipped=d["skipped"],
                   format_version=d["format_version"])


def target_record(spec: TargetSpec) -> dict:
    """A target's row of the manifest."""
    return {"name": spec.name, "kind": spec.kind, "role": spec.role, "block": spec.block, "shape": list(spec.shape),
            "dtype": ENCODINGS[spec.encoding].dtype, "encoding": spec.encoding, "cls": spec.cls}


def target_spec(record: dict) -> TargetSpec:
    if record["encoding"] not in ENCODINGS:
        raise HdistillError(f"target {record['name']}: unknown encoding {record['encoding']!r} (this hdistill knows "
                            f"{', '.join(ENCODINGS)}); read the store with the hdistill that made it")
    return TargetSpec(kind=record["kind"], role=record["role"], block=record["block"], shape=tuple(record["shape"]),
                      encoding=record["encoding"], cls=record["cls"])


def read_manifest(store: str | Path | Location) -> Manifest:
    store = as_location(store)
    path = store.url_of(MANIFEST)
    try:
        data = json.loads(store.read_bytes(MANIFEST))
    except FileNotFoundError as err:
        if "bucket" in str(err).lower():             # the whole bucket is missing, not just the store
            raise storage_error(path, err) from None
        raise HdistillError(f"{store} is not an hdistill store: {path} does not exist") from None
    except json.JSONDecodeError as err:
        raise HdistillError(f"{path}: unreadable manifest ({err})") from None
    except HdistillError:
        raise
    except Exception as err:  # noqa: BLE001 - permissions, credentials, a missing bucket: one line
        raise storage_error(path, err) from None
    version = data.get("format_version") if isinstance(data, dict) else None
    if version != FORMAT_VERSION:
        raise HdistillError(f"{path}: store format version {version}; this hdistill reads version {FORMAT_VERSION} "
                            "only. Make the store again with this hdistill's `hdistill precompute` (same --data, "
                            "teachers and seed) into a new --out.")
    try:
        return Manifest.from_dict(data)
    except (KeyError, TypeError, ValueError, HdistillError) as err:
        raise HdistillError(f"{path}: malformed v{FORMAT_VERSION} manifest ({type(err).__name__}: {err})") from None


def write_manifest(store: str | Path | Location, manifest: Manifest):
    as_location(store).write_bytes(MANIFEST, (json.dumps(manifest.to_dict(), indent=1, sort_keys=True) + "\n").encode())

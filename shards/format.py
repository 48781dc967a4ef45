"""Store format v1: names, sample entries and the manifest. docs/FORMAT.md is the reference."""
from __future__ import annotations

import io
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from hdistill.common.errors import HdistillError

from .atomic import atomic_write

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
WDS_DIR = "wds"
ZARR_DIR = "targets.zarr"
COMMITS_DIR = "commits"


def shard_name(view: int, index: int) -> str:
    return f"view{view}-{index:06d}"


def sample_key(image_id: str, view: int) -> str:
    return f"{image_id}-v{view}"


def image_id_from_path(relative: str) -> str:
    """Relative source path -> image id: extension dropped, characters outside [A-Za-z0-9_/-] -> '_'.

    Ids never contain dots, so webdataset keys split cleanly from their extensions.
    """
    stem = re.sub(r"\.[^./]*$", "", relative.replace("\\", "/"))
    return re.sub(r"[^A-Za-z0-9_/-]", "_", stem)


def feat_entry(role: str) -> str:
    return f"feat.{role}.npy"


def rel_entry(role: str, block: int) -> str:
    return f"rel.{role}.b{block}.npy"


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def npy_load(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


@dataclass
class StoredView:
    """One sample of the store: one augmented view of one image.

    stage     uint8   [N]               0 = kept by the progressive mask, s = dropped at stage s
    keep      int16   [n]               patch indices of the stored tokens, ascending
    pixels    uint8   [n, P, P, 3]      the view's stored patches, in `keep` order
    features  role -> float16 [1+n, D]          CLS, then stored patches
    relations role -> block -> float16 [H, 1+n, 1+n]
    """

    key: str
    meta: dict
    stage: np.ndarray
    keep: np.ndarray
    pixels: np.ndarray
    features: dict[str, np.ndarray] = field(default_factory=dict)
    relations: dict[str, dict[int, np.ndarray]] = field(default_factory=dict)

    def arrays(self) -> dict[str, np.ndarray]:
        """Entry name -> array, in the order they are written."""
        out = {"stage.npy": self.stage, "keep.npy": self.keep, "pixels.npy": self.pixels}
        out.update({feat_entry(r): a for r, a in sorted(self.features.items())})
        out.update({rel_entry(r, b): a for r, blocks in sorted(self.relations.items()) for b, a in sorted(blocks.items())})
        return out

    def entries(self) -> dict[str, bytes]:
        """webdataset entries (json first, then npy arrays), in the order they are written."""
        return {"json": json.dumps(self.meta, sort_keys=True).encode(),
                **{name: npy_bytes(a) for name, a in self.arrays().items()}}



def read_manifest(store: str | Path) -> dict:
    path = Path(store) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise HdistillError(f"{store} is not an hdistill store: {path} does not exist") from None
    except (OSError, json.JSONDecodeError) as err:
        raise HdistillError(f"{path}: unreadable manifest ({err})") from None
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise HdistillError(f"{path}: store format version {version}, this hdistill reads version {FORMAT_VERSION}")
    return manifest


def write_manifest(store: str | Path, manifest: dict):
    atomic_write(Path(store) / MANIFEST, (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode())


@dataclass(frozen=True)
class StoreLayout:
    """Shapes and sample order of a store, recorded in its manifest under "layout".

    Samples are ordered view-major: all images' view 0, then all images' view 1, ...
    Shard `index` of view `v` holds images [index * shard_size, (index + 1) * shard_size)
    (fewer if some were unreadable). The zarr slot of (view v, image i) is
    v * images_padded + i, with images_padded a multiple of shard_size so that every
    shard is one zarr shard; slots without a sample have valid = False.
    """

    num_images: int
    views: int
    shard_size: int
    image_size: int
    patch_size: int
    num_patches: int
    stored_patches: int
    features: dict[str, int]
    relations: dict[str, dict]

    @property
    def shards_per_view(self) -> int:
        return -(-self.num_images // self.shard_size)

    @property
    def images_padded(self) -> int:
        return self.shards_per_view * self.shard_size

    @property
    def num_slots(self) -> int:
        return self.views * self.images_padded

    def shards(self) -> list[tuple[int, int]]:
        return [(v, k) for v in range(self.views) for k in range(self.shards_per_view)]

    def image_range(self, index: int) -> range:
        return range(index * self.shard_size, min((index + 1) * self.shard_size, self.num_images))

    def slot(self, view: int, image: int) -> int:
        return view * self.images_padded + image

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}

    @classmethod
    def from_dict(cls, d: dict) -> "StoreLayout":
        return cls(**{k: d[k] for k in cls.__dataclass_fields__})


def entry_specs(layout: StoreLayout) -> dict[str, tuple[tuple[int, ...], str]]:
    """Every array entry of a sample -> (shape, dtype)."""
    n, P = layout.stored_patches, layout.patch_size
    specs = {"stage.npy": ((layout.num_patches,), "uint8"), "keep.npy": ((n,), "int16"),
             "pixels.npy": ((n, P, P, 3), "uint8")}
    specs.update({feat_entry(r): ((1 + n, d), "float16") for r, d in layout.features.items()})
    specs.update({rel_entry(r, b): ((rel["heads"], 1 + n, 1 + n), "float16")
                  for r, rel in layout.relations.items() for b in rel["blocks"]})
    return specs


def zarr_name(entry: str) -> str:
    """"feat.mae.npy" -> "feat/mae", "rel.mae.b10.npy" -> "rel/mae/b10", "stage.npy" -> "stage"."""
    return entry.removesuffix(".npy").replace(".", "/")

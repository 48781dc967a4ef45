"""Compact encodings: int8 with a per-row float16 scale, and bf16-style mantissa rounding in zarr.

Each is checked against a computation written here: int8 against its error bound and a decode by hand
from the raw arrays (plain webdataset + numpy), bf16 against round-half-to-even of the float16 store's
bits to 7 mantissa bits.
"""
import glob

import numpy as np
import pytest
import torch
import webdataset as wds
import zarr

from helpers import precompute, write_photos
from hdistill.common.errors import HdistillError
from hdistill.common.targets import TargetSpec
from hdistill.shards.encoding import decode, encode
from hdistill.shards.manifest import read_manifest
from hdistill.shards.reader import StoreReader

TARGETS = ["clip:feat", "mae:rel@1,2", "mae:msa@0"]


def int8_bound(reference: np.ndarray) -> np.ndarray:
    """Half a quantum (max|row| / 254) plus the float16 rounding of the scale (127 * 2^-11 of a quantum)."""
    row_max = np.abs(reference.astype(np.float64)).max(-1, keepdims=True)
    return row_max / 254 + row_max / 2048


def bf16_round(values: np.ndarray) -> np.ndarray:
    """float16 -> keep 7 of its 10 mantissa bits, round half to even, by bit arithmetic."""
    bits = values.astype(np.float16).view(np.uint16).astype(np.uint32)
    drop = 3
    lsb = (bits >> drop) & 1
    rounded = (bits + (1 << (drop - 1)) - 1 + lsb) & ~np.uint32((1 << drop) - 1)
    return rounded.astype(np.uint16).view(np.float16)


def test_int8_encoding_against_its_bound():
    g = torch.Generator().manual_seed(0)
    values = torch.randn(3, 4, 9, 9, generator=g) * torch.logspace(-3, 3, 9)[:, None]   # rows of very different size
    values[0, 0, 0] = 0.0                                                              # an all-zero row
    spec = TargetSpec("rel", "mae", 1, (4, 9, 9), "int8")
    arrays = encode(spec, values, who=str)
    assert arrays["rel.mae.b1"].dtype == torch.int8 and arrays["scale.rel.mae.b1"].dtype == torch.float16
    assert arrays["scale.rel.mae.b1"].shape == (3, 4, 9) and arrays["rel.mae.b1"].abs().max() <= 127
    x = values.numpy()
    for i in range(3):
        got = decode(spec, {k: v[i].numpy() for k, v in arrays.items()})
        assert got.dtype == np.float32
        assert (np.abs(got - x[i]) <= int8_bound(x[i])).all()
    np.testing.assert_array_equal(decode(spec, {k: v[0].numpy() for k, v in arrays.items()})[0, 0], 0)
    bad = values.clone()
    bad[1, 2, 3, 4] = float("nan")
    with pytest.raises(HdistillError, match="non-finite rel.mae.b1 in float16 for 1"):
        encode(spec, bad, who=lambda rows: ",".join(map(str, rows)))


@pytest.fixture(scope="module")
def encoded_stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("encodings")
    write_photos(root / "photos", 5, seed=2)
    both = ["wds", "zarr"]
    precompute(root / "photos", root / "fp16", targets=TARGETS, formats=both)
    precompute(root / "photos", root / "int8", targets=TARGETS, formats=both, encodings=["int8", "feat=fp16"])
    precompute(root / "photos", root / "bf16", targets=TARGETS, formats=["zarr"], encodings=["bf16"])
    return root


def decoded(store, fmt):
    manifest = read_manifest(store)
    reader = StoreReader(store, manifest, fmt)
    return {s.key: s for shard in manifest.shards for s in reader.read(shard)}


def test_int8_store_decodes_within_its_bound_in_both_readers(encoded_stores):
    reference = decoded(encoded_stores / "fp16", "wds")
    manifest = read_manifest(encoded_stores / "int8")
    assert {t.name: t.encoding for t in manifest.targets} == {"feat.clip": "fp16", "rel.mae.b1": "int8",
                                                              "rel.mae.b2": "int8", "msa.mae.b0": "int8"}
    by_reader = {fmt: decoded(encoded_stores / "int8", fmt) for fmt in ("wds", "zarr")}
    assert by_reader["wds"].keys() == by_reader["zarr"].keys() == reference.keys()
    # plain webdataset + numpy: the raw arrays, decoded by hand
    raw = {s["__key__"]: s for s in wds.WebDataset(sorted(glob.glob(str(encoded_stores / "int8" / "wds" / "*.tar"))),
                                                   shardshuffle=False).decode()}
    for key, ref in reference.items():
        for fmt, samples in by_reader.items():
            got = samples[key].targets
            np.testing.assert_array_equal(got["feat.clip"], ref.targets["feat.clip"])
            for name in ("rel.mae.b1", "rel.mae.b2", "msa.mae.b0"):
                r = ref.targets[name].astype(np.float32)
                assert (np.abs(got[name] - r) <= int8_bound(r) + np.abs(r) / 1024).all(), (fmt, key, name)
                by_hand = raw[key][f"{name}.npy"].astype(np.float32) * raw[key][f"scale.{name}.npy"][..., None]
                np.testing.assert_array_equal(got[name], by_hand)
        assert raw[key]["rel.mae.b1.npy"].dtype == np.int8


@pytest.mark.filterwarnings("ignore:Numcodecs codecs are not in the Zarr version 3")
def test_bf16_store_holds_rounded_float16(encoded_stores):
    reference = decoded(encoded_stores / "fp16", "zarr")
    got = decoded(encoded_stores / "bf16", "zarr")
    group = zarr.open_group(encoded_stores / "bf16" / "targets.zarr", mode="r")
    assert group["rel.mae.b1"].dtype == np.float16
    for key, ref in reference.items():
        for name, values in ref.targets.items():
            np.testing.assert_array_equal(got[key].targets[name], bf16_round(values))

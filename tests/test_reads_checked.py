"""Every read is checked: a damaged zarr chunk, a shard truncated while the loader holds it, a file deleted or
changed before the run starts; each stops the run naming the file, and nothing is trained on in the meantime."""
import os

import numpy as np
import pytest
import torch

import hdistill
from helpers import config, precompute, runtime, write_photos
from hdistill.common.errors import HdistillError
from hdistill.train.run import solo


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("reads") / "photos"
    write_photos(folder, 8, seed=21)
    return folder


def first_batches(store, count, **kw):
    """The first `count` batches' features, epoch after epoch."""
    loader = hdistill.open_store(str(store), kw.pop("format", None)).loader(batch_size=4, lanes=1, buffer_mb=0.02, **kw)
    got = []
    while len(got) < count:
        got += [batch["targets"]["feat.clip"] for batch in loader]
    return got[:count]


def test_a_flipped_byte_in_a_zarr_chunk_stops_the_zarr_reader_naming_shard_and_array(photos, tmp_path):
    precompute(photos, tmp_path / "store", formats=["zarr"], shard_size=4)
    chunk = tmp_path / "store" / "targets.zarr" / "feat.clip" / "c" / "1" / "0" / "0"   # store shard 1's file
    data = bytearray(chunk.read_bytes())
    data[len(data) // 3] ^= 0x01                                   # inside a compressed chunk, not its index
    chunk.write_bytes(bytes(data))
    with pytest.raises(HdistillError, match=r"targets\.zarr shard view0-000001: array feat\.clip: a chunk's crc32c "
                                            r"differs from the one written with it"):
        first_batches(tmp_path / "store", 2, format="zarr")


@pytest.mark.parametrize("workers", [0, 2])
def test_a_shard_truncated_while_the_loader_holds_it_is_named_not_a_bus_error(photos, tmp_path, workers):
    """The loader reads each shard into its own memory as it checks it: the batches of a shard it holds stay what
    was checked, and the next load of a truncated shard stops with its name (a memory map would die of SIGBUS)."""
    precompute(photos, tmp_path / "store", shard_size=4, views=2)
    expected = first_batches(tmp_path / "store", 4)                # two epochs of 2 batches, untouched
    loader = hdistill.open_store(str(tmp_path / "store")).loader(batch_size=4, lanes=1, buffer_mb=0.02,
                                                                  workers=workers)
    got = []
    with pytest.raises(HdistillError, match=r"store/wds/view[01]-00000[01]\.tar: (\d+ bytes, its commit recorded "
                                            r"\d+|the file ended before its \d+ bytes were read)"):
        for epoch in range(2):
            for batch in loader:
                got.append(batch["targets"]["feat.clip"])
                if len(got) == 1:                                   # the first shards are loaded: cut every tar
                    for tar in (tmp_path / "store" / "wds").glob("*.tar"):
                        os.truncate(tar, tar.stat().st_size // 2)
    assert len(got) < 4
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_a_missing_or_changed_file_is_found_before_the_first_step(photos, tmp_path):
    precompute(photos, tmp_path / "store", shard_size=4, views=2, formats=["wds", "zarr"])
    store = tmp_path / "store"
    cfg = lambda **kw: config(store, **kw)                       # noqa: E731
    (store / "wds" / "view1-000001.tar").unlink()
    with pytest.raises(HdistillError, match=rf"{store}: wds/view1-000001\.tar is missing: the store was damaged"):
        solo(cfg(steps=4), str(tmp_path / "run"), runtime())
    assert not (tmp_path / "run").exists()
    # a run of one epoch reads view 0 only: view 1's shards are not its business
    solo(cfg(steps=1), str(tmp_path / "run"), runtime())
    with open(store / "wds" / "view0-000000.tar", "ab") as f:    # a byte more than its commit recorded
        f.write(b"\0")
    size = (store / "wds" / "view0-000000.tar").stat().st_size
    with pytest.raises(HdistillError, match=rf"wds/view0-000000\.tar holds {size} bytes, its commit recorded "
                                            rf"{size - 1} \(and 1 more\)"):
        solo(cfg(steps=4), str(tmp_path / "run"), runtime())
    with pytest.raises(HdistillError, match=r"wds/view0-000000\.tar holds"):
        hdistill.open_store(str(store)).loader(batch_size=4)
    # zarr: every chunk is written (fill values too), so a missing file is missing, not a region of zeros
    (store / "targets.zarr" / "keep" / "c" / "1" / "0").unlink()   # store shard (view 0, index 1) of `keep`
    with pytest.raises(HdistillError, match=r"targets\.zarr/keep/c/1/0 is missing"):
        solo(cfg(steps=1), str(tmp_path / "run"), runtime(format="zarr"))
    assert np.all([(store / "targets.zarr" / name / "c" / "0").exists() for name in ("view", "valid", "flip")])


def test_loaded_memory_is_reused_only_once_nothing_views_it():
    """The loader reuses the memory of loaded shards (a fresh array costs a page fault per 4 KiB): never while a
    sample of the shard is still viewing it."""
    from hdistill.common.storage import Buffers
    buffers = Buffers(keep=2)
    first = buffers.take(4096)
    first[:] = 1
    sample = np.frombuffer(first, np.float16, 8, 64).reshape(2, 4)      # what a shard's sample is: a view
    before = sample.copy()
    del first
    second = buffers.take(4096)
    second[:] = 2                                                      # the next shard's bytes
    np.testing.assert_array_equal(sample, before)
    assert not np.shares_memory(sample, second)
    del sample, second
    third = buffers.take(3000)                                         # nothing views the pool: its memory again
    assert len(buffers.pool) == 2 and any(np.shares_memory(third, np.frombuffer(m, np.uint8)) for m in buffers.pool)

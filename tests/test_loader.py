"""The store loader: its samples against plain webdataset reads, its batches against the trainer's, exact resume."""
import json
import random

import numpy as np
import pytest
import torch

import hdistill
from helpers import precompute, runtime, wds_samples, write_photos
from hdistill.common.errors import HdistillError
from hdistill.shards.reader import StoreReader
from hdistill.train.config import TrainConfig
from hdistill.train.run import run_train


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("loader")
    write_photos(root / "photos", 12, seed=5)
    precompute(root / "photos", root / "store", views=2, formats=["wds"], encodings=["rel=int8"])
    return root / "store"


def test_the_reader_gives_what_plain_webdataset_reads(store):
    plain = wds_samples(store)
    store_ = hdistill.open_store(str(store))
    reader = StoreReader(str(store), store_.manifest)
    seen = 0
    for shard in store_.manifest.shards:
        for sample in reader.read(shard):
            want = plain[sample.key]
            for name in ("stage", "keep", "pixels"):
                np.testing.assert_array_equal(getattr(sample, name), want[f"{name}.npy"])
            np.testing.assert_array_equal(sample.targets["feat.clip"], want["feat.clip.npy"])
            for rel in ("rel.mae.b1", "rel.mae.b2"):             # int8 with a per-row scale, decoded by hand here
                decoded = want[f"{rel}.npy"].astype(np.float32) * want[f"scale.{rel}.npy"][..., None].astype(np.float32)
                np.testing.assert_array_equal(sample.targets[rel], decoded)
            assert sample.record.to_json() == want["json"]
            seen += 1
    assert seen == len(plain) == 24


def test_a_hand_written_loop_on_the_public_loader_gives_the_trainers_losses(store, tmp_path):
    from hdistill.train.loss import DistillLoss, LossConfig, plan_losses
    from hdistill.train.member import lr_factor, param_groups
    from hdistill.train.student import build_student
    run_train(TrainConfig(shards=str(store), student="vit_base_patch16_224", drop_path=0.0, steps=6, batch_size=4,
                          lr=1e-3, student_args=dict(depth=3, embed_dim=24, num_heads=6), lane_buffer_mb=0.02),
              str(tmp_path / "run"), runtime(log_every=1))
    expected = [json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]

    opened = hdistill.open_store(str(store))
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    student = build_student("vit_base_patch16_224", 64, dict(depth=3, embed_dim=24, num_heads=6))
    terms = plan_losses(opened.manifest, None, student.depth)
    loss_fn = DistillLoss(terms, student.width, student.heads, LossConfig())
    taps = sorted({t.student_tap for t in terms if t.student_tap})
    student.capture(taps)
    optimizer = torch.optim.AdamW(param_groups([student, loss_fn], 0.05), lr=1e-3, betas=(0.9, 0.95), fused=True)
    loader = opened.loader(batch_size=4, targets=[t.name for t in terms], seed=0, buffer_mb=0.02)
    losses, step = [], 0
    while step < 6:
        for batch in loader:
            for group in optimizer.param_groups:
                group["lr"] = 1e-3 * lr_factor(step, 6, 1)
            out = student(batch["pixels"], batch["keep"])
            loss = loss_fn(out.tokens, out.taps, batch["targets"])["loss"]
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], 3.0)
            optimizer.step()
            losses.append(loss.item())
            step += 1
            if step == 6:
                break
    assert losses == pytest.approx(expected, rel=1e-5)


def test_a_webdataset_stream_loads_each_lanes_next_shard_on_a_thread(store, monkeypatch):
    """A lane's shards are loaded and checked on the loader's shard thread, the next one while it gathers the one
    before: seen from StoreReader.load's own thread, not from the stream's flag."""
    import threading
    threads = []
    load = StoreReader.load
    monkeypatch.setattr(StoreReader, "load", lambda self, shard: (threads.append(threading.current_thread().name),
                                                                 load(self, shard))[1])
    list(hdistill.open_store(str(store)).loader(batch_size=4, lanes=1, buffer_mb=0.02))
    assert len(threads) == 3                                                    # three shards of 4 in view 0
    assert all(name.startswith("hdistill-shard") for name in threads), threads


def test_workers_shared_memory_serves_epoch_after_epoch_but_never_two_iterators(store):
    """The workers' batch memory (BatchRing) is made once and reused by the next epoch's workers; an epoch left
    midway whose iterator is still alive keeps its own, so the batches stay those of one process."""
    opened = hdistill.open_store(str(store))
    options = dict(batch_size=4, seed=5, lanes=4, buffer_mb=0.02)
    alone = opened.loader(**options)
    expected = [b for _ in range(3) for b in alone]                         # epochs 0, 1 and 2, without workers
    loader = opened.loader(**options, workers=2)
    left = iter(loader)
    got = [next(left)]                                                      # epoch 0, left after its first batch
    kept, rings = loader.stream.ring, []
    for _ in range(3):                                                      # the rest of epoch 0, then 1 and 2
        got += list(loader)
        rings.append(loader.stream.ring)
    assert left.gi_frame is not None                                        # still alive, its workers too
    assert all(ring is rings[0] for ring in rings) and rings[0] is not kept
    assert len(got) == len(expected) == 9
    for a, b in zip(expected, got):
        assert a["keys"] == b["keys"]
        for name in ("pixels", "keep"):
            assert torch.equal(a[name], b[name])
        for name, values in a["targets"].items():
            assert torch.equal(values, b["targets"][name])


def test_workers_give_the_batches_of_one_process(store):
    """Two workers read lanes 0, 2 and 1, 3: their pieces are put back in lane order, keys and arrays alike."""
    opened = hdistill.open_store(str(store))
    alone, shared = (list(opened.loader(batch_size=4, seed=5, lanes=4, buffer_mb=0.02, workers=w)) for w in (0, 2))
    assert len(alone) == len(shared) == 3
    for a, b in zip(alone, shared):
        assert a["keys"] == b["keys"] and a["count"] == b["count"] == 4
        for name in ("pixels", "keep", "views"):
            assert torch.equal(a[name], b[name])
        for name, values in a["targets"].items():
            assert torch.equal(values, b["targets"][name])
    lanes_by_hand = []                      # lane l's sample of each batch, read alone: the order the batch must have
    stream = opened.loader(batch_size=4, seed=5, lanes=4, buffer_mb=0.02).stream
    stream.set_epoch(0)
    plan = stream.plan()
    per_lane = {lane: stream._lane(plan, lane) for lane in range(4)}
    for _ in range(3):
        lanes_by_hand.append([next(per_lane[lane]).key for lane in range(4)])
    assert [b["keys"] for b in shared] == lanes_by_hand


def test_the_loader_resumes_exactly_from_its_state(store):
    opened = hdistill.open_store(str(store))
    loader = opened.loader(batch_size=4, seed=3, lanes=2, buffer_mb=0.02)
    assert len(loader) == 3 and opened.targets == ["feat.clip", "rel.mae.b1", "rel.mae.b2"]
    keys = lambda batch: batch["pixels"].flatten(1)[:, :64].tolist()  # noqa: E731  what identifies the samples
    whole = [keys(b) for _ in range(2) for b in loader]          # two epochs
    again = opened.loader(batch_size=4, seed=3, lanes=2, buffer_mb=0.02)
    first = iter(again)
    head = [keys(next(first)) for _ in range(2)]
    state = again.state_dict()
    assert state == {"epoch": 0, "batch": 2}
    resumed = opened.loader(batch_size=4, seed=3, lanes=2, buffer_mb=0.02)
    resumed.load_state_dict(state)
    tail = [keys(b) for b in resumed] + [keys(b) for b in resumed]
    assert head + tail == whole
    # two ranks: each takes its lanes of every global batch
    halves = [opened.loader(batch_size=4, seed=3, lanes=2, rank=r, world_size=2, buffer_mb=0.02) for r in (0, 1)]
    joined = [a + b for a, b in zip(*([keys(b) for b in h] for h in halves))]
    assert joined == whole[:3]
    # int8 targets leave the loader process as int8 with their float16 row scales; the batch holds their values
    fresh = opened.loader(batch_size=4, seed=3, lanes=2, buffer_mb=0.02)
    fresh.stream.set_epoch(0)
    piece = next(iter(fresh.stream))["samples"]                  # both lanes' shares of the first global batch
    assert piece["targets"]["rel.mae.b1"].dtype == torch.int8 and piece["companions"]["scale.rel.mae.b1"].shape == (4, 4, 1 + 7)
    batch = next(iter(fresh))
    assert batch["targets"]["rel.mae.b1"].dtype == torch.float32 and "companions" not in batch
    torch.testing.assert_close(batch["targets"]["rel.mae.b1"], piece["targets"]["rel.mae.b1"].float()
                               * piece["companions"]["scale.rel.mae.b1"].float()[..., None], rtol=0, atol=0)
    with pytest.raises(HdistillError, match="no target feat.dino"):
        opened.loader(batch_size=4, targets=["feat.dino"])


def test_a_stream_reads_each_target_as_its_own_store_encodes_it(store):
    """A run's targets may be encoded otherwise in the store it reads (a held-out store, say): its own encoding wins."""
    from dataclasses import replace

    from hdistill.train.data import AllSamples, StreamSpec
    from hdistill.train.loader import decoded
    opened = hdistill.open_store(str(store))
    manifest = opened.manifest
    as_fp16 = tuple(replace(t, encoding="fp16") for t in manifest.targets)       # what another store would hold
    stream = opened.stream(StreamSpec(as_fp16, "progressive", seed=0))
    batch = decoded(next(iter(AllSamples(stream, 12))), stream.reader.specs)
    plain = wds_samples(store)
    view0 = [s.key for shard in manifest.view_shards(0) for s in StoreReader(str(store), manifest).read(shard)]
    assert batch["count"] == len(view0) == 12
    for i, key in enumerate(view0):
        want = plain[key]
        by_hand = want["rel.mae.b1.npy"].astype(np.float32) * want["scale.rel.mae.b1.npy"][..., None].astype(np.float32)
        np.testing.assert_array_equal(batch["targets"]["rel.mae.b1"][i].numpy(), by_hand)


def test_the_public_loader_refuses_bad_arguments_naming_each(store):
    opened = hdistill.open_store(str(store))
    bad = [(dict(batch_size=0), r"batch_size 0: give an integer of at least 1"),
           (dict(batch_size=4, rank=1, world_size=1), r"rank 1: not a rank of world_size 1 \(0 to 0\)"),
           (dict(batch_size=4, world_size=0), r"world_size 0: give an integer of at least 1"),
           (dict(batch_size=4, targets="feat.clip"), r"targets 'feat.clip': give a list of target names, e.g. "
                                                     r"\['feat.clip'\]"),
           (dict(batch_size=4, mask="all"), r"mask 'all': choose one of progressive, none, random"),
           (dict(batch_size=4, device="gpu0"), r"device 'gpu0': not a torch device")]
    if not torch.cuda.is_available():
        bad.append((dict(batch_size=4, device="cuda"), r"device 'cuda': CUDA is not available on this machine"))
    for arguments, message in bad:
        with pytest.raises(HdistillError, match=message):
            opened.loader(**arguments)
    loader = opened.loader(batch_size=4, buffer_mb=0.02)          # 12 samples a view: 3 batches an epoch
    for state, message in [("garbage", r"expected \{'epoch': int, 'batch': int\} as state_dict\(\) gives it, got "
                                       r"'garbage'"),
                           ({"epoch": 0}, r"expected \{'epoch': int, 'batch': int\}"),
                           ({"epoch": 0, "batch": 999}, r"\{'epoch': 0, 'batch': 999\} is not a position of this "
                                                        r"loader: epochs count from 0, and epoch 0 has 3 batches"),
                           ({"epoch": -5, "batch": 0}, r"\{'epoch': -5, 'batch': 0\} is not a position")]:
        with pytest.raises(HdistillError, match=message):
            loader.load_state_dict(state)


def test_a_loop_that_stops_after_an_epochs_last_batch_gets_the_next_epoch(store):
    """A step limit that falls on an epoch's last batch: the next `for batch in loader` is the next epoch, not an
    empty pass; each batch names its samples (keys, views), so a sample can be traced to its image."""
    opened = hdistill.open_store(str(store))
    plain = wds_samples(store)
    whole = opened.loader(batch_size=4, buffer_mb=0.02)
    expected = [[b["keys"] for b in whole] for _ in range(2)]
    assert [len(epoch) for epoch in expected] == [3, 3]
    loader = opened.loader(batch_size=4, buffer_mb=0.02)
    got = []
    for batch in loader:
        got.append(batch["keys"])
        if len(got) == 3:
            break
    assert loader.state_dict() == {"epoch": 1, "batch": 0}
    second = []
    for batch in loader:
        second.append(batch["keys"])
        assert (batch["views"] == 1).tolist() == [True] * 4
        for key, pixels in zip(batch["keys"], batch["pixels"]):      # each key is its sample's, as the tars say
            np.testing.assert_array_equal(pixels.numpy(), plain[key]["pixels.npy"])
    assert [got, second] == expected and all(k.endswith("-v1") for keys in second for k in keys)


def test_a_state_taken_after_an_epochs_last_batch_does_not_skip_the_next_epoch(store):
    """The training loop checkpoints with its iterator still open: a state_dict() after epoch 0's last batch says
    epoch 1's start, and the iterator, run to its end afterwards, leaves the loader there too (not at epoch 2)."""
    opened = hdistill.open_store(str(store))
    epochs = opened.loader(batch_size=4, buffer_mb=0.02)
    expected = [[b["keys"] for b in epochs] for _ in range(2)]       # epoch 0, then epoch 1
    loader = opened.loader(batch_size=4, buffer_mb=0.02)
    batches = iter(loader)
    first = [next(batches)["keys"] for _ in range(3)]                 # the epoch's 3 batches, the iterator still open
    assert loader.state_dict() == {"epoch": 1, "batch": 0}
    assert list(batches) == [] and loader.state_dict() == {"epoch": 1, "batch": 0}
    assert [first, [b["keys"] for b in loader]] == expected

"""What a newcomer runs into: bad numbers, paths and files refused in one line, run folders that refuse a second
run or another store, what a run says when it resumes or is finished, and files that are the same bytes whenever
they are made from the same inputs."""
import errno
import fcntl
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from helpers import CLI_TINY, config, precompute, runtime, write_photos
from hdistill.cli import cli
from hdistill.common.errors import HdistillError
from hdistill.common.processes import Failure
from hdistill.precompute.data import list_images
from hdistill.precompute.image import decode_image
from hdistill.train.run import run_train

TRAIN_ARGS = ["--batch-size", "4", "--lr", "1e-3", "--workers", "0", "--device", "cpu", "--lane-buffer-mb", "0.02",
              "--student-arg", "depth=3", "--student-arg", "embed_dim=24", "--student-arg", "num_heads=6"]


def train_cli(store, out, *extra):
    return CliRunner().invoke(cli, ["train", "--shards", str(store), "--out", str(out), *TRAIN_ARGS, *extra])


def refused(result) -> str:
    """The one-line error of a refused command (exit 1 or click's 2), without a traceback."""
    assert result.exit_code in (1, 2), result.output
    assert isinstance(result.exception, SystemExit), f"an escaped exception: {result.exception!r}"
    assert "Traceback" not in result.output
    assert result.output.splitlines()[-1].startswith("Error: ")
    return result.output


@pytest.mark.parametrize("option, value", [("--steps", "0"), ("--steps", "-5"), ("--epochs", "0"),
                                           ("--batch-size", "0"), ("--log-every", "0"), ("--checkpoint-every", "0"),
                                           ("--val-every", "0"), ("--lr", "-1"), ("--lr", "0")])
def test_train_refuses_numbers_that_cannot_run_and_writes_nothing(stores, tmp_path, option, value):
    args = [option, value] + ([] if option in ("--steps", "--epochs") else ["--steps", "2"])
    output = refused(train_cli(stores / "kept", tmp_path / "run", *args))
    assert f"Invalid value for '{option}'" in output
    assert not (tmp_path / "run").exists()


def test_precompute_refuses_limit_zero(tmp_path):
    output = refused(CliRunner().invoke(cli, ["precompute", "--data", "synthetic:4", "--out", str(tmp_path / "s"),
                                              "--limit", "0", *CLI_TINY]))
    assert "Invalid value for '--limit'" in output and "no images found" not in output


def test_an_out_folder_below_a_file_is_named(stores, tmp_path):
    (tmp_path / "a-file").write_text("x")
    output = refused(train_cli(stores / "kept", tmp_path / "a-file" / "run", "--steps", "2"))
    assert f"Invalid value for '--out': {tmp_path / 'a-file' / 'run'}: {tmp_path / 'a-file'} is a file" in output
    output = refused(CliRunner().invoke(cli, ["precompute", "--data", "synthetic:4", "--out",
                                              str(tmp_path / "a-file" / "store"), *CLI_TINY]))
    assert f"--out {tmp_path / 'a-file' / 'store'}: {tmp_path / 'a-file'} is a file, not a folder" in output
    assert (tmp_path / "a-file").read_text() == "x"


def test_a_failed_or_refused_train_leaves_its_folder_as_it_was(stores, tmp_path):
    output = refused(train_cli(stores / "kept", tmp_path / "bad-loss", "--steps", "2", "--loss", "mae:rel@0=1"))
    assert "the store holds no rel.mae.b0" in output
    assert not (tmp_path / "bad-loss").exists()
    output = refused(train_cli(stores / "kept", tmp_path / "grid", "--steps", "2", "--student-arg", "patch_size=8"))
    assert f"the store {stores / 'kept'}" in output, "the grid mismatch names the store, not its image list"
    assert not (tmp_path / "grid").exists()

    run = tmp_path / "run"
    assert train_cli(stores / "kept", run, "--steps", "2").exit_code == 0
    written = (run / "config.yaml").read_bytes()
    output = refused(train_cli(stores / "kept", run, "--steps", "2", "--lr", "2e-3", "--student-arg", "depth=4",
                               "--loss", "clip:feat=1"))
    assert "(--student-arg, --lr, --loss)" in output or all(o in output for o in ("--student-arg", "--lr", "--loss"))
    assert "--student-args" not in output and "--losses" not in output
    assert (run / "config.yaml").read_bytes() == written, "a refused resume keeps the run's config.yaml"
    result = CliRunner().invoke(cli, ["train", "--config", str(run / "config.yaml")])
    assert result.exit_code == 0 and "is finished (step 2 of 2)" in result.output, result.output


def test_resume_refuses_another_store_at_the_same_path(stores, tmp_path):
    store, run = tmp_path / "store", tmp_path / "run"
    shutil.copytree(stores / "kept", store)
    assert train_cli(store, run, "--steps", "2").exit_code == 0
    shutil.rmtree(store)
    write_photos(tmp_path / "other-photos", 8, seed=5)
    precompute(tmp_path / "other-photos", store, views=2, formats=["wds"],
               targets=["clip:feat", "mae:rel@1,2", "mae:msa@1", "mae:feat@2"])
    output = refused(train_cli(store, run, "--steps", "4"))
    assert f"--shards {store} is not the store {run} was trained on" in output


def test_a_second_run_into_the_same_folder_is_refused_while_the_first_holds_it(stores, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    with open(run / ".lock", "a+") as held:           # what a running train holds: an flock on RUN/.lock
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write("pid 4242 on elsewhere\n")
        held.flush()
        output = refused(train_cli(stores / "kept", run, "--steps", "2"))
        assert f"the run {run} is being written by pid 4242 on elsewhere" in output
        assert not (run / "metrics.jsonl").exists() and not (run / "config.yaml").exists()
    assert train_cli(stores / "kept", run, "--steps", "2").exit_code == 0, "released when its holder closes it"


def test_resume_says_where_it_starts_and_a_finished_run_says_so(stores, tmp_path):
    run = tmp_path / "run"
    first = train_cli(stores / "kept", run, "--steps", "2", "--log-every", "1",
                      "--val-shards", str(stores / "kept"), "--val-every", "2")
    assert first.exit_code == 0, first.output
    assert "train: step 1 terms: feat.clip " in first.output and " x 1 = " in first.output
    assert "train: step 2/2 val/loss " in first.output, "validation reaches the plain progress lines"
    (run / ".checkpoint.pt.tmp-99999").write_bytes(b"half")        # what a SIGKILL mid-write leaves
    (run / ".student.safetensors.tmp-99999").write_bytes(b"half")
    resumed = train_cli(stores / "kept", run, "--steps", "4", "--log-every", "1",
                        "--val-shards", str(stores / "kept"), "--val-every", "2")
    assert resumed.exit_code == 0, resumed.output
    assert f"train: resuming {run / 'checkpoint.pt'} at step 2 of 4 (epoch 1 of 2, after its batch 2)" in resumed.output
    assert "view(s) per image" not in first.output + resumed.output   # 4 steps of 4: 2 epochs, as many as views
    longer = train_cli(stores / "kept", tmp_path / "longer", "--steps", "8")
    assert "train: 3 epochs from a store of 2 view(s) per image: epoch e reads view e mod 2" in longer.output
    assert not list(run.glob(".*.tmp-*")), "a killed run's temporaries are removed at start"
    again = train_cli(stores / "kept", run, "--steps", "4", "--val-shards", str(stores / "kept"), "--val-every", "2")
    assert again.exit_code == 0
    assert f"train: {run} is finished (step 4 of 4); the student is {run / 'student.safetensors'}" in again.output
    assert "train: finished in" not in again.output and "resuming" not in again.output


def test_a_checkpoint_without_a_loader_state_is_refused_naming_it(stores, tmp_path):
    """A checkpoint of an earlier hdistill (its data position was a "position" pair) is refused with one line."""
    run = tmp_path / "run"
    assert train_cli(stores / "kept", run, "--steps", "2").exit_code == 0
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    state["position"] = (state.pop("loader")["epoch"], 0)
    torch.save(state, run / "checkpoint.pt")
    output = refused(train_cli(stores / "kept", run, "--steps", "4"))
    assert f"{run / 'checkpoint.pt'} was written by an earlier hdistill (it holds no loader state_dict)" in output


def test_a_full_disk_while_writing_a_checkpoint_is_named_and_keeps_the_last_one(stores, tmp_path, monkeypatch):
    import hdistill.common.atomic as atomic
    run = tmp_path / "run"
    run_train(config(stores / "kept", steps=2), str(run), runtime(checkpoint_every=2))
    before = (run / "checkpoint.pt").read_bytes()

    class FullDisk(io.FileIO):
        def write(self, data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    real_open = open
    monkeypatch.setattr(atomic, "open", lambda path, mode="r", *a, **k: FullDisk(path, "w")
                        if ".checkpoint.pt." in str(path) else real_open(path, mode, *a, **k), raising=False)
    with pytest.raises(HdistillError, match=r"cannot write .*checkpoint.pt.pending-4: No space left on device \(the disk is "
                                            r"full\)\. Files already committed are intact"):
        run_train(config(stores / "kept", steps=4), str(run), runtime(checkpoint_every=2))
    assert (run / "checkpoint.pt").read_bytes() == before
    assert not list(run.glob(".*.tmp-*"))


def test_a_store_replaced_under_a_run_is_named(tmp_path):
    from hdistill.train.data import StreamSpec
    from hdistill.train.loader import Store
    write_photos(tmp_path / "photos", 10, seed=2)
    precompute(tmp_path / "photos", tmp_path / "small", views=1, formats=["wds"], shard_size=8)
    write_photos(tmp_path / "photos", 12, seed=2)
    precompute(tmp_path / "photos", tmp_path / "big", views=1, formats=["wds"], shard_size=8)
    started_on = Store(tmp_path / "big").manifest      # the manifest the run read, then the store was replaced
    replaced = Store(tmp_path / "small")
    replaced.manifest = started_on
    stream = replaced.stream(StreamSpec((started_on.target("feat.clip"),), "progressive", seed=0, lanes=1,
                                        batch_size=12))
    # its shards no longer have the recorded checksums: the first one read stops the run, named
    with pytest.raises(HdistillError, match=r"small/wds/view0-00000[01].tar: crc32c [0-9a-f]{8} differs from the "
                                            r"[0-9a-f]{8} its commit recorded: the shard was damaged, changed or replaced"):
        for piece in stream:
            if isinstance(piece, Failure):
                raise HdistillError(piece.message)


def test_a_corrupt_weights_file_is_named(tmp_path):
    from hdistill.precompute.teachers import WeightSource, build_teacher
    bad = tmp_path / "mae.safetensors"
    bad.write_text("this is not a weights file")
    with pytest.raises(HdistillError, match=rf"teacher 'mae': weight file {bad} is not a readable safetensors file"):
        build_teacher("mae", WeightSource.parse(str(bad)), 64, "vit_base_patch16_224",
                      dict(depth=2, embed_dim=32, num_heads=4))
    output = refused(CliRunner().invoke(cli, ["eval", "--data", str(tmp_path), "--student-weights", str(bad)]))
    assert f"--student-weights {bad}: not a readable safetensors file" in output


def test_a_16_bit_png_keeps_its_tones(tmp_path):
    values = np.linspace(12, 65506, 48 * 40).reshape(40, 48).astype(np.uint16)
    buf = io.BytesIO()
    Image.fromarray(values).save(buf, format="PNG")
    pixels = np.asarray(decode_image(buf.getvalue(), "deep.png"))
    expected = (values // 256).astype(np.uint8)           # the high byte, as torchvision's to_dtype(uint8) scales
    assert pixels.shape == (40, 48, 3)
    for c in range(3):
        np.testing.assert_array_equal(pixels[..., c], expected)
    assert abs(float(pixels.mean()) - float(values.mean()) / 256) < 1


def test_a_symlink_loop_lists_each_image_once(tmp_path):
    write_photos(tmp_path / "images", 3, seed=1)
    (tmp_path / "images" / "class0" / "loop").symlink_to("..")
    (tmp_path / "images" / "again").symlink_to("class1")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        refs = list_images(str(tmp_path / "images"))
    expected = sorted(str(p) for p in (tmp_path / "images").glob("class*/*.jpg"))
    assert sorted(r.source for r in refs) == expected
    assert len([w for w in caught if "already listed under another path" in str(w.message)]) == 2


def test_an_unreadable_image_and_the_config_give_the_same_bytes_on_every_run(tmp_path):
    write_photos(tmp_path / "images", 3, seed=4)
    (tmp_path / "images" / "class0" / "broken.jpg").write_bytes(b"not an image at all")
    assert "0x" not in str(pytest.raises(HdistillError, decode_image, b"not an image", "x.jpg").value)
    flags = ["--data", str(tmp_path / "images"), "--views", "1", "--format", "wds", *CLI_TINY, "--quiet"]
    first = CliRunner().invoke(cli, ["precompute", "--out", str(tmp_path / "a"), *flags])
    assert first.exit_code == 0, first.output
    # the same options from a --config file, keys in another order
    (tmp_path / "options.yaml").write_text(
        "views: 1\nformat: wds\nimage-size: 64\nbatch-size: 4\nshard-size: 4\nrandom-init: true\n"
        "model-arg: [mae.depth=4, mae.embed_dim=32, mae.num_heads=4, clip.depth=3, clip.embed_dim=24, clip.num_heads=3]\n"
        f"data: {tmp_path / 'images'}\nmodel: [mae=vit_base_patch16_224, clip=vit_base_patch16_clip_quickgelu_224]\n"
        "encoding: [fp16]\npixels: raw\ncompress: none\n")
    second = CliRunner().invoke(cli, ["precompute", "--config", str(tmp_path / "options.yaml"), "--out",
                                      str(tmp_path / "b"), "--quiet"])
    assert second.exit_code == 0, second.output
    manifests = [json.loads((tmp_path / s / "manifest.json").read_text()) for s in "ab"]
    assert [s["reason"] for s in manifests[0]["skipped"]] == [
        f"{tmp_path / 'images' / 'class0' / 'broken.jpg'}: not a readable image (PIL recognises no image format in it)"]
    for name in ("manifest.json", "config.yaml"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    commits = sorted(p.name for p in (tmp_path / "a" / "commits").iterdir())
    for name in commits:
        assert (tmp_path / "a" / "commits" / name).read_bytes() == (tmp_path / "b" / "commits" / name).read_bytes()


EXPORT = """
import sys, torch
from hdistill.train.student import build_student, export_student
torch.manual_seed(0)
export_student(build_student("vit_base_patch16_224", 32, dict(depth=1, embed_dim=16, num_heads=2)), sys.argv[1])
"""


def test_equal_students_export_equal_bytes_across_processes(tmp_path):
    digests = set()
    for i in range(3):      # safetensors orders its metadata by a hash seeded per process
        path = tmp_path / f"s{i}.safetensors"
        subprocess.run([sys.executable, "-c", EXPORT, str(path)], check=True, capture_output=True,
                       env={**os.environ, "PYTHONHASHSEED": "random"})
        digests.add(hashlib.sha256(path.read_bytes()).hexdigest())
    assert len(digests) == 1
    from safetensors.torch import load_file
    state = load_file(str(tmp_path / "s0.safetensors"))
    torch.manual_seed(0)
    from hdistill.train.student import build_student
    expected = build_student("vit_base_patch16_224", 32, dict(depth=1, embed_dim=16, num_heads=2)).model.state_dict()
    assert state.keys() == expected.keys() and all(torch.equal(state[k], expected[k]) for k in state)


def test_run_config_records_local_stores_absolute_and_loads_from_anywhere(stores, tmp_path, monkeypatch):
    monkeypatch.chdir(stores)
    assert train_cli("kept", tmp_path / "run", "--steps", "2", "--val-shards", "full").exit_code == 0
    import yaml
    recorded = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert (recorded["shards"], recorded["val_shards"], recorded["out"]) == \
        (str(stores / "kept"), str(stores / "full"), str(tmp_path / "run"))
    monkeypatch.chdir(tmp_path)                                   # elsewhere: the same run, finished
    result = CliRunner().invoke(cli, ["train", "--config", str(tmp_path / "run" / "config.yaml")])
    assert result.exit_code == 0 and "is finished (step 2 of 2)" in result.output, result.output


def test_a_failed_start_leaves_nothing(stores, tmp_path):
    """A store too small for one batch is refused before the folder is made; a shard found damaged when the first
    batch is read leaves no config.yaml, metrics.jsonl, tensorboard/ or lock behind."""
    output = refused(train_cli(stores / "kept", tmp_path / "big", "--steps", "2", "--batch-size", "16"))
    assert "--batch-size 16: the store's epoch holds 12 samples, too few for one global batch of 16" in output
    assert not (tmp_path / "big").exists()
    store = tmp_path / "store"
    shutil.copytree(stores / "kept", store)
    for tar in (store / "wds").glob("view0-*.tar"):              # same size, other bytes: only its crc32c tells
        data = bytearray(tar.read_bytes())
        data[len(data) // 2] ^= 1
        tar.write_bytes(bytes(data))
    output = refused(train_cli(store, tmp_path / "run", "--steps", "2"))
    assert "differs from the" in output and "its commit recorded" in output
    assert not (tmp_path / "run").exists()
    (tmp_path / "kept-folder").mkdir()
    (tmp_path / "kept-folder" / "notes.txt").write_text("mine")
    refused(train_cli(store, tmp_path / "kept-folder", "--steps", "2"))
    assert sorted(p.name for p in (tmp_path / "kept-folder").iterdir()) == ["notes.txt"]


def test_what_a_new_user_runs_into_is_named_with_what_to_do(stores, tmp_path):
    # a student of another patch size: the grid error says which patch size the store wants
    output = refused(train_cli(stores / "kept", tmp_path / "run", "--steps", "2", "--student", "vit_small_patch14_dinov2",
                               "--student-arg", "embed_dim=24", "--student-arg", "num_heads=6", "--student-arg",
                               "depth=3"))
    assert "Give the student the store's patch size: --student-arg patch_size=16" in output
    output = refused(CliRunner().invoke(cli, ["train", "--shards", str(stores / "kept"), "--out", str(tmp_path / "r"),
                                              "--steps", "1", "--student", "resnet50"]))
    assert "--student resnet50: a ResNet, not a ViT" in output
    output = refused(CliRunner().invoke(cli, ["precompute", "--data", "synthetic:4", "--out", str(tmp_path / "s"),
                                              *CLI_TINY, "--teachers", "mae,mae"]))
    assert "--teachers mae,mae names mae more than once" in output
    # more loader processes than a rank has lanes; a term the others dwarf (said with the option that balances it)
    result = train_cli(stores / "kept", tmp_path / "run", "--steps", "1", "--workers", "8", "--loss", "clip:feat=1",
                       "--loss", "mae:rel@2=10000")
    assert result.exit_code == 0, result.output
    assert "train: warning: --workers 8: each rank reads 4 lane(s)" in result.output
    assert "train: warning: at step 1 feat.clip is " in result.output and "balance the terms with the --loss weights" \
        in result.output
    assert "epoch 1/1" in result.output


def test_precompute_says_what_differs_and_what_a_mask_keeps(tmp_path):
    run = lambda *extra: CliRunner().invoke(cli, ["precompute", "--data", "synthetic:4", "--out",  # noqa: E731
                                                  str(tmp_path / "s"), *CLI_TINY, "--workers", "0", *extra])
    first = run("--mask-ratio", "0.99")
    assert first.exit_code == 0, first.output
    assert "precompute: warning: the mask keeps 1 of 16 patches (16 -> 1 -> 1 -> 1, --mask-ratio 0.99 at 3 " \
           "stage(s))" in first.output
    output = refused(run("--mask-ratio", "0.99", "--format", "wds,zarr", "--model", "clip=vit_small_patch16_224"))
    assert "options that differ: --format, --model" in output

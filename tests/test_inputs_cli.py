"""Input sources give the same samples; the CLI reports bad input as one clear line."""
import tarfile

import numpy as np
import pytest
from click.testing import CliRunner

from helpers import CLI_TINY, precompute, wds_samples, write_photos
from hdistill.cli import cli


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("photos")
    write_photos(folder, 5, seed=7)
    return folder


def test_folder_tars_and_list_file_give_the_same_samples(photos, tmp_path):
    files = sorted(p.relative_to(photos) for p in photos.rglob("*.jpg"))
    for i, chunk in enumerate((files[:3], files[3:])):  # webdataset shards, brace notation
        with tarfile.open(tmp_path / f"images-{i:03d}.tar", "w") as tar:
            for rel in chunk:
                tar.add(photos / rel, arcname=str(rel))
    listing = tmp_path / "list.txt"
    listing.write_text("".join(f"{photos / rel}\n" for rel in files))

    precompute(photos, tmp_path / "from-folder", formats=["wds"])
    precompute(str(tmp_path / "images-{000..001}.tar"), tmp_path / "from-tars", formats=["wds"])
    stores = [wds_samples(tmp_path / s) for s in ("from-folder", "from-tars")]
    assert len(stores[0]) == 5 and stores[0].keys() == stores[1].keys()
    for key, sample in stores[0].items():
        for entry in ("stage.npy", "keep.npy", "pixels.npy", "feat.clip.npy", "rel.mae.b2.npy"):
            np.testing.assert_array_equal(sample[entry], stores[1][key][entry])

    precompute(listing, tmp_path / "from-list", formats=["wds"], limit=2)
    from_list = wds_samples(tmp_path / "from-list")
    assert len(from_list) == 2
    first = next(iter(from_list.values()))
    assert first["json"]["source"] == str(photos / files[0])


def run_cli(*args):
    result = CliRunner().invoke(cli, list(args))
    assert result.exit_code in (1, 2), result.output  # 2: click's own usage errors
    assert result.output.splitlines()[-1].startswith("Error: ")
    assert isinstance(result.exception, SystemExit), "a clear error, not an escaped exception"
    return result.output


def test_cli_errors_are_one_clear_line(photos, tmp_path):
    base = ["precompute", "--data", str(photos), "--out", str(tmp_path / "s"), "--device", "cpu", "--workers", "0"]
    assert "unknown teacher role 'mea'" in run_cli(*base, "--teachers", "mea,clip", "--random-init")
    assert "no weights for teacher(s) mae, clip" in run_cli(*base)
    assert "expected ROLE.KEY=VALUE" in run_cli(*base, *CLI_TINY, "--model-arg", "depth=3")
    assert "--target mae:rel@7: block 7 is out of range for a 4-block model" in run_cli(
        *base, *CLI_TINY, "--target", "mae:rel@2,7")
    assert "--target 'mae:att@2': expected ROLE:KIND" in run_cli(*base, *CLI_TINY, "--target", "mae:att@2")
    assert "--mask-blocks of teacher 'mae': block 9 is out of range" in run_cli(*base, *CLI_TINY, "--mask-blocks", "0,9")
    assert "--encoding bf16 cannot be written in --format wds: it is for zarr only" in run_cli(*base, *CLI_TINY, "--encoding", "bf16")
    assert "--weights names deit, which is not among --teachers" in run_cli(*base, *CLI_TINY, "--weights", "deit=hub")
    assert "--format tar: use wds, zarr or wds,zarr" in run_cli(*base, *CLI_TINY, "--format", "tar")
    assert "no such folder, list file or tar shards" in run_cli(
        "precompute", "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "t"), *CLI_TINY)
    assert "weight file" in run_cli(*base, "--teachers", "mae", "--weights", f"mae={tmp_path / 'missing.safetensors'}")
    assert "not an hdistill store" in run_cli("inspect", str(tmp_path))
    (tmp_path / "a-file").write_text("x")
    assert "is a file" in run_cli(*base[:-6], "--out", str(tmp_path / "a-file"), *CLI_TINY)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("x")
    assert "exists and is not an hdistill store" in run_cli(*base[:-6], "--out", str(tmp_path / "other"), *CLI_TINY)
    assert (tmp_path / "other" / "notes.txt").read_text() == "x"


def test_every_command_explains_its_options():
    for command in ([], ["precompute"], ["inspect"], ["verify"]):
        result = CliRunner().invoke(cli, [*command, "--help"])
        assert result.exit_code == 0
    text = CliRunner().invoke(cli, ["precompute", "--help"]).output
    for option in ("--teachers", "--model", "--model-arg", "--weights", "--random-init", "--views", "--image-size",
                   "--target", "--encoding", "--mask-ratio", "--mask-strategy", "--mask-blocks", "--mask-mean",
                   "--mask-forward", "--tokens", "--format", "--seed", "--batch-size",
                   "--device", "--workers", "--shard-size", "--limit", "--rank", "--world-size"):
        assert option in text


def test_flags_yaml_keys_and_config_yaml_are_one_list(stores, tmp_path):
    """Each command's flags are its config classes' option fields, and RUN/config.yaml has one key per field, in
    field order (STORE/config.yaml: test_a_yaml_config_...): the same list, whatever a later field adds."""
    import dataclasses

    import yaml

    from hdistill.common.options import option_fields, yaml_key
    from hdistill.precompute.config import PrecomputeConfig, Runtime
    from hdistill.train.config import OnlineConfig, TrainConfig, TrainRuntime
    for command, classes, own in [("precompute", (PrecomputeConfig, Runtime), {"--out", "--config"}),
                                  ("train", (TrainConfig, TrainRuntime, OnlineConfig), {"--out", "--config", "--sweep"})]:
        flags = {opt for p in cli.commands[command].params for opt in p.opts + p.secondary_opts if opt.startswith("--")}
        fields = [f for cls in classes for f in option_fields(cls)]
        declared = {flag for f in fields for flag in (f.metadata["option"].flag or f.metadata["option"].name(f.name))
                    .split("/")}
        assert flags == declared | own, command
        assert not [f.name for cls in classes for f in dataclasses.fields(cls) if "option" not in f.metadata
                    and f.name != "log_every_s"], f"{command}: a config field without its option"
    run = tmp_path / "run"
    assert CliRunner().invoke(cli, ["train", "--shards", str(stores / "kept"), "--out", str(run), "--steps", "1",
                                    "--batch-size", "4", "--workers", "0", "--device", "cpu", "--quiet",
                                    "--lane-buffer-mb", "0.02", "--student-arg", "depth=3", "--student-arg", "embed_dim=24",
                                    "--student-arg", "num_heads=6"]).exit_code == 0
    run_keys = list(yaml.safe_load((run / "config.yaml").read_text()))
    assert run_keys == ["out", *(yaml_key(f) for cls in (TrainConfig, TrainRuntime, OnlineConfig)
                                 for f in option_fields(cls))]


def test_the_mask_options_reach_the_manifest_and_inspect(photos, tmp_path):
    import json
    out = tmp_path / "direct"
    result = CliRunner().invoke(cli, ["precompute", "--data", str(photos), "--out", str(out), "--device", "cpu",
                                      "--workers", "0", "--quiet", *CLI_TINY, "--mask-strategy", "direct",
                                      "--mask-forward", "drop", "--mask-mean", "raw"])
    assert result.exit_code == 0, result.output
    mask = json.loads((out / "manifest.json").read_text())["mask"]
    # a 4-block teacher: progressive stages at [0, 1, 2] keep 16 -> 12 -> 9 -> 7; direct ranks once at block 3
    assert {k: mask[k] for k in ("strategy", "blocks", "stages", "mean", "forward")} == \
        {"strategy": "direct", "blocks": [3], "stages": 3, "mean": "raw", "forward": "drop"}
    for sample in wds_samples(out).values():
        assert sample["keep.npy"].shape == (7,) and set(np.unique(sample["stage.npy"])) == {0, 1}
    shown = CliRunner().invoke(cli, ["inspect", str(out)]).output
    assert "mask       direct mae K=0.3 blocks [3] (matching 3 progressive stages) mean=raw forward=drop" in shown


def test_device_under_torchrun_and_worker_count(monkeypatch):
    import torch

    from hdistill.common.runtime import loader_workers, resolve_device
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert resolve_device("cuda") == "cuda:3" and resolve_device("auto") == "cuda:3"
    assert resolve_device("cuda:1") == "cuda:1" and resolve_device("cpu") == "cpu"
    monkeypatch.setattr("os.sched_getaffinity", lambda _pid: {0, 1})
    assert loader_workers(None) == 2 and loader_workers(1) == 1 and loader_workers(8) == 2
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")                 # two ranks share the two CPUs
    assert loader_workers(None) == 1


def test_a_yaml_config_sets_options_flags_override_and_the_resolved_one_reloads(photos, tmp_path):
    import json

    import yaml
    config = tmp_path / "store.yaml"
    config.write_text(yaml.safe_dump({
        "data": str(photos), "random-init": True, "image_size": 64, "shard-size": 4, "batch_size": 4,
        "model": ["mae=vit_base_patch16_224", "clip=vit_base_patch16_clip_quickgelu_224"],
        "model-arg": ["mae.depth=4", "mae.embed_dim=32", "mae.num_heads=4", "clip.depth=3", "clip.embed_dim=24",
                      "clip.num_heads=3"],
        "target": ["clip:feat", "mae:rel@-2"], "workers": 0, "device": "cpu"}))
    runner = CliRunner()
    first = runner.invoke(cli, ["precompute", "--config", str(config), "--out", str(tmp_path / "a"), "--shard-size", "2"])
    assert first.exit_code == 0, first.output
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert manifest["layout"]["shard_size"] == 2, "the flag overrides the file"
    assert [t["name"] for t in manifest["targets"]] == ["feat.clip", "rel.mae.b2"] and manifest["layout"]["image_size"] == 64
    resolved = yaml.safe_load((tmp_path / "a" / "config.yaml").read_text())
    from hdistill.common.options import option_fields, yaml_key
    from hdistill.precompute.config import PrecomputeConfig
    assert list(resolved) == [yaml_key(f) for f in option_fields(PrecomputeConfig)], "the store's fields, in order"
    assert resolved["shard_size"] == 2 and resolved["target"] == ["clip:feat", "mae:rel@-2"] and "workers" not in resolved
    again = runner.invoke(cli, ["precompute", "--config", str(tmp_path / "a" / "config.yaml"), "--out", str(tmp_path / "b"),
                                "--workers", "0", "--device", "cpu"])
    assert again.exit_code == 0, again.output
    second = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert second["shards"] == manifest["shards"], "the resolved configuration makes the same store"
    config.write_text("data: x\nbatch-sise: 4\n")
    bad = runner.invoke(cli, ["precompute", "--config", str(config), "--out", str(tmp_path / "c")])
    assert bad.exit_code == 2 and "store.yaml: hdistill precompute: no option 'batch-sise'" in bad.output

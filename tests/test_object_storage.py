"""Images and stores on object storage: a real S3 endpoint (moto's server mode) and a plain http.server, both on
127.0.0.1. Precompute into s3://, kill it mid-upload and resume, compare with a local run byte for byte; train
from s3:// and http://; a dropped connection is retried; bad configuration fails with one line."""
import functools
import hashlib
import http.server
import io
import json
import logging
import socket
import subprocess
import sys
import tarfile
import tempfile
import threading
import uuid
from pathlib import Path

import numpy as np
import pytest

s3fs = pytest.importorskip("s3fs", reason="the cloud extra is not installed")
moto_server = pytest.importorskip("moto.server", reason="moto[server] (the test extra) is not installed")

from helpers import config as train_config, precompute, precompute_command, precompute_env, runtime, write_photos  # noqa: E402
from hdistill.common.errors import HdistillError  # noqa: E402
from hdistill.common.storage import Retry  # noqa: E402
from hdistill.shards.manifest import read_manifest  # noqa: E402
from hdistill.shards.reader import StoreReader  # noqa: E402
from hdistill.train.run import run_train  # noqa: E402

HERE = Path(__file__).resolve().parent
NO_CREDENTIALS = {"AWS_SHARED_CREDENTIALS_FILE": "/nonexistent", "AWS_CONFIG_FILE": "/nonexistent",
                  "AWS_EC2_METADATA_DISABLED": "true"}


# ---------------------------------------------------------------- endpoints

@pytest.fixture(scope="module")
def s3():
    """A local S3 endpoint; the standard AWS variables point every client (and subprocess) at it."""
    logging.getLogger("werkzeug").setLevel(logging.ERROR)     # no line per request
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1", **NO_CREDENTIALS}
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        s3fs.S3FileSystem.clear_instance_cache()
        yield s3fs.S3FileSystem()
    server.stop()
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture
def bucket(s3):
    name = f"b{uuid.uuid4().hex[:12]}"
    s3.mkdir(name)
    return name


class FaultyHandler(http.server.SimpleHTTPRequestHandler):
    """Serves a folder; a GET of a path in `cut` sends the full Content-Length, half the body, then drops the
    connection, as often as its count says. `gets` counts the GETs of every path."""

    cut: dict[str, int] = {}
    gets: dict[str, int] = {}

    def log_message(self, *args):
        pass

    def do_GET(self):
        FaultyHandler.gets[self.path] = FaultyHandler.gets.get(self.path, 0) + 1
        if self.path.startswith("/forbidden/"):
            self.send_error(403)
            return
        if FaultyHandler.cut.get(self.path, 0) > 0:
            FaultyHandler.cut[self.path] -= 1
            data = Path(self.translate_path(self.path)).read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data[:len(data) // 2])
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
            self.close_connection = True
            return
        super().do_GET()


@pytest.fixture(scope="module")
def served_stores(tmp_path_factory):
    """A local training store (2 views) and its http:// URL."""
    root = tmp_path_factory.mktemp("served")
    write_photos(root / "photos", 12, seed=11)
    precompute(root / "photos", root / "kept", views=2, formats=["wds", "zarr"])
    precompute(root / "photos", root / "other", views=2, formats=["wds"], seed=1)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                             functools.partial(FaultyHandler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_port}"
    server.shutdown()


# ---------------------------------------------------------------- helpers

def objects(s3, prefix: str) -> dict[str, str]:
    """Relative object name -> sha256, for every object under the prefix."""
    s3.invalidate_cache()
    return {path[len(prefix) + 1:]: hashlib.sha256(s3.cat_file(path)).hexdigest() for path in s3.find(prefix)}


def files(folder: Path) -> dict[str, str]:
    """Relative path -> sha256 of a local store's files; locks/ holds pids, which object storage has no use for."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*")
            if p.is_file() and p.relative_to(folder).parts[0] != "locks"}


def cli(*args, env=None, check=True):
    proc = subprocess.run([sys.executable, "-m", "hdistill", *args], capture_output=True, text=True,
                          env={**precompute_env(), **(env or {})})
    if check and proc.returncode:
        raise AssertionError(proc.stderr[-3000:])
    return proc


def precompute_args(data, out, *extra):
    """`hdistill precompute` arguments (after the program name) for a tiny 2-view store in both formats."""
    return precompute_command(data, out, "--views", "2", *extra)[3:]


def metrics(run: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k != "samples_per_s"}
            for line in (run / "metrics.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------- precompute into s3://

@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("photos")
    write_photos(folder, 10, seed=5)
    return folder


@pytest.fixture(scope="module")
def local_store(photos, tmp_path_factory):
    out = tmp_path_factory.mktemp("local") / "store"
    cli(*precompute_args(photos, out))
    return out


KILL_MID_UPLOAD = """
import os, signal, sys
import s3fs
from hdistill.cli import main

put, tars = s3fs.S3FileSystem._put_file, []

async def put_or_die(self, lpath, rpath, **kw):
    # the third shard tar: start a multipart upload, send half the bytes as a part, and die before completing it
    if rpath.endswith(".tar"):
        tars.append(rpath)
        if len(tars) == 3:
            data = open(lpath, "rb").read()
            bucket, key, _ = self.split_path(rpath)
            upload = await self._call_s3("create_multipart_upload", Bucket=bucket, Key=key)
            await self._call_s3("upload_part", Bucket=bucket, Key=key, UploadId=upload["UploadId"], PartNumber=1,
                                Body=data[:len(data) // 2])
            os.kill(os.getpid(), signal.SIGKILL)
    return await put(self, lpath, rpath, **kw)

s3fs.S3FileSystem._put_file = put_or_die
sys.argv = ["hdistill", *sys.argv[1:]]
main()
"""


def test_precompute_into_s3_killed_mid_upload_resumes_to_the_local_store(s3, bucket, photos, local_store, tmp_path):
    url = f"s3://{bucket}/store"
    staging = tmp_path / "staging"
    staging.mkdir()
    env = {**precompute_env(), "TMPDIR": str(staging)}
    killed = subprocess.run([sys.executable, "-c", KILL_MID_UPLOAD, *precompute_args(photos, url)], env=env,
                            capture_output=True, text=True)
    assert killed.returncode == -9, killed.stderr[-2000:]
    partial = objects(s3, f"{bucket}/store")
    assert not any(name.startswith("wds/view0-000002") for name in partial), "an unfinished upload is no object"
    assert len([n for n in partial if n.startswith("commits/")]) == 2, "the two shards before the kill committed"
    uploads = s3.call_s3("list_multipart_uploads", Bucket=bucket).get("Uploads", [])
    assert [u["Key"] for u in uploads] == ["store/wds/view0-000002.tar"], "the killed upload is left unfinished"
    staged = lambda: [p.name for p in staging.iterdir() if p.name.startswith("hdistill-stage-")]  # noqa: E731
    # (not torch's own cache, torchinductor_<user>, which importing timm makes in $TMPDIR)
    assert [name.endswith("view0-000002.tar") for name in staged()] == [True], "the kill left its staged tar"

    cli(*precompute_args(photos, url), env={"TMPDIR": str(staging)})
    assert staged() == [], "the rerun removed the killed run's staged tar"
    assert objects(s3, f"{bucket}/store") == files(local_store)     # every object, byte for byte, manifest included
    assert read_manifest(url).complete
    assert "ok: 6 shards, 20 samples" in cli("verify", url).stdout
    assert "complete" in cli("inspect", url).stdout


RECORD_UPLOADS = """
import sys
import s3fs
from hdistill.cli import main

put, pipe, log = s3fs.S3FileSystem._put_file, s3fs.S3FileSystem._pipe_file, open(sys.argv[1], "w")

async def recorded_put(self, lpath, rpath, **kw):      # staged files: tars, commit records, manifest, zarr metadata
    print(rpath, file=log, flush=True)
    return await put(self, lpath, rpath, **kw)

async def recorded_pipe(self, path, data, **kw):       # zarr's own writes: one object per array and store shard
    print(path, file=log, flush=True)
    return await pipe(self, path, data, **kw)

s3fs.S3FileSystem._put_file, s3fs.S3FileSystem._pipe_file = recorded_put, recorded_pipe
sys.argv = ["hdistill", *sys.argv[2:]]
main()
"""


def test_two_ranks_into_s3_write_disjoint_shards_and_the_local_store(s3, bucket, photos, local_store, tmp_path):
    url = f"s3://{bucket}/store"
    ranks = [subprocess.Popen([sys.executable, "-c", RECORD_UPLOADS, str(tmp_path / f"rank{r}.log"),
                               *precompute_args(photos, url, "--rank", str(r), "--world-size", "2")],
                              env=precompute_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in range(2)]
    for proc in ranks:
        _out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-2000:]
    uploads = [{line.split("/store/", 1)[1] for line in (tmp_path / f"rank{r}.log").read_text().split()}
               for r in range(2)]
    shared = uploads[0] & uploads[1]
    assert shared <= {"manifest.json", "config.yaml"} | {n for n in shared if n.endswith("zarr.json")}, \
        "shards, zarr regions and commit records are written by one rank; shared objects are the same bytes"
    assert any("/c/" in n for n in uploads[0]) and any("/c/" in n for n in uploads[1]), "both wrote zarr regions"
    assert {n for n in uploads[0] | uploads[1] if n.startswith("wds/")} == \
        {n for n in files(local_store) if n.startswith("wds/")}
    assert objects(s3, f"{bucket}/store") == files(local_store)


def test_staging_holds_one_shard_and_is_emptied(s3, bucket, photos, tmp_path, monkeypatch):
    staging = tmp_path / "staging"
    staging.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(staging))
    seen = []
    put = s3fs.S3FileSystem._put_file

    async def observed(self, lpath, rpath, **kw):
        seen.append(sorted(p.name for p in staging.rglob("*.tar")))
        return await put(self, lpath, rpath, **kw)

    monkeypatch.setattr(s3fs.S3FileSystem, "_put_file", observed)
    s3fs.S3FileSystem.clear_instance_cache()
    manifest, _ = precompute(photos, f"s3://{bucket}/store", views=2, shard_size=2, formats=["wds"])
    s3fs.S3FileSystem.clear_instance_cache()
    assert manifest.complete and len(manifest.shards) == 10
    assert max(len(tars) for tars in seen) == 1, "one shard is staged at a time"
    assert [p for p in staging.iterdir() if p.name.startswith("hdistill-stage-")] == [], \
        "staged files are removed after upload"


def test_images_on_s3_as_a_folder_and_as_tars_give_the_local_targets(s3, bucket, photos, tmp_path):
    s3.put(str(photos), f"{bucket}/photos", recursive=True)
    names = sorted(str(p.relative_to(photos)) for p in photos.rglob("*.jpg"))
    for part in range(2):          # two webdataset-style tars, members in walk order
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            for name in names[part * 5:(part + 1) * 5]:
                tar.add(photos / name, arcname=name)
        s3.pipe_file(f"{bucket}/tars/part-{part}.tar", buf.getvalue())
        (tmp_path / f"part-{part}.tar").write_bytes(buf.getvalue())
    made = {}
    for label, data in [("local", photos), ("s3-folder", f"s3://{bucket}/photos"),
                        ("local-tars", tmp_path / "part-{0..1}.tar"), ("s3-tars", f"s3://{bucket}/tars/part-{{0..1}}.tar")]:
        manifest, _ = precompute(data, tmp_path / label, formats=["wds"])
        reader = StoreReader(tmp_path / label, manifest)
        made[label] = [s for shard in manifest.shards for s in reader.read(shard)]
    for label in ("s3-folder", "local-tars", "s3-tars"):
        assert [s.key for s in made[label]] == [s.key for s in made["local"]], label
        for a, b in zip(made[label], made["local"]):
            np.testing.assert_array_equal(a.pixels, b.pixels)
            for name in b.targets:
                np.testing.assert_array_equal(a.targets[name], b.targets[name])
    assert made["s3-tars"][0].record.source.startswith(f"s3://{bucket}/tars/part-")
    kept = sorted(p.name.rsplit("-", 1)[0] for p in (tmp_path / "s3-tars" / "inputs").iterdir())
    assert kept == ["part-0.tar", "part-1.tar"], "remote tars' listings are kept in the store"


def test_a_remote_tar_is_listed_once_and_again_when_it_changes(s3, bucket, photos, tmp_path, monkeypatch):
    from hdistill.common.storage import Location
    from hdistill.precompute import data
    names = sorted(str(p.relative_to(photos)) for p in photos.rglob("*.jpg"))
    for part in range(3):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            for name in names[part * 3:(part + 1) * 3]:
                tar.add(photos / name, arcname=name)
        s3.pipe_file(f"{bucket}/tars/t{part}.tar", buf.getvalue())
    walked = []
    walk = data._tar_members
    monkeypatch.setattr(data, "_tar_members", lambda url: walked.append(url) or walk(url))
    pattern, store = f"s3://{bucket}/tars/t{{0..2}}.tar", Location(f"s3://{bucket}/store")
    first = data.list_images(pattern, index=data.TarIndex(store, rank=1, world_size=3))
    assert sorted(walked) == [f"s3://{bucket}/tars/t{i}.tar" for i in range(3)]
    assert data.TarIndex(store, rank=1, world_size=3).order(10) == [3, 4, 5, 6, 7, 8, 9, 0, 1, 2], \
        "rank 1 of 3 lists its own share first"
    walked.clear()
    assert data.list_images(pattern, index=data.TarIndex(store)) == first and walked == [], "kept listings are read"
    s3.pipe_file(f"{bucket}/tars/t2.tar", s3.cat_file(f"{bucket}/tars/t0.tar") + b"\0" * 1024)   # t2 changed
    changed = data.list_images(pattern.replace("{0..2}", "{1..2}"), index=data.TarIndex(store))
    assert walked == [f"s3://{bucket}/tars/t2.tar"]
    assert [r.image_id for r in changed] == [r.image_id for r in first[3:6] + first[:3]]
    with pytest.raises(HdistillError, match=r"tar shard s3://.*/tars/t7.tar does not exist"):
        data.list_images(f"s3://{bucket}/tars/t{{2,7}}.tar", index=data.TarIndex(store))


def test_an_image_read_that_drops_is_retried_and_one_that_keeps_failing_stops_precompute(served_stores, tmp_path):
    from hdistill.precompute.config import PrecomputeConfig, Runtime
    from hdistill.precompute.run import run_precompute
    from helpers import TINY
    root, http_root = served_stores
    names = sorted(str(p.relative_to(root / "photos")) for p in (root / "photos").rglob("*.jpg"))  # class<i>/*.jpg
    (root / "photos" / "list.txt").write_text("\n".join(names) + "\n")      # served as http_root/photos/list.txt

    def run(data, out, attempts=3):
        return run_precompute(PrecomputeConfig(data=str(data), **TINY), str(out),
                              Runtime(workers=0, quiet=True, retry=Retry(attempts=attempts, base=0.01)))

    def samples(store, manifest):
        reader = StoreReader(store, manifest)
        return [(s.key, s.pixels, s.targets) for shard in manifest.shards for s in reader.read(shard)]

    local = samples(tmp_path / "local", run(root / "photos", tmp_path / "local"))
    image = f"/photos/{names[5]}"
    FaultyHandler.cut[image], FaultyHandler.gets[image] = 1, 0
    with pytest.warns(RuntimeWarning, match=rf"{names[5]}: .*retry 1 of 3"):
        manifest = run(f"{http_root}/photos/list.txt", tmp_path / "http")
    assert FaultyHandler.gets[image] == 2 and manifest.skipped == [], "read again, not skipped"

    FaultyHandler.cut[image] = 100
    with pytest.warns(RuntimeWarning), pytest.raises(HdistillError) as err:
        run(f"{http_root}/photos/list.txt", tmp_path / "stopped", attempts=1)
    assert f"{http_root}{image}: cannot read after 1 retries" in str(err.value)
    FaultyHandler.cut[image] = 0
    stopped = run(f"{http_root}/photos/list.txt", tmp_path / "stopped")
    for manifest, store in [(manifest, tmp_path / "http"), (stopped, tmp_path / "stopped")]:
        got = samples(store, manifest)
        assert [k for k, _, _ in got] == [k for k, _, _ in local]
        for (_, pixels, targets), (_, want_pixels, want_targets) in zip(got, local):
            np.testing.assert_array_equal(pixels, want_pixels)
            for name in want_targets:
                np.testing.assert_array_equal(targets[name], want_targets[name])


# ---------------------------------------------------------------- training from s3:// and http://

def test_train_from_s3_and_http_gives_the_local_losses(s3, bucket, served_stores, tmp_path):
    root, http_root = served_stores
    s3.put(str(root / "kept"), f"{bucket}/kept", recursive=True)
    runs = {}
    for label, shards, reader, workers in [
            ("local", root / "kept", "wds", 0), ("s3", f"s3://{bucket}/kept", "wds", 2),
            ("s3-zarr", f"s3://{bucket}/kept", "zarr", 2), ("http", f"{http_root}/kept", "wds", 0)]:
        run_train(train_config(shards, val_shards=str(shards), val_every=3), str(tmp_path / label),
                  runtime(format=reader, workers=workers))
        runs[label] = metrics(tmp_path / label)
    assert any("val/loss" in r for r in runs["local"])
    for label in ("s3", "s3-zarr", "http"):
        assert runs[label] == runs["local"], label


def test_a_dropped_connection_is_retried_and_changes_nothing(served_stores, tmp_path):
    _root, http_root = served_stores
    shard = "/kept/wds/view1-000001.tar"      # read in epoch 1
    FaultyHandler.gets[shard] = 0
    run_train(train_config(f"{http_root}/kept"), str(tmp_path / "reference"), runtime())
    reads = FaultyHandler.gets[shard]
    FaultyHandler.cut[shard], FaultyHandler.gets[shard] = 1, 0
    with pytest.warns(RuntimeWarning, match=r"view1-000001.tar: .*retry 1 of 3"):
        run_train(train_config(f"{http_root}/kept"), str(tmp_path / "dropped"),
                  runtime(retry=Retry(attempts=3, base=0.01)))
    assert FaultyHandler.gets[shard] == reads + 1, "the shard was read again after the drop"
    assert metrics(tmp_path / "dropped") == metrics(tmp_path / "reference")


def test_a_connection_that_keeps_dropping_stops_the_run_and_its_checkpoint_resumes_exactly(served_stores, tmp_path):
    root, http_root = served_stores
    run_train(train_config(root / "kept", steps=8), str(tmp_path / "local"), runtime())
    shard = "/kept/wds/view1-000000.tar"      # read in epoch 1 (steps 4-6), after the checkpoint at step 2
    FaultyHandler.cut[shard] = 100
    run = tmp_path / "http"
    rt = runtime(checkpoint_every=2, retry=Retry(attempts=2, base=0.01))
    with pytest.warns(RuntimeWarning), pytest.raises(HdistillError) as err:
        run_train(train_config(f"{http_root}/kept", steps=8), str(run), rt)
    assert f"{http_root}{shard}: unreadable shard after 2 retries" in str(err.value)
    assert (run / "checkpoint.pt").exists()
    FaultyHandler.cut[shard] = 0
    # resumed from a copy of the same store in another place (local disk): the data position carries over
    run_train(train_config(root / "kept", steps=8), str(run), rt)
    assert metrics(run)[-8:] == metrics(tmp_path / "local")
    with pytest.raises(HdistillError, match="--shards"):          # another store is refused
        run_train(train_config(root / "other", steps=9), str(run), rt)


# ---------------------------------------------------------------- bad configuration

def test_bad_configuration_fails_at_start_up_with_one_line(s3, bucket, served_stores, photos, tmp_path):
    root, http_root = served_stores
    no_keys = {"AWS_ACCESS_KEY_ID": "", "AWS_SECRET_ACCESS_KEY": ""}
    hub = ["--weights", "mae=hub", "--weights", "clip=hub"]       # would fail later, offline: the check comes first
    args = [a for a in precompute_args(photos, f"s3://{bucket}/store") if a != "--random-init"] + hub
    cases = {
        "credentials": (args, no_keys, f"s3://{bucket}/store: no credentials found to write it; set AWS_ACCESS_KEY_ID"),
        "bucket": ([a.replace(bucket, "no-such-bucket") for a in args], None,
                   "s3://no-such-bucket/store: not found (The specified bucket does not exist)"),
        "read-only": ([a.replace(f"s3://{bucket}", http_root) for a in args], None, "http:// is read-only"),
        "train-credentials": (["train", "--shards", f"s3://{bucket}/kept", "--out", str(tmp_path / "r"),
                               "--steps", "1"], no_keys, f"s3://{bucket}/kept/manifest.json: no credentials found"),
        "train-bucket": (["train", "--shards", "s3://no-such-bucket/kept", "--out", str(tmp_path / "r"),
                          "--steps", "1"], None, "s3://no-such-bucket/kept/manifest.json: not found (The specified bucket does not exist)"),
        "train-permission": (["train", "--shards", f"{http_root}/forbidden/kept", "--out", str(tmp_path / "r"),
                              "--steps", "1"], None, f"{http_root}/forbidden/kept/manifest.json: no permission to read"),
        "train-out": (["train", "--shards", f"{http_root}/kept", "--out", f"s3://{bucket}/run", "--steps", "1"],
                      None, "the run folder is a local (or shared file system) folder, not a URL"),
    }
    for label, (argv, env, message) in cases.items():
        proc = cli(*argv, env=env, check=False)
        lines = [line for line in proc.stderr.splitlines() if line.strip() and not line.startswith("Usage")
                 and not line.startswith("Try ")]
        assert proc.returncode != 0 and len(lines) == 1 and message in lines[0], (label, proc.stderr[-2000:])
    assert not s3.exists(f"{bucket}/store"), "nothing was written"


def test_without_the_cloud_extra_a_url_names_it(served_stores):
    _root, http_root = served_stores
    code = ("import sys; sys.modules['s3fs'] = sys.modules['aiohttp'] = None; from hdistill.cli import main; "
            "sys.argv = ['hdistill', 'inspect', sys.argv[1]]; main()")
    for url in ("s3://bucket/store", f"{http_root}/kept"):
        proc = subprocess.run([sys.executable, "-c", code, url], capture_output=True, text=True)
        assert proc.returncode == 1 and 'pip install "hdistill[cloud]"' in proc.stderr, proc.stderr[-2000:]

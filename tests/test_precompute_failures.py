"""Precompute failures that are easy to miss: nothing readable, many inputs skipped, a write that fails (a full disk),
images over the pixel limit, and what a resume says."""
import io
import resource
import shutil
import signal
import subprocess

import pytest
from PIL import Image

from helpers import precompute, precompute_command, precompute_env, write_photos
from hdistill.common.errors import HdistillError
from hdistill.shards.verify import verify_store


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("failures") / "photos"
    write_photos(folder, 8, seed=31)
    return folder


def test_a_run_that_can_read_no_input_fails_and_commits_nothing(photos, tmp_path):
    """A list of paths that no longer exist (a lost mount): no store that trains on nothing, and no empty shards
    committed, so the run after the fix reads every image."""
    moved = tmp_path / "mount"
    listing = tmp_path / "images.txt"
    listing.write_text("".join(f"{moved / p.relative_to(photos)}\n" for p in sorted(photos.rglob("*.jpg"))))
    with pytest.raises(HdistillError, match=r"precompute: none of the images of its 8 views could be read \(first: "
                                            rf"{moved}/\S+: cannot read \(No such file or directory\); .*nothing was "
                                            r"committed. Check --data"):
        precompute(listing, tmp_path / "store")
    assert not list((tmp_path / "store" / "commits").glob("*.json"))
    shutil.copytree(photos, moved)                                  # the mount is back
    manifest, _ = precompute(listing, tmp_path / "store")
    assert manifest.complete and manifest.samples == 8 and not manifest.skipped


def test_many_skipped_inputs_end_with_a_warning_and_the_first_reasons(photos, tmp_path, capsys):
    folder = tmp_path / "photos"
    shutil.copytree(photos, folder)
    (folder / "class0" / "zz-cut.jpg").write_bytes((folder / "class0" / "img002.jpg").read_bytes()[:200])
    manifest, _ = precompute(folder, tmp_path / "store")
    assert manifest.samples == 8 and len(manifest.skipped) == 1
    err = capsys.readouterr().err
    assert "precompute: warning: 1 of 9 views (11.1%) were skipped, their images unreadable (first: " in err
    assert "zz-cut.jpg: not a readable image" in err


def _file_size_limit(limit: int):
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)        # a write past the limit fails (EFBIG) instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def test_a_failed_write_is_one_line_and_the_rerun_resumes(photos, tmp_path):
    """A write that fails as a full disk does (here the file size limit: EFBIG) inside zarr: one line naming the
    file, no traceback; the shards committed before it stay, and the same command completes the store."""
    command = precompute_command(photos, tmp_path / "store") + ["--format", "zarr", "--shard-size", "4"]
    failed = subprocess.run(command, env=precompute_env(), capture_output=True, text=True,
                            preexec_fn=_file_size_limit(12_000))     # the manifest fits, a shard of pixels does not
    assert failed.returncode == 1, failed.stderr[-2000:]
    assert "Traceback" not in failed.stderr
    error = [line for line in failed.stderr.splitlines() if line.startswith("Error:")]
    assert len(error) == 1 and "Error: cannot write " in error[0] and "targets.zarr/" in error[0]
    assert "(over the file size limit of this process: ulimit -f). Files already committed are intact" in error[0]
    committed = len(list((tmp_path / "store" / "commits").glob("*.json")))
    manifest, _ = precompute(photos, tmp_path / "store", formats=["zarr"], shard_size=4)   # the same command's config
    assert manifest.complete and manifest.samples == 8
    assert verify_store(tmp_path / "store")[1] == [], "the shards committed before the failure are whole"
    assert committed < len(manifest.shards)


def test_images_over_the_pixel_limit_are_skipped_unless_it_is_raised(photos, tmp_path):
    folder = tmp_path / "photos"
    shutil.copytree(photos, folder)
    buf = io.BytesIO()
    Image.new("RGB", (400, 300), (200, 30, 30)).save(buf, format="PNG")       # 120,000 pixels; the photos: < 40,000
    (folder / "class1" / "wide.png").write_bytes(buf.getvalue())
    manifest, _ = precompute(folder, tmp_path / "small", max_image_pixels=119_999)
    reasons = [s["reason"] for s in manifest.skipped]
    assert len(reasons) == 1 and "wide.png: Image size (120000 pixels) exceeds limit of 119999 pixels" in reasons[0]
    assert "give precompute --max-image-pixels N to read larger images" in reasons[0]
    manifest, _ = precompute(folder, tmp_path / "large", max_image_pixels=120_000)
    assert not manifest.skipped and manifest.samples == 9
    assert manifest.config["max_image_pixels"] == 120_000 and Image.MAX_IMAGE_PIXELS == 89_478_485   # PIL's, again


def test_a_resume_says_what_was_committed_before(photos, tmp_path, capsys):
    precompute(photos, tmp_path / "store", shard_size=4, views=2)
    (tmp_path / "store" / "commits" / "view1-000000.json").unlink()
    capsys.readouterr()
    manifest, _ = precompute(photos, tmp_path / "store", shard_size=4, views=2)
    assert manifest.complete
    assert f"precompute: resuming {tmp_path / 'store'}: 3 of its 4 shards were committed before, 1 to go" in \
        capsys.readouterr().err

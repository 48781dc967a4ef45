"""Where files live: a local folder, or a prefix on object storage (s3://, gs://, http(s)://) through fsspec.

A Location is a folder whose files are addressed by relative names ("wds/view0-000000.tar"). The
guarantees are the same on both:
  - a file appears whole or not at all: locally it is written to a temporary name, fsynced and
    renamed; on object storage it is staged in a local temporary file, uploaded with one put (an
    object exists only once its upload completes) and the staged file is removed;
  - http(s):// is read-only.
Credentials and endpoints come from where fsspec's backends look for them: the AWS variables
(AWS_ACCESS_KEY_ID, AWS_PROFILE, AWS_ENDPOINT_URL, ...) for s3fs, Google's application default
credentials for gcsfs, and fsspec's own configuration (FSSPEC_S3_*, ~/.config/fsspec).
The backends are the `cloud` extra (`pip install "hdistill[cloud]"`; gs:// needs "hdistill[gcs]").
"""
from __future__ import annotations

import os
import posixpath
import shutil
import socket
import sys
import tempfile
import threading
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import google_crc32c
import numpy as np

from .atomic import atomic_open, write_error
from .errors import HdistillError

# scheme -> (the module fsspec needs for it, the extra that installs it)
BACKENDS = {"s3": ("s3fs", "cloud"), "gs": ("gcsfs", "gcs"), "gcs": ("gcsfs", "gcs"),
            "http": ("aiohttp", "cloud"), "https": ("aiohttp", "cloud")}
READ_ONLY = ("http", "https")
STREAM_BLOCK = 16 * 2 ** 20     # bytes per ranged read when streaming an object (a tar shard) from start to end
CRC_BLOCK = 2 ** 20             # bytes per checksum update: google-crc32c releases the GIL from 1 MiB of bytes up


def is_url(path) -> bool:
    return "://" in str(path)


def scheme(path) -> str:
    return str(path).split("://", 1)[0].lower() if is_url(path) else "file"


def _backend(url: str):
    """(fsspec filesystem, path within it) for a remote URL; a clear error when the backend is missing."""
    name = scheme(url)
    if name not in BACKENDS:
        raise HdistillError(f"{url}: unsupported URL scheme {name}://; use a local path, s3://, gs:// or http(s)://")
    module, extra = BACKENDS[name]
    try:
        __import__(module)
        import fsspec
    except ImportError:
        raise HdistillError(f"{url}: {name}:// needs the cloud libraries: pip install \"hdistill[{extra}]\"") from None
    # no listing cache: other ranks add commit records while this one runs, and a stale listing would hide them
    return fsspec.core.url_to_fs(url, use_listings_cache=False)


STAGING = "hdistill-stage-"


def staging_prefix() -> str:
    """Prefix of this process's staged files and folders in the temporary folder ($TMPDIR)."""
    return f"{STAGING}{os.getpid()}-"


def remove_dead_staging():
    """Remove what killed processes of this machine left staged in the temporary folder."""
    folder = tempfile.gettempdir()
    for entry in os.listdir(folder):
        pid = entry[len(STAGING):].split("-", 1)[0]
        if not entry.startswith(STAGING) or not pid.isdigit() or _alive(int(pid)):
            continue
        path = os.path.join(folder, entry)
        shutil.rmtree(path, ignore_errors=True) if os.path.isdir(path) else Path(path).unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:      # alive, another user's
        pass
    return True


def read_file(url: str, start: int | None = None, end: int | None = None) -> bytes:
    """The bytes of a file or object (the range [start, end) if given). FileNotFoundError passes through."""
    if not is_url(url):
        with open(url, "rb") as f:
            if start is None:
                return f.read()
            f.seek(start)
            return f.read(end - start)
    fs, path = _backend(url)
    return fs.cat_file(path, start=start, end=end)


def read_files(requests: list[tuple[str, int | None, int | None]]) -> list[bytes | Exception]:
    """The bytes of many files or byte ranges, (url, start, end) each; a failure is returned in its place.
    Remote requests are sent together (fsspec's cat_ranges: concurrent on one event loop), since a request
    to object storage is bound by its latency, not by its bytes."""
    out: list[bytes | Exception | None] = [None] * len(requests)
    remote: dict[int, tuple] = {}
    for i, (url, start, end) in enumerate(requests):
        if is_url(url):
            remote[i] = (*_backend(url), start, end)
            continue
        try:
            out[i] = read_file(url, start, end)
        except OSError as err:
            out[i] = err
    by_fs: dict[int, list[int]] = {}
    for i, (fs, *_rest) in remote.items():
        by_fs.setdefault(id(fs), []).append(i)
    for indices in by_fs.values():
        fs = remote[indices[0]][0]
        got = fs.cat_ranges([remote[i][1] for i in indices], [remote[i][2] for i in indices],
                            [remote[i][3] for i in indices], on_error="return")
        for i, data in zip(indices, got):
            out[i] = data
    return out


def open_file(url: str, block_size: int = STREAM_BLOCK, cache_type: str = "readahead"):
    """A binary file object for reading a file or object. Remote reads are ranged GETs: `block_size` bytes
    ahead ("readahead", for streaming) or exactly what each read asks for ("none", for seeking)."""
    if not is_url(url):
        return open(url, "rb")
    fs, path = _backend(url)
    return fs.open(path, "rb", block_size=block_size, cache_type=cache_type)


def storage_error(url: str, err: BaseException, doing: str = "read") -> HdistillError:
    """One line for a failure of object storage, naming the URL and what to check."""
    kind = type(err).__name__
    if kind in ("NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError"):
        return HdistillError(f"{url}: no credentials found to {doing} it; set AWS_ACCESS_KEY_ID and "
                             "AWS_SECRET_ACCESS_KEY or AWS_PROFILE (AWS_ENDPOINT_URL for an S3-compatible endpoint), "
                             "or configure fsspec")
    if isinstance(err, PermissionError) or getattr(err, "status", None) in (401, 403):
        return HdistillError(f"{url}: no permission to {doing} it ({error_text(err)})")
    if isinstance(err, FileNotFoundError):
        return HdistillError(f"{url}: not found ({error_text(err)}); check the bucket and the prefix")
    return HdistillError(f"{url}: cannot {doing} it ({kind}: {error_text(err)})")


def error_text(err: BaseException) -> str:
    """The first line of an exception's own message (webdataset appends its stream and URL to args)."""
    lines = (str(err.args[0]) if err.args else "").strip().splitlines()
    return lines[0] if lines else type(err).__name__


def transient(err: BaseException) -> bool:
    """A failure that may pass when the read is tried again: a dropped connection, a timeout, a throttle.

    Missing objects, refused permissions and damaged content are not transient.
    """
    if isinstance(err, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return False
    status = getattr(err, "status", None)                       # an HTTP answer: only timeouts and throttles
    if isinstance(status, int) and 400 <= status < 500 and status not in (408, 429):
        return False
    if isinstance(err, (ConnectionError, TimeoutError)):
        return True
    module = type(err).__module__.split(".")[0]
    if module in ("aiohttp", "botocore", "aiobotocore", "urllib3", "requests", "google"):
        return True
    return isinstance(err, OSError) and module != "builtins"   # fsspec's and the backends' OSErrors


def as_location(place: "str | Path | Location") -> "Location":
    return place if isinstance(place, Location) else Location(place)


@dataclass(frozen=True)
class Retry:
    """How often, and after how long, a read that failed transiently is tried again: `attempts` more times,
    waiting base, 2 base, 4 base, ... seconds (at most `cap`)."""

    attempts: int = 5
    base: float = 1.0
    cap: float = 30.0

    def wait(self, attempt: int, what: str, err: BaseException):
        """Warn and sleep before retry number `attempt` (0-based) of `what`."""
        delay = min(self.cap, self.base * 2 ** attempt)
        warnings.warn(f"{what}: {type(err).__name__}: {error_text(err)}; retry {attempt + 1} of {self.attempts} "
                      f"in {delay:g}s", RuntimeWarning, stacklevel=2)
        time.sleep(delay)

    def call(self, fn, what: str, failed: Exception | None = None):
        """fn(), tried again after transient failures; the last failure is raised. `failed`: how a first
        try made elsewhere (a batched read) failed; it counts as the first try."""
        attempt = 0
        while True:
            if failed is not None:
                if attempt == self.attempts or not transient(failed):
                    raise failed
                self.wait(attempt, what, failed)
                attempt += 1
            try:
                return fn()
            except Exception as err:  # noqa: BLE001 - sorted at the top of the loop
                failed = err


class Buffers:
    """Memory for loaded files, reused from one load to the next: a fresh array of hundreds of MB costs a page fault
    (and the zeroing of a page) per 4 KiB on its first write, which made a loader's loads three times slower than
    the reads themselves. `take(size)` gives a uint8 array over pooled memory that nothing else views any more (a
    loaded shard's samples are numpy views of it, and hold it until they are gone), or over new memory, kept when the
    pool has fewer than `keep`. Picklable: a process that unpickles it (a loader worker) starts an empty pool."""

    GRAIN = 1 << 20                  # memory comes in whole MiB, so shards of nearby sizes share it

    def __init__(self, keep: int = 4):
        self.keep = keep
        self.pool: list[bytearray] = []
        self.lock = threading.Lock()

    def __getstate__(self):
        return {"keep": self.keep}

    def __setstate__(self, state):
        self.__init__(state["keep"])

    def take(self, size: int) -> np.ndarray:
        with self.lock:
            free = [i for i in range(len(self.pool)) if self._unused(i)]
            fits = [i for i in free if len(self.pool[i]) >= size]
            if fits:
                memory = self.pool[fits[0]]
            else:
                memory = bytearray(-(-max(size, 1) // self.GRAIN) * self.GRAIN)
                if len(self.pool) < self.keep:
                    self.pool.append(memory)
                elif free:                      # a free one too small for this file: replaced by the larger one
                    self.pool[free[0]] = memory
        return np.frombuffer(memory, np.uint8, size)

    def _unused(self, index: int) -> bool:
        """Whether pooled memory `index` is referenced by the pool alone: no array views it any more (every numpy
        view of it holds a reference to it, whatever views it was made from)."""
        return sys.getrefcount(self.pool[index]) == 2     # the pool's list and getrefcount's own argument


class Location:
    """A folder, local or on object storage. Picklable: a DataLoader worker opens its own connection."""

    def __init__(self, url: str | Path):
        text = str(url)
        self.url = text.rstrip("/") if is_url(text) else os.path.normpath(text)
        self.remote = is_url(text)
        self.scheme = scheme(text)
        self._fs, self._root, self._pid = None, None, None

    def __repr__(self):
        return f"Location({self.url!r})"

    def __str__(self):
        return self.url

    def __getstate__(self):
        return {"url": self.url}

    def __setstate__(self, state):
        self.__init__(state["url"])

    # ---------------------------------------------------------------- names

    def url_of(self, name: str = "") -> str:
        """The URL (or local path) of a file of the folder, as messages, webdataset and zarr name it."""
        if not name:
            return self.url
        return f"{self.url}/{name}" if self.remote else os.path.join(self.url, name)

    @property
    def fs(self):
        """The fsspec filesystem (remote only), made once per process: forked workers do not share sockets."""
        if self._pid != os.getpid():
            self._fs, self._root = _backend(self.url)
            self._pid = os.getpid()
        return self._fs

    def _path(self, name: str = "") -> str:
        self.fs
        return f"{self._root}/{name}" if name else self._root

    @property
    def read_only(self) -> bool:
        return self.scheme in READ_ONLY

    # ---------------------------------------------------------------- reading

    def exists(self, name: str = "") -> bool:
        if not self.remote:
            return os.path.exists(self.url_of(name))
        try:
            return self.fs.exists(self._path(name))
        except Exception as err:  # noqa: BLE001 - credentials, endpoint: worded by storage_error
            raise storage_error(self.url_of(name), err) from None

    def read_bytes(self, name: str) -> bytes:
        """A file's bytes. FileNotFoundError passes through."""
        return read_file(self.url_of(name))

    def open(self, name: str):
        """A binary file object for reading from start to end (remote: ranged reads of STREAM_BLOCK bytes)."""
        return open_file(self.url_of(name))

    def load(self, name: str, checksum: bool = True,
             buffers: "Buffers | None" = None) -> tuple[np.ndarray | bytes, str | None]:
        """A whole file in this process's own memory, read-only, and the CRC32C of its bytes (8 hex digits; None
        without `checksum`). What is checked is what the caller reads: a file changed, truncated or removed after
        its load cannot reach it (a memory map of the file would see the change, or die of SIGBUS on a truncated
        page). A local file is read in CRC_BLOCK preads straight into a uint8 array (from `buffers`, reused, if
        given), each block checksummed as it lands, so neither the reads nor the checksum hold the GIL (a loader
        loads the next shard on a thread while it gathers this one); an object is the bytes of STREAM_BLOCK ranged
        GETs, checksummed block by block. FileNotFoundError passes through; a file that shrinks while it is read is
        named."""
        crc = 0
        if not self.remote:
            with open(self.url_of(name), "rb", buffering=0) as f:
                size = os.fstat(f.fileno()).st_size
                buf = buffers.take(size) if buffers is not None else np.empty(size, np.uint8)
                for start in range(0, size, CRC_BLOCK):
                    block = buf[start:start + CRC_BLOCK]
                    if os.preadv(f.fileno(), [block], start) != len(block):
                        raise HdistillError(f"{self.url_of(name)}: the file ended before its {size} bytes were read: "
                                            "it was truncated or replaced while being read")
                    crc = google_crc32c.extend(crc, block) if checksum else 0
            buf.flags.writeable = False
        else:
            blocks = []
            with self.open(name) as f:
                while block := f.read(STREAM_BLOCK):
                    crc = google_crc32c.extend(crc, block) if checksum else 0
                    blocks.append(block)
            buf = b"".join(blocks)
        return buf, f"{crc:08x}" if checksum else None

    def isdir(self) -> bool:
        return os.path.isdir(self.url) if not self.remote else self.fs.isdir(self._path())

    def isfile(self) -> bool:
        return os.path.isfile(self.url) if not self.remote else self.fs.isfile(self._path())

    def listdir(self) -> list[str]:
        """Names at the top of the folder ([] if it does not exist)."""
        if not self.remote:
            return os.listdir(self.url) if os.path.isdir(self.url) else []
        try:
            return [p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(self._path(), detail=False)]
        except FileNotFoundError:
            return []

    def sizes(self) -> dict[str, int]:
        """Name -> bytes of the files at the top of the folder (one listing)."""
        if not self.remote:
            return {e.name: e.stat().st_size for e in os.scandir(self.url) if e.is_file()}
        return {e["name"].rstrip("/").rsplit("/", 1)[-1]: e["size"]
                for e in self.fs.ls(self._path(), detail=True) if e["type"] == "file"}

    def total_bytes(self) -> int:
        """Bytes of every file under the folder."""
        if not self.remote:
            return sum(p.stat().st_size for p in Path(self.url).rglob("*") if p.is_file())
        return int(self.fs.du(self._path(), total=True))

    def files(self, name: str = "") -> list[str]:
        """Relative names of every file under `name` (recursively), in no particular order."""
        if not self.remote:
            return _walk_files(self.url_of(name))
        top = self._path(name).rstrip("/")
        if not self.fs.exists(top):
            return []
        return [p[len(top) + 1:] for p in self.fs.find(top) if p.startswith(top + "/")]

    def sizes_of(self, names: list[str]) -> dict[str, int]:
        """Name -> bytes of each of `names` that exists: a stat per file, or on object storage one listing of the
        folder they share (no file is read)."""
        if not self.remote:
            out = {}
            for name in names:
                try:
                    out[name] = os.stat(self.url_of(name)).st_size
                except FileNotFoundError:
                    pass
            return out
        folder = posixpath.commonpath([posixpath.dirname(n) for n in names]) if names else ""
        root = self._path().rstrip("/")
        try:
            listed = self.fs.find(self._path(folder).rstrip("/"), detail=True)
        except FileNotFoundError:
            return {}
        except Exception as err:  # noqa: BLE001 - credentials, endpoint: worded by storage_error
            raise storage_error(self.url_of(folder), err) from None
        found = {path[len(root) + 1:]: info["size"] for path, info in listed.items() if path.startswith(root + "/")}
        return {name: found[name] for name in names if name in found}

    def read_many(self, names: list[str]) -> dict[str, bytes]:
        """name -> bytes for every existing file among `names` (remote: fetched together, see read_files)."""
        out = {}
        for name, data in zip(names, read_files([(self.url_of(n), None, None) for n in names])):
            if isinstance(data, FileNotFoundError):
                continue
            if isinstance(data, Exception):
                raise storage_error(self.url_of(name), data)
            out[name] = data
        return out

    # ---------------------------------------------------------------- writing

    @contextmanager
    def write(self, name: str):
        """A binary file to write `name` through: it appears whole, or not at all, once the block ends."""
        self._refuse_read_only()
        if not self.remote:
            with atomic_open(self.url_of(name)) as f:
                yield f
            return
        fd, staged = tempfile.mkstemp(prefix=staging_prefix(), suffix="-" + os.path.basename(name))
        try:
            try:
                with os.fdopen(fd, "wb") as f:
                    yield f
            except OSError as err:               # the staging disk ($TMPDIR), full or unwritable
                raise write_error(Path(staged), err) from None
            self.upload(staged, name)
        finally:
            os.unlink(staged)

    def write_bytes(self, name: str, data: bytes):
        with self.write(name) as f:
            f.write(data)

    def upload(self, local: str | Path, name: str):
        """Put a local file at `name` in one upload (remote only)."""
        try:
            self.fs.put_file(str(local), self._path(name))
        except Exception as err:  # noqa: BLE001 - worded for the user; nothing committed is touched
            raise HdistillError(f"{storage_error(self.url_of(name), err, 'write')}. Files already committed are "
                                "intact; run the same command again to resume.") from None

    def check_writable(self, option: str):
        """Fail now, with one line naming `option`, if the folder cannot be written (nothing is left behind)."""
        self._refuse_read_only(option)
        if not self.remote:
            check_local_folder(self.url, option)
            return
        probe = f".hdistill-probe-{socket.gethostname()}-{os.getpid()}"
        try:
            self.fs.pipe_file(self._path(probe), b"")
            self.fs.rm_file(self._path(probe))
        except Exception as err:  # noqa: BLE001 - credentials, bucket, permission
            raise HdistillError(f"{option} {storage_error(self.url, err, 'write')}") from None

    def _refuse_read_only(self, option: str = ""):
        if self.read_only:
            raise HdistillError(f"{option + ' ' if option else ''}{self.url}: {self.scheme}:// is read-only; "
                                "write to a local folder, s3:// or gs://")


def _walk_files(top: str) -> list[str]:
    """Relative names of the files under a local folder, following symbolic links but entering each folder once (by
    device and inode): a link back up (loop/self -> ..) or a second link to a folder already listed is warned about
    and skipped, so no image is listed twice. Real subfolders are entered before links, each in sorted order, so a
    folder keeps its own path where it has one, whatever the file system's order."""
    seen, files = set(), []
    for folder, subfolders, names in os.walk(top, followlinks=True):
        subfolders.sort(key=lambda name: (os.path.islink(os.path.join(folder, name)), name))
        st = os.stat(folder)
        if (st.st_dev, st.st_ino) in seen:
            warnings.warn(f"{folder}: a folder already listed under another path (a symbolic link loop, or a second "
                          "link to it); its files are listed once, under the first path", stacklevel=3)
            subfolders.clear()
            continue
        seen.add((st.st_dev, st.st_ino))
        files += [os.path.relpath(os.path.join(folder, f), top) for f in names]
    return files


def check_local_folder(path: str | Path, option: str):
    """Refuse, naming `option`, a folder that cannot be made because a part of its path is a file."""
    for parent in (Path(path), *Path(path).parents):
        if parent.exists():
            if not parent.is_dir():
                raise HdistillError(f"{option} {path}: {parent} is a file, not a folder")
            return

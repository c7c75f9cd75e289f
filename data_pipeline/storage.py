"""Where a run's files live: a local disk, or an object store named by URL (`gs://bucket/run`, `s3://...`).

Local paths keep the POSIX tools the rest of the code was written with (`pathlib.Path`, rename, hard links);
a URL goes through `etils.epath` (fsspec or TensorFlow's gfile underneath), the layer orbax itself writes
checkpoints through. An object store has no rename, no append and no exclusive create on open, so what needs
those has a form here that works there:

- `atomic_write`: locally a temp file renamed over the target; on a store the whole content is rendered in
  memory and uploaded as one object (a store shows an object whole or not at all).
- `create_exclusive`: locally a hard link of a complete file; on a store an upload with an if-not-exists
  precondition (GCS `ifGenerationMatch=0`, S3 `If-None-Match`, through fsspec's `pipe_file(mode="create")`).
- `Mirror`: a file that grows (a log, metrics.jsonl, TensorBoard events) is written to a local copy and
  uploaded whole every `interval` seconds and at `close()`.
- `local_copy`: inputs that a third-party library opens by file name (a tokenizer, a Hugging Face checkpoint
  directory) are copied into a temporary directory of this process once.

A leaf module: the standard library, plus etils/fsspec imported when a URL is first met.
"""

from __future__ import annotations

import atexit
import io
import os
import pathlib
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any

PathLike = str | os.PathLike

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def is_remote(path: PathLike) -> bool:
    """Whether `path` is an object-store URL (`scheme://...`, `file://` excepted)."""
    text = os.fspath(path)
    return bool(_URL.match(text)) and not text.startswith("file://")


def path(p: PathLike) -> Any:
    """`p` as a path object: `etils.epath.Path` for a URL, `pathlib.Path` otherwise (`file://` dropped).
    Both have the pathlib methods used here (`/`, `read_text`, `write_bytes`, `exists`, `iterdir`...)."""
    if isinstance(p, pathlib.PurePath) and not isinstance(p, pathlib.Path):
        return p  # already an epath path
    text = os.fspath(p)
    if is_remote(text):
        from etils import epath

        return epath.Path(text)
    return pathlib.Path(text.removeprefix("file://"))


def absolute(p: PathLike) -> str:
    """An absolute local path (`~` expanded), or the URL without a trailing slash."""
    text = os.fspath(p)
    if is_remote(text):
        return text.rstrip("/")
    return os.path.abspath(os.path.expanduser(text.removeprefix("file://")))


def join(root: PathLike, *parts: str) -> str:
    """`root / parts` as a string, for either kind of root."""
    return str(path(root).joinpath(*parts))


def atomic_write(target: PathLike, write: Callable[[Any], None], *, binary: bool = False) -> None:
    """Calls `write(file)` and puts the result at `target` whole: never a half-written file beside readers."""
    if is_remote(target):
        buf = io.BytesIO() if binary else io.StringIO()
        write(buf)
        data = buf.getvalue()
        path(target).write_bytes(data if binary else data.encode("utf-8"))
        return
    target = path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8"})) as f:
            write(f)
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_text(target: PathLike, text: str) -> None:
    """`text` (UTF-8) at `target`, atomically (`atomic_write`)."""
    atomic_write(target, lambda f: f.write(text))


def create_exclusive(target: PathLike, data: bytes) -> bool:
    """Creates `target` holding `data` unless it exists; True when this call created it.

    Locally the complete file is hard-linked into place (or, without hard links, created with O_EXCL). On a
    store, fsspec's `pipe_file(mode="create")`: a precondition the service checks (gcsfs, s3fs), so of two
    concurrent callers exactly one wins. A scheme fsspec has no implementation for (epath on TensorFlow's
    gfile) falls back to check-then-write and a read-back of the content: two callers within the same
    moment may then both believe they won, and the loser finds out at the read-back only if its write
    landed first."""
    if is_remote(target):
        return _create_remote(os.fspath(target), data)
    target = pathlib.Path(target)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.{threading.get_ident()}.{time.time_ns()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, target)
            return True
        except FileExistsError:
            return False
        except OSError:  # a filesystem without hard links
            try:
                fd = os.open(target, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            return True
    finally:
        tmp.unlink(missing_ok=True)


def _create_remote(url: str, data: bytes) -> bool:
    try:
        import fsspec

        fs, key = fsspec.core.url_to_fs(url)
    except (ImportError, ValueError):
        fs = None
    if fs is not None:
        try:
            fs.pipe_file(key, data, mode="create")
            return True
        except FileExistsError:
            return False
    p = path(url)
    if p.exists():
        return False
    p.write_bytes(data)
    time.sleep(0.5)
    return p.read_bytes() == data


def mtime(p: PathLike) -> float:
    """Last modification time (seconds since the epoch; whole seconds on a store)."""
    if is_remote(p):
        return float(path(p).stat().mtime)
    return os.stat(p).st_mtime


def touch(p: PathLike) -> None:
    """Moves `p`'s modification time to now (on a store: uploads the same bytes again)."""
    if is_remote(p):
        target = path(p)
        target.write_bytes(target.read_bytes())
    else:
        os.utime(p)


def size(p: PathLike) -> int:
    """Size in bytes."""
    if is_remote(p):
        return int(path(p).stat().length)
    return os.stat(p).st_size


def read_bytes(p: PathLike) -> bytes:
    return path(p).read_bytes()


def as_readable(src: Any) -> Any:
    """What a decoder (PIL, PyAV) can open: the bytes of an object at a URL, anything else unchanged."""
    if isinstance(src, str | os.PathLike) and is_remote(src):
        return read_bytes(src)
    return src


def copy_tree(src: PathLike, dst: PathLike, *, last: str | None = None) -> None:
    """Copies the files under `src` to `dst` (either may be a URL), directories by listing: no rename, no
    walk that could hand back another scheme's paths. `last`: the name of a child of `src` copied after all
    the others (a file that says the rest is complete)."""
    src, dst = path(src), path(dst)
    if not src.is_dir():
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_bytes(src.read_bytes())
        return
    dst.mkdir(parents=True, exist_ok=True)
    for child in sorted(src.iterdir(), key=lambda p: p.name == last):
        copy_tree(child, dst / child.name)


_COPIES: dict[str, str] = {}
_COPIES_LOCK = threading.Lock()


def local_copy(p: PathLike) -> str:
    """A local file name for `p`: `p` itself when local; for a URL, a copy (file or whole directory) in a
    temporary directory of this process, made once and removed at exit."""
    text = os.fspath(p)
    if not is_remote(text):
        return text
    key = text.rstrip("/")
    with _COPIES_LOCK:
        if key not in _COPIES:
            root = tempfile.mkdtemp(prefix="emollm_jax-copy-")
            atexit.register(shutil.rmtree, root, True)
            local = os.path.join(root, path(key).name or "root")
            copy_tree(key, local)
            _COPIES[key] = local
        return _COPIES[key]


class Mirror:
    """A file that grows, at `target` (a local path or a URL). Write to `.local`; `push()` uploads it whole
    (at most every `interval` seconds unless `force`). Locally `.local` is the target itself and `push` does
    nothing; for a URL `.local` starts as a copy of what the store already holds (a resumed run appends)."""

    def __init__(self, target: PathLike, *, interval: float = 30.0, directory: bool = False):
        self.target, self.interval = os.fspath(target), interval
        self.remote = is_remote(self.target)
        self._last: float | None = None  # monotonic time of the last upload (the clock starts at boot)
        if not self.remote:
            self.local = self.target
            return
        self._tmp = tempfile.mkdtemp(prefix="emollm_jax-mirror-")
        self.local = os.path.join(self._tmp, path(self.target).name)
        remote = path(self.target)
        if remote.exists():
            copy_tree(remote, self.local)
        elif directory:
            os.makedirs(self.local)

    def push(self, force: bool = False) -> None:
        if not self.remote or not os.path.exists(self.local):
            return
        now = time.monotonic()
        if not force and self._last is not None and now - self._last < self.interval:
            return
        self._last = now
        copy_tree(self.local, self.target)

    def close(self) -> None:
        """Uploads the last state and removes the local copy."""
        if self.remote:
            self.push(force=True)
            shutil.rmtree(self._tmp, ignore_errors=True)

"""Output directories written whole (converted checkpoints, exported HF models): atomically, and never over
what this project did not write.

A directory written here carries a marker file, `.emollm_jax_output` (JSON: what wrote it, when, from
what). An existing non-empty output is replaced only when asked (`overwrite`) and only when it carries that
marker; an output equal to, inside, or a parent of one of the run's sources is refused outright, since
replacing it would delete the source.

An output on an object store (a `gs://...` URL) is written into a local staging directory and uploaded when
complete, the marker last: a store has no directory rename, so the upload is not atomic, but an output
without its marker is incomplete (and is never replaced: remove it by hand).
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import socket
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from data_pipeline import storage

MARKER = ".emollm_jax_output"


class OutputDirError(FileExistsError):
    """The output directory may not be written (the message says why and what to do)."""


def _resolved(path: str | os.PathLike) -> Any:
    if storage.is_remote(path):
        return storage.path(storage.absolute(path))
    return Path(path).expanduser().resolve()


def check_output_dir(out: str | os.PathLike, *, overwrite: bool = False,
                     sources: Iterable[tuple[str, str | os.PathLike]] = (),
                     overwrite_hint: str = "overwrite=True") -> None:
    """Refuses `out` when writing there could destroy data: it is, lies inside, or contains a source
    (`sources`: (name, path) pairs, e.g. ("--hf_dir", dir)); it is a file; it holds files and `overwrite` is
    off; or `overwrite` is on but this project did not write it (no marker). `overwrite_hint` is how the
    caller's user turns overwriting on."""
    target = _resolved(out)
    for name, src in sources:
        if src is None or src == "":
            continue
        s = _resolved(src)
        if target == s or s in target.parents:
            raise OutputDirError(f"{out}: the output is inside the source {name} {src}; choose another "
                                 "output")
        if target in s.parents:
            raise OutputDirError(f"{out}: the output contains the source {name} {src}; replacing it would "
                                 "delete the source; choose another output")
    if target.exists() and not target.is_dir():
        raise OutputDirError(f"{out}: exists and is not a directory")
    if not target.is_dir() or not any(target.iterdir()):
        return
    if not overwrite:
        raise OutputDirError(f"{out}: exists and is not empty; pass {overwrite_hint} to replace a directory "
                             "this tool wrote, or choose a new output")
    if not (target / MARKER).is_file():
        raise OutputDirError(f"{out}: exists and was not written by emollm_jax (no {MARKER} marker); "
                             "refusing to replace it even with overwrite; choose a new output")


def write_marker(directory: str | os.PathLike, writer: str, **info: object) -> None:
    """The marker saying `directory` was written whole by `writer` (and may be replaced by it)."""
    body = {"written_by": writer, "host": socket.gethostname(),
            "time": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"), **info}
    storage.write_text(storage.join(directory, MARKER), json.dumps(body, indent=1, default=str) + "\n")


class AtomicDir:
    """`with AtomicDir(final, writer=...) as tmp:` write into tmp; on success tmp, with the marker, replaces
    `final` by rename. `final` is checked by `check_output_dir` on entry and again before the swap (it may
    have changed meanwhile); a failed swap puts the old directory back."""

    def __init__(self, final: str | os.PathLike, *, writer: str, overwrite: bool = False,
                 sources: Iterable[tuple[str, str | os.PathLike]] = (),
                 overwrite_hint: str = "overwrite=True", info: dict | None = None):
        self.final = storage.path(final)
        self.writer, self.info = writer, dict(info or {})
        self._check = dict(overwrite=overwrite, sources=list(sources), overwrite_hint=overwrite_hint)

    def __enter__(self) -> Path:
        check_output_dir(self.final, **self._check)
        if storage.is_remote(self.final):  # staged locally, uploaded by __exit__
            self.tmp = Path(tempfile.mkdtemp(prefix=f"emollm_jax-{self.final.name}-"))
            return self.tmp
        self.final.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.final.name}.tmp-", dir=self.final.parent))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(self.tmp, 0o777 & ~umask)  # mkdtemp makes it 0700
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        try:
            check_output_dir(self.final, **self._check)
        except OutputDirError:
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise
        write_marker(self.tmp, self.writer, **self.info)
        if storage.is_remote(self.final):
            self._upload()
            return
        if not self.final.exists():
            self.tmp.rename(self.final)
            return
        old = self.final.with_name(f".{self.final.name}.old-{os.getpid()}")
        self.final.rename(old)
        try:
            self.tmp.rename(self.final)
        except BaseException:
            old.rename(self.final)
            raise
        shutil.rmtree(old, ignore_errors=True)

    def _upload(self) -> None:
        """The staged directory to the store: the old output removed, every file uploaded, the marker last."""
        try:
            if self.final.exists():
                self.final.rmtree()
            for child in sorted(self.tmp.iterdir(), key=lambda p: p.name == MARKER):
                storage.copy_tree(child, self.final / child.name)
        finally:
            shutil.rmtree(self.tmp, ignore_errors=True)

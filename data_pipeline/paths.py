"""Where a record's media live on disk and what may be read there: its path fields, resolved under a data root
that they may not leave (symlinks followed), and the largest image decoded.

A leaf module (standard library and `storage` only): the record schema (`records`) and the decoders (`media`)
both build on it, so neither needs the other for paths and limits. A data root on an object store (a URL) has
no symlinks: a media path there is normalised and may not climb above the root with `..`.
"""

from __future__ import annotations

import functools
import os
import posixpath
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from data_pipeline import storage

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
FROM_VIDEO = "from_video"  # a record's `audio` value meaning: the sound track of the record's own video file

# Largest image (width x height) decoded by default: 16.8 Mpx, e.g. 4096 x 4096, more than five times the side
# of a 336-768 px model input and above a 12 Mpx phone photo. A larger image is an error naming the file
# rather than gigabytes of pixels the resize throws away (a 12000 x 12000 PNG is a few hundred KB on disk and
# 432 MB decoded).
DEFAULT_MAX_IMAGE_PIXELS = 4096 * 4096


def media_paths(record: Mapping[str, Any]) -> tuple[str | None, list[str]]:
    """Returns `(kind, paths)` with kind "image" | "video" | None; paths as written in the record."""
    for kind in ("image", "video"):
        value = record.get(kind)
        if value is None:
            continue
        return kind, [value] if isinstance(value, str) else list(value)
    return None, []


@functools.lru_cache(maxsize=64)
def _resolved_root(root: str, cwd: str) -> Path:
    """The data root, resolved once per (root, working directory): every record's media path needs it."""
    return Path(cwd, root).resolve()


def resolve_media_path(path: str, data_root: str | os.PathLike | None) -> Any:
    """`data_root / path` with every symlink followed; ValueError for an absolute path or one that resolves
    outside the root (`data_root` None: the working directory). Under a URL root: an epath path."""
    if os.path.isabs(path) or storage.is_remote(path):
        raise ValueError(f"absolute path {path!r} refused; media paths are relative to the data root")
    if data_root is not None and storage.is_remote(data_root):
        normal = posixpath.normpath(path)
        if normal == ".." or normal.startswith("../"):
            raise ValueError(f"path {path!r} leads outside the data root {data_root}")
        return storage.path(data_root) / normal
    root = _resolved_root(str(data_root if data_root is not None else "."), os.getcwd())
    full = (root / path).resolve()
    if not full.is_relative_to(root):
        raise ValueError(f"path {path!r} resolves to {full}, outside the data root {root}")
    return full


def frame_files(directory: str | os.PathLike, data_root: str | os.PathLike | None = None) -> list[Path]:
    """Image files in `directory`, sorted by name (frames are named so that this is temporal order).

    With `data_root`, every frame is returned resolved and must stay inside the root after its symlinks are
    followed: a frame that links to a file elsewhere is a ValueError naming it, so nothing outside the root is
    read through a frame directory. Without it the paths are returned as listed.
    """
    directory = storage.path(directory)
    frames = sorted(p for p in directory.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if data_root is None or storage.is_remote(directory):  # a store has no symlinks to follow
        return frames
    root = _resolved_root(str(data_root), os.getcwd())
    resolved = []
    for frame in frames:
        full = frame.resolve()
        if not full.is_relative_to(root):
            raise ValueError(f"frame {frame} resolves to {full}, outside the data root {root}")
        resolved.append(full)
    return resolved

"""Where a record's media live on disk: its path fields, resolved under a data root that they may not leave.

A leaf module (standard library only): the record schema (`records`) and the decoders (`media`) both build on
it, so neither needs the other for paths.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
FROM_VIDEO = "from_video"  # a record's `audio` value meaning: the sound track of the record's own video file


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


def resolve_media_path(path: str, data_root: str | os.PathLike | None) -> Path:
    """`data_root / path`; ValueError for an absolute path or one that resolves outside the root."""
    if os.path.isabs(path):
        raise ValueError(f"absolute path {path!r} refused; media paths are relative to the data root")
    root = _resolved_root(str(data_root if data_root is not None else "."), os.getcwd())
    full = (root / path).resolve()
    if not full.is_relative_to(root):
        raise ValueError(f"path {path!r} resolves to {full}, outside the data root {root}")
    return full


def frame_files(directory: str | os.PathLike) -> list[Path]:
    """Image files in `directory`, sorted by name (frames are named so that this is temporal order)."""
    return sorted(p for p in Path(directory).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())

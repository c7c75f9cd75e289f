"""Checkpoint tensor I/O: stream HF safetensors (single file or sharded index) one tensor at a time, and write
them back (into an `AtomicDir`, `emollm_jax.outdir`). numpy only (bfloat16 via ml_dtypes), so conversion
needs no torch; `.bin` files need an explicit `allow_pickle=True` and go through
`torch.load(weights_only=True)`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from emollm_jax.outdir import AtomicDir  # noqa: F401  (re-exported: output directories written whole)

SAFE_SINGLE = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
BIN_SINGLE = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"


class CheckpointError(ValueError):
    """A checkpoint file is missing, truncated, corrupt or does not match the model (the message names it)."""


class TensorSource:
    """The tensors of one checkpoint: names and shapes up front (headers only), values streamed on demand.

    `keys()` lists every tensor; `iter_tensors()` is a generator yielding `(key, np.ndarray)` one at a time,
    file by file, so peak host memory is one tensor (plus what the caller keeps).
    """

    def __init__(self, key_to_file: dict[str, Path], *, pickled: bool = False):
        self._key_to_file = key_to_file
        self._pickled = pickled
        self._shapes: dict[str, tuple[int, ...]] = {}
        if not pickled:
            for path, keys in self._by_file().items():
                with _open(path) as f:
                    missing = set(keys) - set(f.keys())
                    if missing:
                        raise CheckpointError(f"{path}: index lists tensors not in it: {sorted(missing)[:5]}")
                    for k in keys:
                        self._shapes[k] = tuple(f.get_slice(k).get_shape())

    def keys(self) -> list[str]:
        return list(self._key_to_file)

    def files(self) -> list[Path]:
        return list(self._by_file())

    def shape(self, key: str) -> tuple[int, ...] | None:
        """Shape from the header (None for pickled .bin checkpoints, known only once loaded)."""
        return self._shapes.get(key)

    def _by_file(self) -> dict[Path, list[str]]:
        out: dict[Path, list[str]] = {}
        for k, p in self._key_to_file.items():
            out.setdefault(p, []).append(k)
        return out

    def iter_tensors(self) -> Iterator[tuple[str, np.ndarray]]:
        for path, keys in self._by_file().items():
            if self._pickled:
                yield from _iter_bin(path, keys)
                continue
            with _open(path) as f:
                for k in keys:
                    try:
                        arr = f.get_tensor(k)
                    except Exception as e:  # safetensors raises its own error types on truncated data
                        raise CheckpointError(f"{path}: cannot read tensor {k!r} ({e}); truncated?") from e
                    yield k, arr


def _open(path: Path):
    try:
        return safe_open(str(path), framework="numpy")
    except Exception as e:
        size = path.stat().st_size if path.exists() else "missing"
        raise CheckpointError(f"{path}: not a readable safetensors file (size {size} bytes): {e}") from e


def _iter_bin(path: Path, keys: list[str]) -> Iterator[tuple[str, np.ndarray]]:
    import torch  # only for explicitly allowed .bin checkpoints

    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        raise CheckpointError(f"{path}: torch.load(weights_only=True) failed: {e}") from e
    for k in keys:
        if k not in state:
            raise CheckpointError(f"{path}: index lists tensor {k!r} that the file lacks")
        t = state.pop(k)
        if t.dtype == torch.bfloat16:
            import ml_dtypes

            yield k, t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        else:
            yield k, t.numpy()


def open_checkpoint(path: str | os.PathLike, *, allow_pickle: bool = False) -> TensorSource:
    """A `TensorSource` for a model directory (model.safetensors, or its sharded index) or a single file."""
    path = Path(path)
    if path.is_file():
        if path.suffix == ".safetensors":
            with _open(path) as f:
                return TensorSource({k: path for k in f.keys()})
        if path.suffix == ".bin":
            _check_pickle(path, allow_pickle)
            return TensorSource(_bin_keys(path), pickled=True)
        raise CheckpointError(f"{path}: expected a .safetensors file or a model directory")
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint file or directory")
    if (path / SAFE_INDEX).exists():
        return TensorSource(_read_index(path / SAFE_INDEX))
    if (path / SAFE_SINGLE).exists():
        return open_checkpoint(path / SAFE_SINGLE)
    if (path / BIN_INDEX).exists() or (path / BIN_SINGLE).exists():
        target = path / (BIN_INDEX if (path / BIN_INDEX).exists() else BIN_SINGLE)
        _check_pickle(target, allow_pickle)
        if target.name == BIN_INDEX:
            return TensorSource(_read_index(target), pickled=True)
        return TensorSource(_bin_keys(target), pickled=True)
    raise CheckpointError(f"{path}: no {SAFE_SINGLE}, {SAFE_INDEX}, {BIN_SINGLE} or {BIN_INDEX} found")


def _check_pickle(path: Path, allow_pickle: bool) -> None:
    if not allow_pickle:
        raise CheckpointError(
            f"{path}: PyTorch pickle checkpoint refused; pass allow_pickle=True to load it with "
            "torch.load(weights_only=True), or convert it to safetensors"
        )


def _bin_keys(path: Path) -> dict[str, Path]:
    import torch

    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        raise CheckpointError(f"{path}: torch.load(weights_only=True) failed: {e}") from e
    return {k: path for k in state}


def _read_index(index: Path) -> dict[str, Path]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError) as e:
        raise CheckpointError(f"{index}: not a checkpoint index (needs a 'weight_map' object): {e}") from e
    files = {name: index.parent / name for name in set(weight_map.values())}
    for name, p in files.items():
        if not p.exists():
            raise CheckpointError(f"{index}: shard {name} is missing")
    return {k: files[name] for k, name in weight_map.items()}


def write_safetensors(
    tensors: Iterable[tuple[str, np.ndarray]], out_dir: Path, *, max_shard_bytes: int = 5 * 2**30
) -> list[str]:
    """Writes tensors into `out_dir` as model.safetensors, or as model-0000i-of-0000n.safetensors + index when
    they exceed `max_shard_bytes`. At most one shard is held in memory. Returns the written file names."""
    shard: dict[str, np.ndarray] = {}
    shard_bytes = total = 0
    written: list[tuple[Path, list[str]]] = []

    def flush() -> None:
        p = out_dir / f"shard-{len(written):05d}.tmp"
        save_file(shard, str(p), metadata={"format": "pt"})
        written.append((p, list(shard)))
        shard.clear()

    for key, arr in tensors:
        arr = np.ascontiguousarray(arr)
        if shard and shard_bytes + arr.nbytes > max_shard_bytes:
            flush()
            shard_bytes = 0
        shard[key] = arr
        shard_bytes += arr.nbytes
        total += arr.nbytes
    if not written:
        save_file(shard, str(out_dir / SAFE_SINGLE), metadata={"format": "pt"})
        return [SAFE_SINGLE]
    flush()
    weight_map: dict[str, str] = {}
    names = []
    for i, (p, keys) in enumerate(written):
        name = f"model-{i + 1:05d}-of-{len(written):05d}.safetensors"
        p.rename(out_dir / name)
        names.append(name)
        weight_map.update({k: name for k in keys})
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out_dir / SAFE_INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return names + [SAFE_INDEX]

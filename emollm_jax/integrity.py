"""Checksums and finiteness of checkpointed arrays, computed on the devices that hold them.

Orbax stores what it is given and restores what it reads: bytes overwritten on disk come back as other
numbers (NaN, 2e38) without an error. So every saved array gets a 64-bit digest, recorded beside it, and a
restore recomputes the digests of what it read and compares. The digest is two 32-bit lanes, each the sum over
elements of a bijective mix (murmur3's finaliser) of the element's bits and its flat index: a changed element
always changes both sums, moved or several changed elements change them but with probability 2^-64.
It runs as one jitted program over every array of a tree, each on its own sharding (an exact integer sum, so
the same on any mesh and any number of processes; one launch, so a pod's processes cannot interleave it with
other collectives); only 12 bytes per array reach the host.

A record is `{"format": 1, "<item>": {path: [digest hex, dtype, shape]}, ...}` (paths as `pytree.path_str`).
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from data_pipeline import storage
from emollm_jax.pytree import flat_leaves

FORMAT = 1
RECORD_FILE = "integrity.json"  # the record inside a params-only checkpoint directory

_M1, _M2 = np.uint32(0x85EBCA6B), np.uint32(0xC2B2AE35)  # murmur3 fmix32 constants
_IDX1, _IDX2 = np.uint32(0x9E3779B1), np.uint32(0x1B873593)
_MUL2, _ADD2 = np.uint32(0xCC9E2D51), np.uint32(0xE6546B64)


class IntegrityError(ValueError):
    """What was read differs from what was written (the message names the file and the array)."""

    def __init__(self, message: str, *, where: str = "", key: str = ""):
        super().__init__(message)
        self.where, self.key = where, key


def _fmix(h: jax.Array) -> jax.Array:
    """murmur3's 32-bit finaliser: a bijection of uint32 that spreads every input bit over the output."""
    h = h ^ (h >> 16)
    h = h * _M1
    h = h ^ (h >> 13)
    h = h * _M2
    return h ^ (h >> 16)


def _words(x: jax.Array) -> jax.Array:
    """The bits of `x` as uint32[...]: 4-byte types bitcast, narrower ones widened, 8-byte ones split in 2."""
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    size = np.dtype(x.dtype).itemsize
    if size == 4:
        return jax.lax.bitcast_convert_type(x, jnp.uint32)
    if size in (1, 2):
        unsigned = jnp.uint8 if size == 1 else jnp.uint16
        return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)
    if size == 8:
        return jax.lax.bitcast_convert_type(x, jnp.uint32)  # [..., 2]
    raise TypeError(f"no checksum for dtype {x.dtype}")


@functools.partial(jax.jit, static_argnames="as_dtype")
def _digest(x: jax.Array, as_dtype: Any = None) -> jax.Array:
    """uint32[3]: the two digest lanes of `x` (first cast to `as_dtype`, the dtype it was saved in) and
    whether every element is finite (1) or not (0)."""
    if as_dtype is not None and x.dtype != as_dtype:
        x = x.astype(as_dtype)
    w = _words(x)
    idx = jnp.arange(w.size, dtype=jnp.uint32).reshape(w.shape)
    lane1 = jnp.sum(_fmix(w ^ (idx * _IDX1)), dtype=jnp.uint32)
    lane2 = jnp.sum(_fmix(w * _MUL2 + idx * _IDX2 + _ADD2), dtype=jnp.uint32)
    finite = jnp.all(jnp.isfinite(x)) if jnp.issubdtype(x.dtype, jnp.inexact) else jnp.bool_(True)
    return jnp.stack([lane1, lane2, finite.astype(jnp.uint32)])


def _host(x: jax.Array) -> np.ndarray:
    """A replicated result to host, also when the array spans processes."""
    return np.asarray(x.addressable_data(0)) if isinstance(x, jax.Array) else np.asarray(x)


Digest = tuple[str, str, list[int], bool]  # digest hex, dtype, shape, all finite


def digests(tree: Any, dtypes: Mapping[str, str] | None = None) -> dict[str, Digest]:
    """{path: (digest hex, dtype, shape, all finite)} of every array leaf of `tree`; `dtypes` names the dtype
    a leaf was saved in when it was restored as another (the digest is of the saved representation)."""
    leaves = {k: v for k, v in flat_leaves(tree).items() if hasattr(v, "dtype")}
    dtypes = dtypes or {}
    if not leaves:
        return {}
    keys = list(leaves)
    # One program for the whole tree: a run of small cross-process launches, one per array, hung two
    # processes on gloo (both waiting in the same array's launch).
    lanes = _host(_digest_all([jnp.asarray(leaves[k]) for k in keys],
                              tuple(_as_dtype(dtypes.get(k), leaves[k]) for k in keys)))
    out = {}
    for k, row in zip(keys, lanes, strict=True):
        dtype = dtypes.get(k) or str(leaves[k].dtype)
        out[k] = (f"{int(row[0]):08x}{int(row[1]):08x}", dtype, list(np.shape(leaves[k])), bool(row[2]))
    return out


@functools.partial(jax.jit, static_argnames="as_dtypes")
def _digest_all(xs: list[jax.Array], as_dtypes: tuple[Any, ...]) -> jax.Array:
    """uint32[N, 3]: `_digest` of each of the N arrays, in one computation."""
    return jnp.stack([_digest(x, d) for x, d in zip(xs, as_dtypes, strict=True)])


def _as_dtype(saved: str | None, leaf: Any) -> Any:
    return None if saved is None or saved == str(leaf.dtype) else jnp.dtype(saved)


def record(tree: Any) -> tuple[dict[str, list], list[str]]:
    """(the record section of `tree`: {path: [digest, dtype, shape]}, the paths of non-finite leaves)."""
    d = digests(tree)
    return {k: [h, dt, shape] for k, (h, dt, shape, _) in d.items()}, [k for k, v in d.items() if not v[3]]


def json_digest(value: Any) -> str:
    """sha256 of a JSON value in canonical form (meta and data-iterator items)."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def verify(tree: Any, section: Mapping[str, list], *, where: str) -> None:
    """Raises `IntegrityError` naming `where` and the first array whose digest, dtype or shape differs from
    `section` (a record section), or which the record does not know."""
    saved_dtypes = {k: v[1] for k, v in section.items()}
    got = digests(tree, saved_dtypes)
    for key, (hexd, _, shape, _) in got.items():
        want = section.get(key)
        if want is None:
            raise IntegrityError(f"{where}: array {key!r} is not in the checksum record", where=where,
                                 key=key)
        if list(want[2]) != shape:
            raise IntegrityError(f"{where}: array {key!r} has shape {shape}, recorded {want[2]}", where=where,
                                 key=key)
        if want[0] != hexd:
            raise IntegrityError(f"{where}: array {key!r} does not match its checksum (recorded {want[0]}, "
                                 f"read {hexd}): the file changed after it was written", where=where, key=key)
    missing = sorted(set(section) - set(got))
    if missing:
        raise IntegrityError(f"{where}: arrays {missing[:3]} are recorded but were not read", where=where,
                             key=missing[0])


def read_json(path: Path, *, what: str) -> Any:
    """A JSON record file; an unreadable one raises `IntegrityError` naming it."""
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise IntegrityError(f"{path}: {what} cannot be read ({e})", where=str(path)) from e


def params_record(params_dir: Path) -> dict[str, list] | None:
    """The checksum section for a params directory, or None when none was written: a training step's
    `integrity` item (`<step>/integrity/metadata`, beside `<step>/params`), else `<params_dir>/integrity.json`
    (params-only checkpoints: `checkpoint.save_params`, the conversion CLI)."""
    step_item = params_dir.parent / "integrity" / "metadata"
    if params_dir.name == "params" and step_item.is_file():
        return read_json(step_item, what="checksum record")["params"]
    own = params_dir / RECORD_FILE
    if own.is_file():
        return read_json(own, what="checksum record")["params"]
    return None


def write_params_record(params_dir: Path, section: Mapping[str, list]) -> None:
    """The checksum record of a params-only checkpoint, inside its directory (read by `params_record`)."""
    body = {"format": FORMAT, "params": dict(section)}
    storage.write_text(storage.join(params_dir, RECORD_FILE), json.dumps(body, indent=1) + "\n")

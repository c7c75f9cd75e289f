"""Conversion machinery shared by every model family: what a family is, strict accounting while streaming
a checkpoint into an abstract NNX model (every key used or ignored on purpose, every parameter filled once,
shapes checked after the hook), optional placement on a mesh as tensors are read.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from emollm_jax.convert.keymap import KeyMap, Located
from emollm_jax.convert.safetensors_io import CheckpointError, TensorSource
from emollm_jax.pytree import path_keys

Path_ = tuple[str | int, ...]
ShardFn = Callable[[Path_, np.ndarray], jax.Array]


def path_str(path: Path_) -> str:
    """A parameter path as the dotted key the key tables use ("llm.model.layers.0.mlp.up_proj.kernel")."""
    return ".".join(str(p) for p in path)


# ----------------------------------------------------------------------------------------------- families
@dataclasses.dataclass(frozen=True)
class Family:
    """How to build one kind of model from an HF directory and write it back.

    matches(hf_config, keys) -> bool picks the family; config_from_hf(hf_config, **overrides) -> our
    config; build(config, rngs) -> nnx.Module; key_map(config, hf_config, keys) -> KeyMap for this
    checkpoint's layout (prefix detection lives here); to_hf_config(model) -> config.json dict;
    export_map(model) -> KeyMap used by save_hf (transformers-5 layout); handles(model) -> whether save_hf
    uses this family for `model`; is_lm: also write generation_config.json.
    """

    name: str
    matches: Callable[[Mapping[str, Any], set[str]], bool]
    config_from_hf: Callable[..., Any]
    build: Callable[[Any, nnx.Rngs], nnx.Module]
    key_map: Callable[[Any, Mapping[str, Any], set[str]], KeyMap]
    to_hf_config: Callable[[nnx.Module], dict[str, Any]] | None = None
    export_map: Callable[[nnx.Module], KeyMap] | None = None
    handles: Callable[[nnx.Module], bool] = lambda model: False
    is_lm: bool = False


def read_hf_config(hf_dir: Path) -> dict[str, Any]:
    path = Path(hf_dir) / "config.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as e:
        raise CheckpointError(f"{path}: missing (every HF model directory has one)") from e
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from e


# ----------------------------------------------------------------------------------------------- loading
def _sharder(shardings: Any) -> ShardFn:
    if shardings is None:
        return lambda path, x: jnp.asarray(x)
    if callable(shardings) and not isinstance(shardings, jax.sharding.Sharding):
        return shardings
    if isinstance(shardings, jax.sharding.Sharding):
        return lambda path, x: jax.device_put(x, shardings)
    flat = {}
    for kp, s in jax.tree_util.tree_leaves_with_path(
        shardings, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding)
    ):
        flat[path_keys(kp, drop_value=False)] = s
    # nnx.State pytrees may add a trailing 'value' entry on each variable; match on the prefix too.
    def put(path: Path_, x: np.ndarray) -> jax.Array:
        s = flat.get(path) or flat.get(path + ("value",))
        if s is None:
            raise KeyError(f"no sharding given for parameter {path_str(path)}")
        return jax.device_put(x, s)

    return put


def fill_model(
    abstract: nnx.Module,
    source: TensorSource,
    key_map: KeyMap,
    *,
    dtype: str | None = None,
    shardings: Any = None,
    where: str = "",
    partial: bool = False,
) -> nnx.Module:
    """Streams `source` into the parameters of `abstract` (built with `nnx.eval_shape`) and returns the filled
    model. Every source key must map to a parameter (or be ignored by the key map) and every parameter must be
    filled exactly once; shapes must agree after the hook. `dtype` casts floating tensors (default: each
    parameter's own dtype). `shardings`: None, one Sharding, a callable (path, np.ndarray) -> jax.Array, or a
    pytree of Shardings shaped like the model's state. partial=True allows parameters to stay unfilled (for
    models assembled from several sources; the last call should be strict).

    A scanned layer stack (`models.stack`) is filled row by row: HF layer i's tensor is placed (as a
    [1, ...] slice on the stack's sharding) when it is read, and the rows are joined once the last arrives,
    so the host holds one tensor at a time in either layout."""
    graphdef, state = nnx.split(abstract)
    targets = {path_str(p): (p, v) for p, v in nnx.to_flat_state(state)}
    filler = _Filler(targets, _sharder(shardings), dtype, where)
    unknown: list[str] = []
    for key, arr in source.iter_tensors():
        try:
            found = key_map.locate(key)
        except KeyError:
            unknown.append(key)
            continue
        if found is not None:
            filler.add(key, found, arr)
    if unknown:
        raise CheckpointError(f"{where}: {len(unknown)} checkpoint keys match no rule: {unknown[:10]}")
    filler.check_stacks()
    filled = filler.filled
    missing = [k for k in targets if k not in filled and _is_abstract(targets[k][1])]
    if missing and not partial:
        raise CheckpointError(f"{where}: {len(missing)} model parameters not in checkpoint: {missing[:10]}")
    new_state = nnx.from_flat_state([(p, filled.get(k, v)) for k, (p, v) in targets.items()])
    return nnx.merge(graphdef, new_state)


class _Filler:
    """The parameters filled so far (`filled`: dotted path -> Variable) and a scanned stack's rows."""

    def __init__(self, targets: dict[str, tuple[Path_, Any]], put: ShardFn, dtype: str | None, where: str):
        self.targets, self.put, self.dtype, self.where = targets, put, dtype, where
        self.filled: dict[str, Any] = {}
        self.rows: dict[str, dict[int, jax.Array]] = {}

    def add(self, key: str, found: Located, arr: np.ndarray) -> None:
        if found.path in self.targets:
            self._add_whole(key, found.path, found.hook, arr)
        elif found.stacked is not None and found.stacked in self.targets:
            self._add_row(key, found.stacked, found.layer, found.hook, arr)
        else:
            raise CheckpointError(f"{self.where}: {key} maps to {found.path}, which the model does not have")

    def _ready(self, key: str, ours: str, hook: Any, arr: np.ndarray, want: Any, shape: tuple) -> np.ndarray:
        """The tensor after its hook, checked against `shape` and cast."""
        arr = hook.load(arr, shape)
        if tuple(arr.shape) != shape:
            raise CheckpointError(f"{self.where}: shape mismatch for {key} -> {ours}: expected {shape} "
                                  f"(after hook {hook}), found {tuple(arr.shape)}")
        floating = self.dtype and np.issubdtype(arr.dtype, np.floating)
        target_dtype = np.dtype(self.dtype) if floating else want.dtype
        return arr if arr.dtype == target_dtype else arr.astype(target_dtype)

    def _add_whole(self, key: str, ours: str, hook: Any, arr: np.ndarray) -> None:
        if ours in self.filled:
            raise CheckpointError(f"{self.where}: {key} fills {ours} a second time")
        path, var = self.targets[ours]
        want = var.get_value()
        self.filled[ours] = var.replace(self.put(path, self._ready(key, ours, hook, arr, want,
                                                                   tuple(want.shape))))

    def _add_row(self, key: str, ours: str, layer: int, hook: Any, arr: np.ndarray) -> None:
        path, var = self.targets[ours]
        want = var.get_value()
        depth = want.shape[0]
        rows = self.rows.setdefault(ours, {})
        if not 0 <= layer < depth:
            raise CheckpointError(f"{self.where}: {key} is layer {layer}; the stack {ours} has {depth}")
        if layer in rows or ours in self.filled:
            raise CheckpointError(f"{self.where}: {key} fills {ours}[{layer}] a second time")
        row = self._ready(key, f"{ours}[{layer}]", hook, arr, want, tuple(want.shape[1:]))
        rows[layer] = self.put(path, row[None])
        if len(rows) == depth:
            self.filled[ours] = var.replace(_join([rows.pop(i) for i in range(depth)]))
            del self.rows[ours]

    def check_stacks(self) -> None:
        """Every stack that got some rows got all of them."""
        for ours, rows in self.rows.items():
            depth = self.targets[ours][1].get_value().shape[0]
            gaps = [i for i in range(depth) if i not in rows]
            raise CheckpointError(f"{self.where}: the stacked {ours} misses layers {gaps[:10]} of {depth}")


def _join(rows: list[jax.Array]) -> jax.Array:
    """[1, ...] rows -> [L, ...], laid out as the rows are (the layer axis is never split)."""
    sharding = rows[0].sharding
    if isinstance(sharding, jax.sharding.NamedSharding):
        return jax.jit(lambda *xs: jnp.concatenate(xs), out_shardings=sharding)(*rows)
    return jnp.concatenate(rows)


def _is_abstract(var: Any) -> bool:
    return isinstance(var.get_value(), jax.ShapeDtypeStruct)


def abstract_model(family: Family, config: Any) -> nnx.Module:
    """The model with ShapeDtypeStruct leaves: no memory for random weights that would be overwritten."""
    return nnx.eval_shape(lambda: family.build(config, nnx.Rngs(0)))

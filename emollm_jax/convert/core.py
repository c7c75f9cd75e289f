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

from emollm_jax.convert.keymap import KeyMap
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
    models assembled from several sources; the last call should be strict)."""
    graphdef, state = nnx.split(abstract)
    targets = {path_str(p): (p, v) for p, v in nnx.to_flat_state(state)}
    put = _sharder(shardings)
    filled: dict[str, Any] = {}
    unknown: list[str] = []
    for key, arr in source.iter_tensors():
        try:
            mapped = key_map.to_ours(key)
        except KeyError:
            unknown.append(key)
            continue
        if mapped is None:
            continue
        ours, hook = mapped
        if ours not in targets:
            raise CheckpointError(f"{where}: {key} maps to {ours}, which the model does not have")
        if ours in filled:
            raise CheckpointError(f"{where}: {key} fills {ours} a second time")
        path, var = targets[ours]
        want = var.get_value()
        arr = hook.load(arr, tuple(want.shape))
        if tuple(arr.shape) != tuple(want.shape):
            raise CheckpointError(
                f"{where}: shape mismatch for {key} -> {ours}: expected {tuple(want.shape)} "
                f"(after hook {hook}), found {tuple(arr.shape)}"
            )
        target_dtype = np.dtype(dtype) if dtype and np.issubdtype(arr.dtype, np.floating) else want.dtype
        if arr.dtype != target_dtype:
            arr = arr.astype(target_dtype)
        filled[ours] = var.replace(put(path, arr))
    if unknown:
        raise CheckpointError(f"{where}: {len(unknown)} checkpoint keys match no rule: {unknown[:10]}")
    missing = [k for k in targets if k not in filled and _is_abstract(targets[k][1])]
    if missing and not partial:
        raise CheckpointError(f"{where}: {len(missing)} model parameters not in checkpoint: {missing[:10]}")
    new_state = nnx.from_flat_state([(p, filled.get(k, v)) for k, (p, v) in targets.items()])
    return nnx.merge(graphdef, new_state)


def _is_abstract(var: Any) -> bool:
    return isinstance(var.get_value(), jax.ShapeDtypeStruct)


def abstract_model(family: Family, config: Any) -> nnx.Module:
    """The model with ShapeDtypeStruct leaves: no memory for random weights that would be overwritten."""
    return nnx.eval_shape(lambda: family.build(config, nnx.Rngs(0)))

"""Conversion machinery shared by every model family: key-map tables with per-key hooks, strict accounting,
assignment into an abstract NNX model, optional placement on a mesh, and the family registry.

A key map is a readable table of `(hf_pattern, our_pattern, hook)` rows. `{i}` in a pattern stands for a layer
index and must appear on both sides; our patterns are dotted paths into the model's `nnx.State` (integers are
list indices). Hooks turn an HF tensor into ours (`load`) and back (`save`).
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from emollm_jax.convert.safetensors_io import CheckpointError, TensorSource

Path_ = tuple[str | int, ...]
ShardFn = Callable[[Path_, np.ndarray], jax.Array]


# ----------------------------------------------------------------------------------------------- hooks
@dataclasses.dataclass(frozen=True)
class Hook:
    """`load(hf_array, target_shape) -> ours`, `save(ours) -> hf_array`; `hf_shape(ours_shape)` for checks."""

    name: str
    load: Callable[[np.ndarray, tuple[int, ...]], np.ndarray]
    save: Callable[[np.ndarray], np.ndarray]

    def __repr__(self) -> str:
        return self.name


NONE = Hook("none", lambda x, shape: x, lambda x: x)
# torch Linear [out, in] <-> nnx.Linear [in, out]
TRANSPOSE = Hook("transpose", lambda x, shape: x.T, lambda x: x.T)
# torch Conv2d [O, I, kh, kw] <-> nnx.Conv [kh, kw, I, O]
CONV = Hook("conv", lambda x, shape: x.transpose(2, 3, 1, 0), lambda x: x.transpose(3, 2, 0, 1))


# ----------------------------------------------------------------------------------------------- key maps
@dataclasses.dataclass(frozen=True)
class Rule:
    hf: str
    ours: str
    hook: Hook = NONE

    def hf_regex(self) -> re.Pattern:
        return re.compile(re.escape(self.hf).replace(r"\{i\}", r"(?P<i>\d+)") + r"\Z")

    def ours_regex(self) -> re.Pattern:
        return re.compile(re.escape(self.ours).replace(r"\{i\}", r"(?P<i>\d+)") + r"\Z")


@dataclasses.dataclass(frozen=True)
class KeyMap:
    """HF <-> ours key table for one model (one layout). `ignore` lists regexes of HF keys deliberately not
    loaded (each with a reason in the family's docstring), e.g. old `rotary_emb.inv_freq` buffers."""

    rules: tuple[Rule, ...]
    ignore: tuple[str, ...] = ()

    @classmethod
    def table(cls, rows: Iterable[tuple], ignore: Iterable[str] = ()) -> KeyMap:
        return cls(tuple(Rule(*r) for r in rows), tuple(ignore))

    def with_prefix(self, hf_prefix: str = "", ours_prefix: str = "") -> KeyMap:
        """The same table nested under prefixes (e.g. Llava: `language_model.` / `llm.`)."""
        rules = tuple(Rule(hf_prefix + r.hf, ours_prefix + r.ours, r.hook) for r in self.rules)
        ignore = tuple(re.escape(hf_prefix) + p for p in self.ignore)
        return KeyMap(rules, ignore)

    def __add__(self, other: KeyMap) -> KeyMap:
        return KeyMap(self.rules + other.rules, self.ignore + other.ignore)

    def _compiled(self):
        if not hasattr(self, "_cache"):
            object.__setattr__(self, "_cache", [(r, r.hf_regex(), r.ours_regex()) for r in self.rules])
            object.__setattr__(self, "_ignore_re", [re.compile(p + r"\Z") for p in self.ignore])
        return self._cache

    def to_ours(self, hf_key: str) -> tuple[str, Hook] | None:
        """HF key -> (our dotted path, hook); None when ignored; KeyError when no rule matches."""
        for rule, hf_re, _ in self._compiled():
            m = hf_re.match(hf_key)
            if m:
                return _fill(rule.ours, m), rule.hook
        if any(p.match(hf_key) for p in self._ignore_re):
            return None
        raise KeyError(hf_key)

    def to_hf(self, our_key: str) -> tuple[str, Hook]:
        for rule, _, ours_re in self._compiled():
            m = ours_re.match(our_key)
            if m:
                return _fill(rule.hf, m), rule.hook
        raise KeyError(our_key)


def _fill(pattern: str, m: re.Match) -> str:
    return pattern.replace("{i}", m.group("i")) if "i" in m.groupdict() else pattern


def path_str(path: Path_) -> str:
    return ".".join(str(p) for p in path)


# ----------------------------------------------------------------------------------------------- families
@dataclasses.dataclass(frozen=True)
class Family:
    """How to build one kind of model from an HF directory and write it back.

    matches(hf_config, keys) -> bool picks the family (first registered match wins, newest first);
    config_from_hf(hf_config, **overrides) -> our config; build(config, rngs) -> nnx.Module;
    key_map(config, hf_config, keys) -> KeyMap for this checkpoint's layout (prefix detection lives here);
    to_hf_config(model) -> config.json dict; export_map(model) -> KeyMap used by save_hf (transformers-5
    layout); model_type: the class save_hf dispatches on; is_lm: also write generation_config.json.
    """

    name: str
    matches: Callable[[Mapping[str, Any], set[str]], bool]
    config_from_hf: Callable[..., Any]
    build: Callable[[Any, nnx.Rngs], nnx.Module]
    key_map: Callable[[Any, Mapping[str, Any], set[str]], KeyMap]
    to_hf_config: Callable[[nnx.Module], dict[str, Any]] | None = None
    export_map: Callable[[nnx.Module], KeyMap] | None = None
    model_type: type | None = None
    is_lm: bool = False


_FAMILIES: list[Family] = []


def register_family(family: Family) -> Family:
    """Adds (or replaces, by name) a family; later registrations are tried first."""
    _FAMILIES[:] = [f for f in _FAMILIES if f.name != family.name]
    _FAMILIES.insert(0, family)
    return family


def families() -> list[Family]:
    return list(_FAMILIES)


def read_hf_config(hf_dir: Path) -> dict[str, Any]:
    path = Path(hf_dir) / "config.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as e:
        raise CheckpointError(f"{path}: missing (every HF model directory has one)") from e
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from e


def detect_family(hf_config: Mapping[str, Any], keys: set[str], where: str = "") -> Family:
    for fam in _FAMILIES:
        if fam.matches(hf_config, keys):
            return fam
    arch = hf_config.get("architectures"), hf_config.get("model_type")
    known = [f.name for f in _FAMILIES]
    raise CheckpointError(f"{where}: no converter for architectures/model_type {arch}; known: {known}")


def find_prefix(keys: set[str], probe: str, candidates: Iterable[str]) -> str | None:
    """The first candidate prefix p with `p + probe` in keys (layout detection from key names)."""
    for p in candidates:
        if p + probe in keys:
            return p
    return None


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
        flat[tuple(_key_entry(k) for k in kp)] = s
    # nnx.State pytrees may add a trailing 'value' entry on each variable; match on the prefix too.
    def put(path: Path_, x: np.ndarray) -> jax.Array:
        s = flat.get(path) or flat.get(path + ("value",))
        if s is None:
            raise KeyError(f"no sharding given for parameter {path_str(path)}")
        return jax.device_put(x, s)

    return put


def _key_entry(k: Any) -> str | int:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return getattr(k, attr)
    return str(k)


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


def load_hf(
    path: str | Path,
    dtype: str | None = None,
    *,
    shardings: Any = None,
    allow_pickle: bool = False,
    **config_overrides: Any,
) -> nnx.Module:
    """Loads an HF model directory into our NNX model (family detected from config.json and key names).

    dtype: parameter dtype (and compute dtype) for floating tensors, e.g. "bfloat16"; default float32.
    shardings: see `fill_model`. config_overrides: fields of our config (e.g. image_size=336 for a CLIP
    tower, which resamples the position embedding; remat=True).
    """
    from emollm_jax.convert.safetensors_io import open_checkpoint

    path = Path(path)
    hf_config = read_hf_config(path)
    source = open_checkpoint(path, allow_pickle=allow_pickle)
    keys = set(source.keys())
    family = detect_family(hf_config, keys, str(path))
    if dtype is not None:
        config_overrides = {"dtype": dtype, "param_dtype": dtype, **config_overrides}
    config = family.config_from_hf(hf_config, **config_overrides)
    key_map = family.key_map(config, hf_config, keys)
    return fill_model(abstract_model(family, config), source, key_map, dtype=dtype, shardings=shardings,
                      where=str(path))

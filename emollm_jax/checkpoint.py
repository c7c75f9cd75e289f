"""Training checkpoints (orbax CheckpointManager) and params-only checkpoints.

A training checkpoint is one step directory with four items: `params` (pure dict of arrays, keyed like
`nnx.to_pure_dict`), `opt_state` (the optax state pytree), `meta` (JSON: step, stage, config snapshot, rng)
and `data` (JSON: the input iterator state, so a resumed run sees exactly the batches it would have seen).
Orbax writes a step into a temporary directory and renames it when complete, so an interrupted save is never
listed, and old steps are only deleted once a newer one is complete.

Restores always take explicit target shardings, so a run can resume on a different mesh than it saved on.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from emollm_jax.models import stack
from emollm_jax.pytree import path_str

log = logging.getLogger(__name__)

_ITEMS = ("params", "opt_state", "meta", "data")


def _pure(params: Any) -> Any:
    return nnx.to_pure_dict(params) if isinstance(params, nnx.State) else params


def _target(abstract: Any, shardings: Any | None) -> Any:
    """Restore target: ShapeDtypeStructs with shardings (pure-dict form for nnx.State).

    Without `shardings`, each leaf's own sharding is used (a concrete array's placement, or a
    ShapeDtypeStruct that carries one).
    """
    missing = []

    def one(path, a, s=None):
        s = s if s is not None else getattr(a, "sharding", None)
        if s is None:
            missing.append(jax.tree_util.keystr(path))
        return jax.ShapeDtypeStruct(np.shape(a), a.dtype, sharding=s)

    trees = (abstract,) if shardings is None else (abstract, shardings)
    target = jax.tree_util.tree_map_with_path(one, *trees)
    if missing:
        raise ValueError(
            f"restore target has no sharding for {missing[:3]} ({len(missing)} leaves); pass "
            "shardings or ShapeDtypeStructs that carry one"
        )
    return _pure(target)


def _rebuild(abstract: Any, restored: Any) -> Any:
    """Restored pure dict back into the nnx.State layout of `abstract` (pytrees pass through)."""
    if not isinstance(abstract, nnx.State):
        return restored
    state = jax.tree.map(lambda x: x, abstract)
    nnx.replace_by_pure_dict(state, restored)
    return state


def _check_json(name: str, value: Any) -> None:
    try:
        json.dumps(value)
    except TypeError as e:
        bad = (
            next((k for k, v in value.items() if not _jsonable(v)), "?")
            if isinstance(value, Mapping)
            else "?"
        )
        raise TypeError(f"checkpoint item {name!r}: key {bad!r} is not JSON-serialisable ({e})") from e


def _jsonable(v: Any) -> bool:
    try:
        json.dumps(v)
        return True
    except TypeError:
        return False


def rng_to_json(key: jax.Array) -> list:
    """A PRNG key as JSON-able raw key data (for `meta`)."""
    return np.asarray(jax.random.key_data(key)).tolist()


def rng_from_json(data: list, impl: str | None = None) -> jax.Array:
    return jax.random.wrap_key_data(np.asarray(data, np.uint32), impl=impl)


def _check_keys(saved: Any, target: Any, where: str) -> None:
    """Fail naming the keys when a checkpoint's tree and the target's differ (orbax's errors do not)."""

    def keys(tree):
        flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: x is None)[0]
        return {path_str(p) for p, _ in flat}

    have, want = keys(saved), keys(target)
    if have != want:
        raise KeyError(
            f"{where}: checkpoint and target differ; missing in checkpoint: "
            f"{sorted(want - have)[:5]}, not in target: {sorted(have - want)[:5]}"
        )


class Checkpointer:
    """Keeps the last `max_to_keep` training checkpoints under `directory` (one subdirectory per step)."""

    def __init__(
        self,
        directory: str | Path,
        *,
        max_to_keep: int = 3,
        save_interval_steps: int = 1,
        async_save: bool = False,
    ):
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            save_interval_steps=save_interval_steps,
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,  # leftovers of an interrupted save
            create=True,
        )
        self._mngr = ocp.CheckpointManager(self.directory, options=options, item_names=_ITEMS)

    def save(
        self,
        step: int,
        *,
        params: Any,
        opt_state: Any,
        meta: Mapping[str, Any],
        data_state: Mapping[str, Any] | None = None,
        force: bool = False,
    ) -> bool:
        """Save `step` if the interval says so (or `force`); returns whether a save started.

        `params` is an nnx.State or pure dict of arrays; `meta` and `data_state` must be JSON-serialisable.
        """
        if step in self._mngr.all_steps():
            log.info("checkpoint step %d already exists in %s; not saving again", step, self.directory)
            return False
        meta = {"step": int(step), **meta}
        _check_json("meta", meta)
        items = {
            "params": ocp.args.StandardSave(_pure(params)),
            "opt_state": ocp.args.StandardSave(opt_state),
            "meta": ocp.args.JsonSave(meta),
        }
        if data_state is not None:
            _check_json("data", data_state)
            items["data"] = ocp.args.JsonSave(dict(data_state))
        saved = self._mngr.save(step, args=ocp.args.Composite(**items), force=force)
        if saved:
            log.info("checkpoint step %d -> %s", step, self.directory)
        return saved

    def latest_step(self) -> int | None:
        return self._mngr.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._mngr.all_steps())

    def restore(
        self,
        step: int | None = None,
        *,
        abstract_params: Any,
        abstract_opt_state: Any,
        param_shardings: Any | None = None,
        opt_shardings: Any | None = None,
    ) -> tuple[Any, Any, dict[str, Any], dict[str, Any] | None]:
        """(params, opt_state, meta, data_state) of `step` (default: latest), placed on the given shardings.

        `abstract_*` come from `nnx.eval_shape` / `jax.eval_shape(tx.init, ...)`; shardings may be omitted
        when the abstract leaves already carry one. `params` comes back in the layout of `abstract_params`.
        """
        step = self.latest_step() if step is None else step
        if step is None or step not in self._mngr.all_steps():
            raise FileNotFoundError(
                f"{self.directory}: no complete checkpoint for step {step} (have {self.all_steps()})"
            )
        items = {
            "params": ocp.args.StandardRestore(_target(abstract_params, param_shardings)),
            "opt_state": ocp.args.StandardRestore(_target(abstract_opt_state, opt_shardings)),
            "meta": ocp.args.JsonRestore(),
        }
        has_data = (self.directory / str(step) / "data").exists()
        if has_data:
            items["data"] = ocp.args.JsonRestore()
        out = self._mngr.restore(step, args=ocp.args.Composite(**items))
        params = _rebuild(abstract_params, out["params"])
        return params, out["opt_state"], dict(out["meta"]), dict(out["data"]) if has_data else None

    @staticmethod
    def restore_params(path_or_dir: str | Path, abstract_params: Any, shardings: Any | None = None) -> Any:
        """See the module-level `restore_params` (usable without opening a Checkpointer)."""
        return restore_params(path_or_dir, abstract_params, shardings)

    def wait(self) -> None:
        """Block until an async save is on disk."""
        self._mngr.wait_until_finished()

    def close(self) -> None:
        self._mngr.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def save_params(path: str | Path, params: Any) -> None:
    """Params-only checkpoint (orbax PyTree dir of a pure dict of arrays): what the conversion CLI writes."""
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(Path(path).absolute(), _pure(params))


def _params_dir(path: Path) -> Path:
    """Params-only checkpoint dir, training step dir (`<step>/params`), or Checkpointer root (latest step)."""
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such checkpoint")
    if (path / "params").is_dir():
        return path / "params"
    steps = sorted(int(p.name) for p in path.iterdir() if p.is_dir() and p.name.isdigit())
    if steps and (path / str(steps[-1]) / "params").is_dir():
        return path / str(steps[-1]) / "params"
    return path


def restore_params(path_or_dir: str | Path, abstract_params: Any, shardings: Any | None = None) -> Any:
    """Params only, placed on `shardings`; in the layout of `abstract_params` (nnx.State or pure dict).

    Reads params-only checkpoints (`save_params`, the conversion CLI) and training checkpoints alike, and
    layer stacks saved in either layout: unrolled (`scan_layers=False`) params load into a scanned model and
    back (`emollm_jax.models.stack.relayout`).
    """
    path = _params_dir(Path(path_or_dir).absolute())
    target = _target(abstract_params, shardings)
    handler = ocp.PyTreeCheckpointHandler()
    try:
        saved = handler.metadata(path).tree
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{path}: not an orbax params checkpoint ({e})") from e
    as_saved = _in_saved_layout(saved, target, str(path))
    with ocp.StandardCheckpointer() as ckptr:
        restored = ckptr.restore(path, target if as_saved is None else as_saved)
    if as_saved is not None:  # saved with the layer stacks in the other layout (unrolled vs scanned)
        restored = stack.relayout(restored, target)
        restored = jax.tree.map(lambda x, t: jax.device_put(x, t.sharding), restored, target)
    return _rebuild(abstract_params, restored)


def _in_saved_layout(saved: Any, target: Any, where: str) -> Any | None:
    """None when `saved` and `target` have the same keys; else the target in the checkpoint's layer layout
    (`models.stack.relayout_abstract`) when that is all that differs; else the key error."""
    try:
        _check_keys(saved, target, where)
        return None
    except KeyError as e:
        error = e
    try:
        as_saved = stack.relayout_abstract(target, saved)
        _check_keys(saved, as_saved, where)
    except KeyError:
        raise error from None
    flat_saved = {path_str(p): m for p, m in jax.tree_util.tree_leaves_with_path(saved)}
    for p, want in jax.tree_util.tree_leaves_with_path(as_saved):
        have = tuple(flat_saved[path_str(p)].shape)
        if have != tuple(want.shape):
            raise ValueError(f"{where}: {path_str(p)} has shape {have} in the checkpoint, the target "
                             f"{tuple(want.shape)} (after relayout of its layer stacks)")
    return as_saved

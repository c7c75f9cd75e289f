"""Training checkpoints (orbax CheckpointManager) and params-only checkpoints.

A training checkpoint is one step directory with five items: `params` (pure dict of arrays, keyed like
`nnx.to_pure_dict`), `opt_state` (the optax state pytree), `meta` (JSON: step, stage, config snapshot, rng),
`data` (JSON: every process's input iterator state, error-budget count included, so each process of a
resumed run sees exactly the batches it would have seen) and
`integrity` (JSON: checksums of every array and of meta and data, `emollm_jax.integrity`). Orbax writes a step
into a temporary directory and renames it when complete, so an interrupted save is never listed, and old steps
are only deleted once a newer one is complete. What is read back is verified against the checksums.

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

from data_pipeline import storage
from emollm_jax import integrity
from emollm_jax.models import stack
from emollm_jax.outdir import AtomicDir
from emollm_jax.pytree import flat_leaves, path_str

log = logging.getLogger(__name__)

_ITEMS = ("params", "opt_state", "meta", "data", "integrity")


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


class CheckpointDamaged(RuntimeError):
    """A saved checkpoint cannot be trusted: a file is unreadable, or an array differs from its checksum."""

    def __init__(self, where: str | Path, reason: str, step: int | None = None):
        what = f"checkpoint step {step}" if step is not None else "checkpoint"
        super().__init__(f"{what} is damaged: {where}: {reason}")
        self.where, self.reason, self.step = str(where), reason, step


class NonFiniteCheckpointError(FloatingPointError):
    """Arrays to be saved hold NaN or inf; nothing was written."""


def _root_cause(e: BaseException) -> str:
    """The innermost cause's message, on one line (orbax wraps tensorstore's, which names the file)."""
    while e.__cause__ is not None or e.__context__ is not None:
        e = e.__cause__ or e.__context__
    return " ".join(str(e).split())[:400] or type(e).__name__


def _any_process(flag: bool) -> bool:
    """Whether `flag` holds on any process (every process must call this at the same point)."""
    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils

    return bool(np.any(multihost_utils.process_allgather(np.asarray([flag], np.int32))))


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def _check_layout(saved: Any, target: Any, where: str) -> None:
    """Array paths and shapes of a checkpoint's metadata against the restore target: a checkpoint of another
    model or optimizer is refused naming what differs (never taken for a damaged one). An nnx Variable's
    `value` reads as a dict key in the metadata and is dropped from paths on both sides."""

    def leaves(tree):
        return {k.removesuffix("/value"): tuple(v.shape) for k, v in flat_leaves(tree).items()}

    have, want = leaves(saved), leaves(target)
    if set(have) != set(want):
        missing, extra = sorted(set(want) - set(have)), sorted(set(have) - set(want))
        raise KeyError(f"{where}: checkpoint and target differ; missing in checkpoint: {missing[:5]}, not in "
                       f"target: {extra[:5]}")
    bad = [(k, have[k], shape) for k, shape in want.items() if have[k] != shape]
    if bad:
        raise ValueError(f"{where}: shapes differ from the model's (path, saved, model): {bad[:3]}")


class Checkpointer:
    """Keeps the last `max_to_keep` training checkpoints under `directory` (one subdirectory per step).

    Every step also holds an `integrity` item: checksums of its arrays and of its JSON items. A restore
    verifies them; a step that fails (unreadable file, checksum mismatch) raises `CheckpointDamaged`, or, when
    the newest step was asked for, is moved aside (`<step>.damaged`) with one log line and the next older
    step is tried. Arrays holding NaN or inf are never saved (`NonFiniteCheckpointError`).
    """

    def __init__(
        self,
        directory: str | Path,
        *,
        max_to_keep: int = 3,
        save_interval_steps: int = 1,
        async_save: bool = False,
    ):
        if max_to_keep < 1:
            raise ValueError(f"max_to_keep={max_to_keep}: must be >= 1 (fewer would delete every checkpoint)")
        self.directory = storage.path(storage.absolute(directory))  # a local path or a URL (gs://...)
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
        Raises `NonFiniteCheckpointError` (saving nothing) when params or optimizer state hold NaN or inf.
        """
        if step in self._mngr.all_steps():
            log.info("checkpoint step %d already exists in %s; not saving again", step, self.directory)
            return False
        meta = {"step": int(step), **meta}
        _check_json("meta", meta)
        if data_state is not None:
            _check_json("data", data_state)
        if not force and not self._mngr.should_save(step):
            return False
        pure = _pure(params)
        data = None if data_state is None else per_process_data(data_state)  # a collective
        checks = {"format": integrity.FORMAT, "meta": integrity.json_digest(meta),
                  "data": None if data is None else integrity.json_digest(data)}
        for name, tree in (("params", pure), ("opt_state", opt_state)):
            checks[name], bad = integrity.record(tree)
            if bad:
                raise NonFiniteCheckpointError(f"step {step} not saved: {len(bad)} {name} arrays hold NaN or "
                                               f"inf, e.g. {bad[:3]}")
        items = {
            "params": ocp.args.StandardSave(pure),
            "opt_state": ocp.args.StandardSave(opt_state),
            "meta": ocp.args.JsonSave(meta),
            "integrity": ocp.args.JsonSave(checks),
        }
        if data is not None:
            items["data"] = ocp.args.JsonSave(data)
        saved = self._mngr.save(step, args=ocp.args.Composite(**items), force=True)
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
        """(params, opt_state, meta, data_state) of `step` (default: the newest step that verifies), placed on
        the given shardings.

        `abstract_*` come from `nnx.eval_shape` / `jax.eval_shape(tx.init, ...)`; shardings may be omitted
        when the abstract leaves already carry one. `params` comes back in the layout of `abstract_params`.
        An explicit `step` that fails verification raises `CheckpointDamaged`.
        """
        targets = (_target(abstract_params, param_shardings), _target(abstract_opt_state, opt_shardings))
        if step is not None and step not in self._mngr.all_steps():
            raise FileNotFoundError(
                f"{self.directory}: no complete checkpoint for step {step} (have {self.all_steps()})")
        out = None
        for s in [step] if step is not None else reversed(self.all_steps()):
            try:
                out = self._restore_step(s, *targets)
                break
            except CheckpointDamaged as e:
                if step is not None:
                    raise
                self.set_aside(s, "damaged", str(e))
        if out is None:
            raise FileNotFoundError(
                f"{self.directory}: no complete checkpoint for step {step} (have {self.all_steps()})")
        params, opt_state, meta, data = out
        return _rebuild(abstract_params, params), opt_state, meta, data

    def _restore_step(self, step: int, params_target: Any, opt_target: Any) -> tuple[Any, Any, dict, Any]:
        """Reads and verifies one step; `CheckpointDamaged` (on every process alike) if it fails."""
        d = self.directory / str(step)
        handler = ocp.PyTreeCheckpointHandler()
        for name, target in (("params", params_target), ("opt_state", opt_target)):
            try:
                saved = handler.metadata(d / name).tree
            except Exception as e:  # noqa: BLE001  (missing or unreadable metadata: the step is damaged)
                raise CheckpointDamaged(d / name, f"metadata cannot be read ({_root_cause(e)})", step) from e
            _check_layout(saved, target, f"{d / name}")
        items = {"params": ocp.args.StandardRestore(params_target),
                 "opt_state": ocp.args.StandardRestore(opt_target), "meta": ocp.args.JsonRestore()}
        if (d / "data").exists():
            items["data"] = ocp.args.JsonRestore()
        out, error = {}, None
        for name, args in items.items():  # one item at a time, so a failure names its directory
            try:
                out[name] = self._mngr.restore(step, args=ocp.args.Composite(**{name: args}))[name]
            except Exception as e:  # noqa: BLE001  (unreadable or truncated file: reported below)
                error = error or CheckpointDamaged(d / name, f"cannot be read ({_root_cause(e)})", step)
        if _any_process(error is not None):
            raise error or CheckpointDamaged(d, "cannot be read on another process", step)
        self._verify(step, out)
        data = out.get("data")
        data = own_data(dict(data), str(d)) if data is not None else None
        return out["params"], out["opt_state"], dict(out["meta"]), data

    def _verify(self, step: int, out: Mapping[str, Any]) -> None:
        """Compares what was read with the step's checksum record (absent in steps saved before records were
        kept: those restore unverified, with a warning)."""
        d = self.directory / str(step)
        record_file = d / "integrity" / "metadata"
        if not record_file.exists():
            log.warning("checkpoint step %d has no checksum record (%s); restored unverified", step,
                        record_file)
            return
        try:
            rec = integrity.read_json(record_file, what="checksum record")
            for name in ("params", "opt_state"):
                integrity.verify(out[name], rec[name], where=str(d / name))
            for name in ("meta", "data"):
                value = out.get(name)
                if (rec.get(name) is None) != (value is None) or (
                        value is not None and integrity.json_digest(dict(value)) != rec[name]):
                    raise integrity.IntegrityError(f"{d / name}: does not match its checksum",
                                                   where=str(d / name))
        except integrity.IntegrityError as e:
            raise CheckpointDamaged(e.where or d, str(e).removeprefix(f"{e.where}: "), step) from e

    def set_aside(self, step: int, label: str, reason: str) -> Path:
        """Moves step `step` out of the manager's view to `<step>.<label>` (kept for inspection, never
        deleted) and logs one line with `reason`; every process must call it."""
        self._mngr.wait_until_finished()
        src = self.directory / str(step)
        dst, n = src.with_name(f"{step}.{label}"), 1
        while dst.exists():
            dst, n = src.with_name(f"{step}.{label}{n}"), n + 1
        if jax.process_index() == 0:
            src.rename(dst)
        _sync(f"emollm_jax.set_aside.{step}")
        self._mngr.reload()
        log.error("%s; moved to %s", reason, dst)
        return dst

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


def per_process_data(state: Mapping[str, Any]) -> dict[str, Any]:
    """The `data` item: every process's iterator state, gathered from all processes (a collective: every
    process saves the same step)."""
    from emollm_jax.sharding import gather_json

    return {"process_count": jax.process_count(), "processes": gather_json(dict(state))}


def own_data(item: dict[str, Any], where: str) -> dict[str, Any] | None:
    """This process's iterator state from a `data` item. A checkpoint written by another number of processes
    holds no state for this split of the data: the stage's data then starts over (logged as a warning)."""
    if "processes" not in item:  # a single state, as checkpoints once held
        return item
    if int(item["process_count"]) != jax.process_count():
        log.warning("%s: data-iterator state saved by %d processes, this run has %d: the stage's data "
                    "starts from its beginning", where, item["process_count"], jax.process_count())
        return None
    return item["processes"][jax.process_index()]


def save_params(path: str | Path, params: Any, *, overwrite: bool = False) -> None:
    """Params-only checkpoint (orbax PyTree dir of a pure dict of arrays, with its checksum record inside),
    written whole into a temporary directory and renamed into place. An existing non-empty `path` is refused
    unless `overwrite` and written by this project (see `emollm_jax.outdir`); NaN or inf is refused."""
    pure = _pure(params)
    section, bad = integrity.record(pure)
    if bad:
        raise NonFiniteCheckpointError(f"{path}: not saved: {len(bad)} arrays hold NaN or inf, e.g. "
                                       f"{bad[:3]}")
    with AtomicDir(path, writer="emollm_jax.checkpoint.save_params", overwrite=overwrite) as tmp:
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(tmp, pure, force=True)  # tmp exists (empty): force lets orbax write into it
        integrity.write_params_record(tmp, section)


def _params_dirs(path: Path) -> list[tuple[int | None, Path]]:
    """Where params may be read, newest first: a params-only checkpoint dir or a training step dir (one
    entry), or a Checkpointer root (every step, newest first)."""
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such checkpoint")
    if (path / "params").is_dir():
        step = int(path.name) if path.name.isdigit() else None
        return [(step, path / "params")]
    steps = sorted((int(p.name) for p in path.iterdir() if p.is_dir() and p.name.isdigit()), reverse=True)
    found = [(s, path / str(s) / "params") for s in steps if (path / str(s) / "params").is_dir()]
    return found or [(None, path)]


def restore_params(path_or_dir: str | Path, abstract_params: Any, shardings: Any | None = None) -> Any:
    """Params only, placed on `shardings`; in the layout of `abstract_params` (nnx.State or pure dict).

    Reads params-only checkpoints (`save_params`, the conversion CLI) and training checkpoints alike, and
    verifies them against their checksum record; on a Checkpointer root the newest step that verifies.
    Layer stacks saved in either layout load: unrolled (`scan_layers=False`) params into a scanned model and
    back (`emollm_jax.models.stack.relayout`).
    """
    return restore_latest_params(path_or_dir, abstract_params, shardings)[1]


def restore_latest_params(path_or_dir: str | Path, abstract_params: Any,
                          shardings: Any | None = None) -> tuple[int | None, Any]:
    """(step, params) as `restore_params`; step is None for a params-only checkpoint. A damaged step of a
    Checkpointer root is reported in one log line and the next older one is read (nothing is moved)."""
    candidates = _params_dirs(storage.path(storage.absolute(path_or_dir)))
    for i, (step, params_dir) in enumerate(candidates):
        try:
            return step, _restore_params_dir(params_dir, abstract_params, shardings, step)
        except CheckpointDamaged as e:
            if i + 1 == len(candidates):
                raise
            log.error("%s; reading step %s instead", e, candidates[i + 1][0])
    raise AssertionError("unreachable")


_WIDENING = {("bfloat16", "float32"), ("float16", "float32"), ("bfloat16", "float64"), ("float16", "float64"),
             ("float32", "float64")}


def _restore_params_dir(path: Path, abstract_params: Any, shardings: Any | None, step: int | None) -> Any:
    """One params directory: layout checked, read in its saved dtype (or an exact widening of it), verified,
    then cast to the target's dtypes."""
    target = _target(abstract_params, shardings)
    try:
        saved = ocp.PyTreeCheckpointHandler().metadata(path).tree
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{path}: not an orbax params checkpoint ({e})") from e
    as_saved = _in_saved_layout(saved, target, str(path))  # None: the target's own layer layout
    read_layout = target if as_saved is None else as_saved
    _check_layout(saved, read_layout, str(path))
    try:
        section = integrity.params_record(path)
    except integrity.IntegrityError as e:
        raise CheckpointDamaged(e.where, "checksum record cannot be read", step) from e
    saved_dtype = {k: str(v.dtype) for k, v in flat_leaves(saved).items()}

    def read_as(p, t):
        have = saved_dtype[path_str(p)]
        keep = have == str(t.dtype) or (have, str(t.dtype)) in _WIDENING
        return t if keep else jax.ShapeDtypeStruct(t.shape, np.dtype(have), sharding=t.sharding)

    read_target = jax.tree_util.tree_map_with_path(read_as, read_layout)
    try:
        with ocp.StandardCheckpointer() as ckptr:
            restored = ckptr.restore(path, read_target)
    except Exception as e:  # noqa: BLE001  (unreadable or truncated file)
        raise CheckpointDamaged(path, f"cannot be read ({_root_cause(e)})", step) from e
    if section is None:
        log.warning("%s has no checksum record; restored unverified", path)
    else:
        try:
            integrity.verify(restored, section, where=str(path))
        except integrity.IntegrityError as e:
            raise CheckpointDamaged(path, str(e).removeprefix(f"{path}: "), step) from e
    if as_saved is not None:  # saved with the layer stacks in the other layout (unrolled vs scanned)
        restored = stack.relayout(restored, target)
        restored = jax.tree.map(lambda x, t: jax.device_put(x, t.sharding), restored, target)
    restored = jax.tree.map(lambda x, t: x if x.dtype == t.dtype else x.astype(t.dtype), restored, target)
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

"""Params-only orbax checkpoints of converted models, with the HF config beside them to rebuild the model.

Layout of a directory written by `save_params` (what `python -m emollm_jax.convert` produces):
    <dir>/params/          orbax StandardCheckpointer item: `nnx.to_pure_dict(nnx.state(model, nnx.Param))`,
                           a nested dict keyed like the model's attributes (layer indices are ints)
    <dir>/hf_config.json   the HF config.json it came from (our config = `Family.config_from_hf` of it)
    <dir>/convert.json     {"family": name, "dtype": dtype or null, "source": HF dir}
    <dir>/params/integrity.json   checksums of the arrays (`emollm_jax.integrity`), verified on load
    <dir>/.emollm_jax_output      the marker that lets `overwrite=True` replace this directory
Restore onto any target sharding with an abstract pure dict of `jax.ShapeDtypeStruct(..., sharding=...)`.
Any of these directories may be a URL (`gs://...`): orbax reads and writes there itself; an HF directory
there is copied to local disk first (`storage.local_copy`: safetensors are opened by file name).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax import nnx

from data_pipeline import storage
from emollm_jax import integrity
from emollm_jax.convert.core import abstract_model
from emollm_jax.convert.hf import families, load_hf
from emollm_jax.convert.safetensors_io import AtomicDir, CheckpointError


def save_params(model: nnx.Module, out: str | Path, *, family: str, hf_config: dict[str, Any],
                dtype: str | None = None, source: str = "", overwrite: bool = False) -> Path:
    """Writes the layout above atomically (temp dir renamed into place). An existing non-empty `out` is
    replaced only with `overwrite` and only if this project wrote it; weights holding NaN or inf (a cast that
    overflowed) are refused."""
    pure = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    section, bad = integrity.record(pure)
    if bad:
        raise CheckpointError(f"{out}: not written: {len(bad)} arrays hold NaN or inf after the cast to "
                              f"{dtype or 'their dtype'}, e.g. {bad[:3]}")
    with AtomicDir(out, writer="emollm_jax.convert.save_params", overwrite=overwrite,
                   info={"source": source}) as tmp:
        ckptr = ocp.StandardCheckpointer()
        ckptr.save(tmp / "params", pure)
        ckptr.wait_until_finished()
        integrity.write_params_record(tmp / "params", section)
        (tmp / "hf_config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
        meta = {"family": family, "dtype": dtype, "source": source}
        (tmp / "convert.json").write_text(json.dumps(meta, indent=2) + "\n")
    return storage.path(out)


def load_params(path: str | Path, *, shardings: Any = None) -> nnx.Module:
    """Rebuilds the model saved by `save_params`. shardings: optional pure-dict pytree of Shardings."""
    path = storage.path(path)
    try:
        meta = json.loads((path / "convert.json").read_text())
        hf_config = json.loads((path / "hf_config.json").read_text())
    except FileNotFoundError as e:
        raise CheckpointError(f"{path}: not a converted params checkpoint ({e.filename} missing)") from e
    fam = next((f for f in families() if f.name == meta["family"]), None)
    if fam is None:
        raise CheckpointError(f"{path}/convert.json: unknown family {meta['family']!r}")
    overrides = {"dtype": meta["dtype"], "param_dtype": meta["dtype"]} if meta.get("dtype") else {}
    graphdef, state = nnx.split(abstract_model(fam, fam.config_from_hf(hf_config, **overrides)))
    target = nnx.to_pure_dict(state)
    if shardings is not None:
        target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                              target, shardings)
    try:
        restored = ocp.StandardCheckpointer().restore(path / "params", target)
    except Exception as e:  # noqa: BLE001  (orbax and tensorstore raise their own types on unreadable files)
        reason = " ".join(str(e.__cause__ or e).split())[:400]
        raise CheckpointError(f"{path / 'params'}: cannot be read ({reason})") from e
    try:
        section = integrity.params_record(path / "params")
        if section is not None:
            integrity.verify(restored, section, where=str(path / "params"))
    except integrity.IntegrityError as e:
        raise CheckpointError(f"checkpoint is damaged: {e}") from e
    nnx.replace_by_pure_dict(state, restored)
    return nnx.merge(graphdef, state)


def is_converted(path: str | Path) -> bool:
    """Whether `path` is a directory `save_params` wrote."""
    return (storage.path(path) / "convert.json").is_file()


def load_model_dir(path: str | Path, dtype: str | None = None) -> nnx.Module | None:
    """The model an HF directory (config.json) or a converted one (`save_params`: convert.json) holds, or
    None for any other path (e.g. an orbax params checkpoint, which needs a target model to restore into).
    `dtype` casts an HF directory's floating tensors; a converted one keeps the dtype it was written in."""
    path = storage.path(path)
    if (path / "config.json").is_file():
        return load_hf(storage.local_copy(path), dtype=dtype)
    if is_converted(path):
        return load_params(path)
    return None


def source_dir(path: str | Path) -> Path:
    """The HF directory a converted checkpoint was made from (its tokenizer lives there), else `path`."""
    path = storage.path(path)
    if is_converted(path):
        source = json.loads((path / "convert.json").read_text()).get("source")
        if source:
            return storage.path(source)
    return path

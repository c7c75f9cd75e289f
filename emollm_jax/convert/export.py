"""Export our NNX models back to Hugging Face directories that `transformers.from_pretrained` loads."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from emollm_jax.convert.core import path_str
from emollm_jax.convert.hf import family_of
from emollm_jax.convert.safetensors_io import AtomicDir, write_safetensors

_GENERATION_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")


def hf_tensors(model: nnx.Module, dtype: str | None = None) -> Iterator[tuple[str, np.ndarray]]:
    """Yields (HF key, numpy array) for every parameter, one at a time (gathered to host if sharded); a
    scanned layer stack's parameter float[L, ...] gives its L HF tensors, one layer at a time."""
    fam = family_of(model)
    key_map = fam.export_map(model)

    def host(x: jax.Array) -> np.ndarray:
        arr = np.asarray(jax.device_get(x))
        if dtype is not None and np.issubdtype(arr.dtype, np.floating):
            arr = arr.astype(np.dtype(dtype))
        return arr

    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        ours = path_str(path)
        try:
            hf_key, hook = key_map.to_hf(ours)
        except KeyError:
            pattern, hook = key_map.to_hf_stacked(ours)
            value = var.get_value()
            for i in range(value.shape[0]):
                yield pattern.replace("{i}", str(i)), hook.save(host(value[i]))
            continue
        yield hf_key, hook.save(host(var.get_value()))


def save_hf(
    model: nnx.Module,
    path: str | Path,
    *,
    dtype: str | None = None,
    max_shard_bytes: int = 5 * 2**30,
    extra_config: Mapping[str, Any] | None = None,
) -> Path:
    """Writes config.json (+ generation_config.json for language models) and model.safetensors (sharded with
    an index above `max_shard_bytes`) into `path`, atomically: a temp dir renamed into place when complete.

    dtype: tensor dtype on disk (default: the parameters' own). extra_config: keys merged into config.json
    (e.g. bos/eos/pad token ids, which our configs do not carry; they also go to generation_config.json).
    """
    fam = family_of(model)
    config = dict(fam.to_hf_config(model))
    if dtype is not None:
        config["dtype"] = dtype
    config.update(extra_config or {})
    with AtomicDir(path) as tmp:
        write_safetensors(hf_tensors(model, dtype), tmp, max_shard_bytes=max_shard_bytes)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        if fam.is_lm:
            gen = {"_from_model_config": True, **{k: config[k] for k in _GENERATION_KEYS if k in config}}
            (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    return Path(path)

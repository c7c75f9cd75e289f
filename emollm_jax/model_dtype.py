"""A model's weights and compute in another dtype: evaluation and prediction in bf16 (`config.eval.dtype`).

Modules keep their compute dtype as a static attribute (`nnx.Linear.dtype`, the decoder's config for its KV
cache and embeddings), so a cast rebuilds the graph from the model config with every part's `dtype` and
`param_dtype` set, then merges the cast parameters into it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from emollm_jax.models.parts import PartConfig
from emollm_jax.train import abstract_model


def with_dtype(model_cfg: Any, dtype: str) -> Any:
    """`model_cfg` (an EmoLLMConfig) with every part's weights and compute in `dtype`: the towers' and the
    decoder's `dtype` / `param_dtype` fields (the projectors follow the decoder's)."""
    parts = {}
    for field in dataclasses.fields(model_cfg):
        part = getattr(model_cfg, field.name)
        if isinstance(part, PartConfig) and {"dtype", "param_dtype"} <= set(part.field_names()):
            parts[field.name] = dataclasses.replace(part, dtype=dtype, param_dtype=dtype)
    return dataclasses.replace(model_cfg, **parts)


def cast_model(model: Any, dtype: str, *, donate: bool = False) -> Any:
    """`model` with its floating parameters stored in `dtype` and its modules computing in it (bf16 Linears
    take `models.dots`' bf16 products with float32 accumulation; the KV cache follows the decoder's
    dtype). The same model when it already is. Shardings are kept. `donate` frees each old parameter as
    soon as its cast exists, so a loaded model is never held twice."""
    cfg = with_dtype(model.config, dtype)
    target = jnp.dtype(dtype)

    done: dict[int, jax.Array] = {}  # an array the tree holds twice is cast (and freed) once

    def cast(x: jax.Array) -> jax.Array:
        if not jnp.issubdtype(x.dtype, jnp.floating) or x.dtype == target:
            return x
        if id(x) not in done:
            done[id(x)] = x.astype(target)
            if donate and isinstance(x, jax.Array):
                x.delete()
        return done[id(x)]

    params = nnx.state(model, nnx.Param)
    if cfg == model.config and all(x.dtype == target or not jnp.issubdtype(x.dtype, jnp.floating)
                                   for x in jax.tree.leaves(params)):
        return model
    _, params, rest = nnx.split(model, nnx.Param, ...)
    graphdef, _, _ = abstract_model(cfg)  # the modules' dtypes are static: a graph built for `dtype`
    return nnx.merge(graphdef, jax.tree.map(cast, params), rest)


def param_dtypes(model: Any) -> dict[str, int]:
    """Parameter count per dtype of `model`'s weights, e.g. {"bfloat16": 1234567}."""
    counts: dict[str, int] = {}
    for x in jax.tree.leaves(nnx.state(model, nnx.Param)):
        counts[str(x.dtype)] = counts.get(str(x.dtype), 0) + int(x.size)
    return dict(sorted(counts.items()))

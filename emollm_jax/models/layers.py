"""Layers every part is built from: linear with logical axes, norms, attention, activations, initialisers.

Every parameter is created with *logical* axis names (`embed`, `mlp`, `heads`, `vit_embed`, `proj_in`, ...);
`emollm_jax.sharding` maps them onto the mesh with the config's rules table, so model code never names the
mesh. Linears use `dots.dot_general` (bf16 products accumulate in float32, forward and backward).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from emollm_jax.models import dots

NORMAL_002 = nnx.initializers.normal(stddev=0.02)  # HF's initializer_range default (CLIP, LLaMA, SigLIP)
LECUN_NORMAL = nnx.initializers.lecun_normal()

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "silu": jax.nn.silu,
}


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; supported: {sorted(ACTIVATIONS)}") from None


def linear(n_in: int, n_out: int, names: tuple[str | None, str | None], rngs: nnx.Rngs, *, dtype: Any = None,
           param_dtype: Any = jnp.float32, bias: bool = True, init: Any = NORMAL_002) -> nnx.Linear:
    """`nnx.Linear` whose kernel float[n_in, n_out] carries the logical axes `names` (the bias `names[1]`)."""
    return nnx.Linear(
        n_in, n_out, use_bias=bias, dtype=dtype, param_dtype=param_dtype,
        kernel_init=nnx.with_partitioning(init, names),
        bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), names[1:]),
        dot_general=dots.dot_general,
        rngs=rngs,
    )


def conv1d(n_in: int, n_out: int, kernel_size: int, names: tuple[str | None, str | None], rngs: nnx.Rngs, *,
           stride: int = 1, padding: int = 0, dtype: Any = None, param_dtype: Any = jnp.float32,
           bias: bool = True, init: Any = NORMAL_002) -> nnx.Conv:
    """`nnx.Conv` over float[B, T, n_in] (channels last) as torch's `Conv1d(n_in, n_out, kernel_size, stride,
    padding)`: `padding` zeros on each side. Its kernel float[kernel_size, n_in, n_out] carries the logical
    axes (None, *names), the bias `names[1]`."""
    return nnx.Conv(
        n_in, n_out, (kernel_size,), strides=(stride,), padding=((padding, padding),), use_bias=bias,
        dtype=dtype, param_dtype=param_dtype, rngs=rngs,
        kernel_init=nnx.with_partitioning(init, (None, *names)),
        bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), names[1:]),
    )


def layer_norm(dim: int, eps: float, rngs: nnx.Rngs, *, names: tuple[str] = ("norm",), dtype: Any = None,
               param_dtype: Any = jnp.float32, fast_variance: bool = False) -> nnx.LayerNorm:
    """LayerNorm with scale and bias on the logical axis `names`; `fast_variance=False` computes the
    variance as PyTorch does (mean of squared deviations), which HF parity needs."""
    return nnx.LayerNorm(
        dim, epsilon=eps, use_fast_variance=fast_variance, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
        scale_init=nnx.with_partitioning(nnx.initializers.ones_init(), names),
        bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), names),
    )


class RMSNorm(nnx.Module):
    """HF LlamaRMSNorm: normalise in float32, cast back, then scale."""

    def __init__(self, dim: int, eps: float, *, dtype: Any, param_dtype: Any):
        self.eps = eps
        self.dtype = dtype
        self.weight = nnx.Param(jnp.ones((dim,), param_dtype), out_sharding=("norm",))

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.weight[...].astype(self.dtype) * x32.astype(self.dtype)


# ----------------------------------------------------------------------------------------------- attention


def attention_bias(
    query_slots: jax.Array, key_mask: jax.Array, sliding_window: int | None = None
) -> jax.Array:
    """Additive mask float32[B, 1, 1, T, S]: 0 where visible, a large negative number elsewhere.

    query_slots: int32[T] slot of each query in the key sequence; key_mask: int[B, S] (1 = real key).
    Key s is visible from query t iff key_mask[b, s] and s <= query_slots[t] (and within the window).
    Example, no cache, left padding [0, 1, 1]: query 1 sees key 1; query 2 sees keys 1, 2; query 0 sees
    nothing (a padded row: uniform weights, finite, and ignored downstream).
    """
    key_slots = jnp.arange(key_mask.shape[-1])
    visible = key_slots[None, :] <= query_slots[:, None]
    if sliding_window is not None:
        visible &= query_slots[:, None] - key_slots[None, :] < sliding_window
    visible = visible[None] & (key_mask[:, None, :] > 0)
    return jnp.where(visible, 0.0, jnp.finfo(jnp.float32).min)[:, None, None]


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array) -> jax.Array:
    """Grouped-query attention. q: float[B, T, H, Dh]; k, v: float[B, S, KVH, Dh];
    bias: float32[B, 1, 1, T, S] (or anything broadcasting to float32[B, KVH, G, T, S]; 0.0 for none).

    Query heads are grouped under their kv head (h = kvh * G + g, as HF's repeat_kv): K/V are never repeated.
    Scores and softmax in float32. Returns float[B, T, H, Dh].
    """
    return attend(q, k.swapaxes(1, 2), v.swapaxes(1, 2), bias)


def attend(q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array) -> jax.Array:
    """`dot_product_attention` with head-major keys/values k, v: float[B, KVH, S, Dh] (the cache layout)."""
    b, t, h, d = q.shape
    kvh = k.shape[1]
    # Heads-first throughout ([B, KVH, G, T, Dh]): one explicit transpose in and one out, instead of XLA
    # transposing the einsums' operands and results (the decoder's forward is 1.1x faster on CPU).
    q = q.reshape(b, t, kvh, h // kvh, d).transpose(0, 2, 3, 1, 4)
    scores = jnp.einsum("bkgtd,bksd->bkgts", q, k, preferred_element_type=jnp.float32) / math.sqrt(d)
    probs = jax.nn.softmax(scores + bias, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bksd->bkgtd", probs, v)
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, h, d)


# --------------------------------------------------------------------------------------- position embeddings


def resample_posemb(posemb: jax.Array, new_grid: int) -> jax.Array:
    """float[(1+)G*G, D] -> float[(1+)new_grid**2, D]: bilinear resize of the patch grid. A leading class
    position (when the row count is a square plus one) is kept as is.

    Used when running a tower at another resolution than its checkpoint (e.g. CLIP-L/14 224 -> 336).
    """
    rows = posemb.shape[0]
    prefix = 0 if math.isqrt(rows) ** 2 == rows else 1
    head, grid = posemb[:prefix], posemb[prefix:]
    old = math.isqrt(grid.shape[0])
    if old * old != grid.shape[0]:
        raise ValueError(f"position embedding has {grid.shape[0]} patch rows, not a square grid")
    if old == new_grid:
        return posemb
    grid = grid.reshape(old, old, -1).astype(jnp.float32)
    grid = jax.image.resize(grid, (new_grid, new_grid, grid.shape[-1]), method="bilinear", antialias=False)
    return jnp.concatenate([head, grid.reshape(new_grid * new_grid, -1).astype(posemb.dtype)], axis=0)

"""Matmuls of bf16 operands accumulated in float32, forward and backward: the `dot_general` of our Linears.

A bf16 x bf16 product asked for a float32 result (`preferred_element_type`) runs on CPUs with AVX512-BF16 at
about twice the float32 rate, while XLA:CPU computes the plain bf16 -> bf16 product at the float32 rate.
Autodiff of the float32-result form would feed float32 cotangents to the backward products (the float32 rate
again), so the gradient products are written out too, with bf16 operands and float32 accumulation. The result
is rounded to bf16 as before: values match the plain bf16 product up to that rounding. Anything else (float32
operands, batch dimensions, other contractions) goes to `jax.lax.dot_general` unchanged.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp


def dot_general(lhs: jax.Array, rhs: jax.Array, dimension_numbers: Any, precision: Any = None,
                preferred_element_type: Any = None, **kwargs: Any) -> jax.Array:
    """`jax.lax.dot_general`, taking `bf16_matmul` for the Linear layer's bf16 x[..., K] @ w[K, N]."""
    (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = dimension_numbers
    is_matmul = (tuple(lhs_contract) == (lhs.ndim - 1,) and tuple(rhs_contract) == (0,) and rhs.ndim == 2
                 and not lhs_batch and not rhs_batch)
    bf16 = lhs.dtype == rhs.dtype == jnp.bfloat16 and preferred_element_type in (None, jnp.bfloat16)
    if is_matmul and bf16 and precision is None and not kwargs.get("out_sharding"):
        return bf16_matmul(lhs, rhs)
    return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                               preferred_element_type=preferred_element_type, **kwargs)


def _product(x: jax.Array, w: jax.Array) -> jax.Array:
    return jnp.matmul(x, w, preferred_element_type=jnp.float32).astype(jnp.bfloat16)


@jax.custom_vjp
def bf16_matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    """bf16[..., K] @ bf16[K, N] -> bf16[..., N], accumulated in float32."""
    return _product(x, w)


def _fwd(x, w):
    return _product(x, w), (x, w)


def _bwd(residuals, g):
    x, w = residuals
    g = g.astype(jnp.bfloat16)
    dx = jnp.matmul(g, w.T, preferred_element_type=jnp.float32).astype(x.dtype)
    x2, g2 = x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1])
    dw = jnp.matmul(x2.T, g2, preferred_element_type=jnp.float32).astype(w.dtype)
    return dx, dw


bf16_matmul.defvjp(_fwd, _bwd)

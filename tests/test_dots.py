"""The bf16 Linear product (float32 accumulation, forward and backward) computes what the plain one does."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from emollm_jax.models import dots


def _operands(seed=0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(3, 5, 64)), jnp.bfloat16)
    w = jnp.asarray(rng.normal(size=(64, 48)) / 8, jnp.bfloat16)
    return x, w


def _f32(a):
    return np.asarray(a, np.float32)


def test_bf16_matmul_values_and_gradients_match_float32_products_to_bf16_rounding():
    x, w = _operands()
    g = jnp.asarray(np.random.default_rng(1).normal(size=(3, 5, 48)), jnp.bfloat16)
    y, pullback = jax.vjp(dots.bf16_matmul, x, w)
    dx, dw = pullback(g)
    assert y.dtype == dx.dtype == dw.dtype == jnp.bfloat16
    xf, wf, gf = _f32(x), _f32(w), _f32(g)
    # Each is one rounding of an exact float32 product away from the float32 result: rtol 2^-8 (bf16 epsilon).
    np.testing.assert_allclose(_f32(y), xf @ wf, rtol=2**-8, atol=1e-6)
    np.testing.assert_allclose(_f32(dx), gf @ wf.T, rtol=2**-8, atol=1e-6)
    np.testing.assert_allclose(_f32(dw), xf.reshape(-1, 64).T @ gf.reshape(-1, 48), rtol=2**-8, atol=1e-5)


def test_dot_general_routes_only_plain_bf16_matmuls():
    x, w = _operands()
    dims = (((2,), (0,)), ((), ()))
    y = dots.dot_general(x, w, dims)
    np.testing.assert_allclose(_f32(y), _f32(jax.lax.dot_general(x, w, dims)), rtol=2**-7, atol=1e-6)
    # float32 operands and batched contractions are jax.lax.dot_general's, bit for bit
    xf, wf = x.astype(jnp.float32), w.astype(jnp.float32)
    np.testing.assert_array_equal(dots.dot_general(xf, wf, dims), jax.lax.dot_general(xf, wf, dims))
    batched = (((2,), (1,)), ((0,), (0,)))
    wb = jnp.ones((3, 64, 4), jnp.bfloat16)
    np.testing.assert_array_equal(dots.dot_general(x, wb, batched), jax.lax.dot_general(x, wb, batched))


def test_bf16_linear_gradients_reach_float32_master_weights():
    lin = nnx.Linear(64, 48, dtype=jnp.bfloat16, param_dtype=jnp.float32, dot_general=dots.dot_general,
                     rngs=nnx.Rngs(0))
    ref = nnx.Linear(64, 48, dtype=jnp.bfloat16, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    x, _ = _operands()

    def loss(model):
        return jnp.sum(model(x).astype(jnp.float32) ** 2)

    g, g_ref = nnx.grad(loss)(lin), nnx.grad(loss)(ref)
    assert g["kernel"][...].dtype == jnp.float32
    np.testing.assert_allclose(g["kernel"][...], g_ref["kernel"][...], rtol=2e-2, atol=2e-2)
    np.testing.assert_allclose(g["bias"][...], g_ref["bias"][...], rtol=2e-2, atol=2e-2)

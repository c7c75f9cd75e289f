"""Speed switches that must not change results: bf16 compute (fp32 master weights) tracks the fp32 loss, and
the fused cross-entropy's gradients equal plain autodiff of the textbook formula through a real decoder."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from emollm_jax import train
from emollm_jax.models.llama import LlamaConfig, LlamaForCausalLM

B, T, V = 4, 32, 256


def _batch():
    rng = np.random.default_rng(0)
    ids = rng.integers(0, V, (B, T)).astype(np.int32)
    mask = np.zeros((B, T), np.float32)
    mask[:, T // 2:] = 1.0
    return jnp.asarray(ids), jnp.asarray(np.roll(ids, -1, 1)), jnp.asarray(mask)


def _config(dtype: str) -> LlamaConfig:
    return LlamaConfig(vocab_size=V, hidden_size=64, intermediate_size=172, num_layers=2, num_heads=4,
                       num_kv_heads=2, dtype=dtype, param_dtype="float32")


def _train_losses(dtype: str, steps: int, chunk: int = 0) -> list[float]:
    graphdef, params, rest = nnx.split(LlamaForCausalLM(_config(dtype), rngs=nnx.Rngs(0)), nnx.Param, ...)
    tx = optax.adamw(1e-3, weight_decay=0.0)
    ids, targets, mask = _batch()

    @jax.jit
    def step(params, opt):
        def loss_of(p):
            model = nnx.merge(graphdef, p, rest)
            hidden = model(ids, return_hidden=True)
            return train.token_cross_entropy(model.logits, hidden, targets, mask, chunk)[0]

        loss, grads = jax.value_and_grad(loss_of)(params)
        updates, opt = tx.update(grads, opt, params)
        return optax.apply_updates(params, updates), opt, loss

    opt, losses = tx.init(params), []
    for _ in range(steps):
        params, opt, loss = step(params, opt)
        losses.append(float(loss))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))  # master weights stay fp32
    return losses


def test_bf16_compute_loss_within_1e3_of_fp32_after_50_steps():
    fp32, bf16 = _train_losses("float32", 50), _train_losses("bfloat16", 50)
    assert fp32[-1] < fp32[0] - 1.0  # it trains
    assert abs(bf16[-1] - fp32[-1]) < 1e-3, (fp32[-1], bf16[-1])


def test_fused_loss_gradients_equal_plain_autodiff_through_the_decoder():
    model = LlamaForCausalLM(_config("float32"), rngs=nnx.Rngs(1))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    ids, targets, half = _batch()

    def fused(p, mask, chunk):
        m = nnx.merge(graphdef, p, rest)
        return train.token_cross_entropy(m.logits, m(ids, return_hidden=True), targets, mask, chunk)[0]

    def plain(p, mask):
        logits = nnx.merge(graphdef, p, rest)(ids)
        nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], -1)[..., 0]
        return jnp.sum(nll * mask) / jnp.sum(mask)

    ragged = np.zeros((B, T), np.float32)  # answers in different places; a row and chunks with none
    ragged[0, 20:24], ragged[2, 5:7], ragged[3, 28:] = 1.0, 1.0, 1.0
    for mask in (half, jnp.asarray(ragged)):
        ref, g_ref = jax.value_and_grad(plain)(params, mask)
        for chunk in (0, 8, 12):  # one piece, even chunks (some skipped: none supervised), a padded last one
            loss, g = jax.value_and_grad(fused)(params, mask, chunk)
            np.testing.assert_allclose(loss, ref, rtol=1e-6)
            np.testing.assert_allclose(jax.jit(fused, static_argnums=2)(params, mask, chunk), ref, rtol=1e-6)
            for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref), strict=True):
                np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)

"""Attention implementations (`models/attention.py`): blockwise and jax.nn's fused path against the plain
one (fp32, 1e-5) for GQA, left padding, sliding windows, packed segments and lengths that are not a multiple
of the block; the decoder, its KV cache, the CLIP tower and the train step choose them from the config."""

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from emollm_jax import experiment, sharding, train
from emollm_jax.configuration import ConfigError, load_config
from emollm_jax.models import attention
from emollm_jax.models.clip import CLIPConfig, CLIPVisionTransformer
from emollm_jax.models.llama import LlamaConfig, LlamaForCausalLM, init_cache

TINY = f"{Path(__file__).resolve().parents[1] / 'configs' / 'emobench.py'}:tiny"
B, H, KVH, D = 2, 4, 2, 8


def _mask_cases(t: int):
    """name -> (AttentionMask, S) for T = t queries."""
    rs = np.random.RandomState(0)
    left = np.ones((B, t), np.int32)
    left[0, :5] = 0  # row 0 left padded: its first queries see nothing
    segments = np.zeros((B, t), np.int32)
    segments[0, t // 3:] = 1
    segments[0, 2 * t // 3:] = 2
    segments[1, t // 2:] = 1
    segments = jnp.asarray(segments)
    cache_slots = 20 + jnp.arange(t)  # a chunk written at cache slot 20 of a 20 + t + 3 slot cache
    cache_keys = np.ones((B, 20 + t + 3), np.int32)
    cache_keys[:, 20 + t:] = 0  # not yet written
    cache_keys[1, :7] = 0
    return {
        "full": (attention.AttentionMask(), t),
        "causal_left_padding": (attention.AttentionMask(key_mask=jnp.asarray(left), causal=True), t),
        "window": (attention.AttentionMask(key_mask=jnp.asarray(left), causal=True, window=6), t),
        "segments": (attention.AttentionMask(causal=True, q_segments=segments, k_segments=segments), t),
        "random_keys": (attention.AttentionMask(key_mask=jnp.asarray(rs.rand(B, t) > 0.3, jnp.int32)), t),
        "cache_chunk": (attention.AttentionMask(cache_slots, jnp.asarray(cache_keys), causal=True, window=9),
                        20 + t + 3),
    }


def _qkv(t: int, s: int, seed: int = 1):
    rs = np.random.RandomState(seed)
    q = jnp.asarray(rs.normal(size=(B, t, H, D)), jnp.float32)
    k = jnp.asarray(rs.normal(size=(B, KVH, s, D)), jnp.float32)
    v = jnp.asarray(rs.normal(size=(B, KVH, s, D)), jnp.float32)
    return q, k, v


def _run(mask, impl, q, k, v, weights, **blocks):
    """(loss, output) and the grads of sum(output * weights) w.r.t. q, k, v."""

    def f(q, k, v):
        m = attention.prepare(mask, impl, dtype=jnp.float32, head_dim=D, t=q.shape[1], s=k.shape[2])
        out = attention.blockwise_attention(q, k, v, m, **blocks) if impl == "blockwise" else \
            attention.attention(q, k, v, m)
        return jnp.sum(out * weights), out

    return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True))(q, k, v)


@pytest.mark.parametrize("t", [37, 16])
@pytest.mark.parametrize("case", ["full", "causal_left_padding", "window", "segments", "random_keys",
                                  "cache_chunk"])
def test_blockwise_equals_plain_outputs_and_grads(case, t):
    mask, s = _mask_cases(t)[case]
    q, k, v = _qkv(t, s)
    sees = mask.visible(jnp.arange(t), jnp.arange(s))
    rows = np.ones((B, t), bool) if sees is None else np.asarray(jnp.broadcast_to(sees.any(-1), (B, t)))
    # padding rows (no visible key) are never read downstream: the loss ignores them, as the model's does
    weights = jnp.asarray(np.random.RandomState(2).normal(size=(B, t, H, D)) * rows[:, :, None, None],
                          jnp.float32)
    (_, plain), plain_grads = _run(mask, "plain", q, k, v, weights)
    (_, block), block_grads = _run(mask, "blockwise", q, k, v, weights, block_q=8, block_k=16)
    np.testing.assert_allclose(np.asarray(block)[rows], np.asarray(plain)[rows], atol=1e-5, rtol=0)
    assert not np.any(np.asarray(block)[~rows])  # blockwise: zeros where nothing is visible
    if case == "causal_left_padding":
        assert (~rows).sum() == 5
    for name, a, b in zip("qkv", plain_grads, block_grads, strict=True):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-5, rtol=0, err_msg=f"d{name}")
        assert np.abs(np.asarray(a)).max() > 1e-2  # the gradients are not trivially zero


@pytest.mark.parametrize("case", ["causal_left_padding", "window", "segments", "cache_chunk"])
def test_jax_nn_path_translates_the_mask(case):
    """`fused_attention` (what `cudnn` runs on a GPU) through jax.nn's XLA implementation equals plain."""
    mask, s = _mask_cases(21)[case]
    q, k, v = _qkv(21, s)
    plain = attention.attention(q, k, v, attention.prepare(mask, "plain", dtype=jnp.float32, head_dim=D, t=21,
                                                            s=s))
    fused = attention.fused_attention(q, k, v, mask, implementation="xla")
    rows = np.asarray(jnp.broadcast_to(mask.visible(jnp.arange(21), jnp.arange(s)).any(-1), (B, 21)))
    np.testing.assert_allclose(np.asarray(fused)[rows], np.asarray(plain)[rows], atol=1e-5, rtol=0)


def test_blockwise_skips_empty_blocks_and_keeps_no_scores():
    """The backward pass stores q, k, v, out and the row log-sum-exp: no [T, S] residual."""
    t = 256
    mask = attention.AttentionMask(causal=True)
    q, k, v = _qkv(t, t)

    def loss(q, k, v):
        m = attention.prepare(mask, "blockwise", dtype=jnp.float32, head_dim=D, t=t, s=t)
        return jnp.sum(attention.blockwise_attention(q, k, v, m, block_q=32, block_k=32))

    residuals = jax.eval_shape(lambda *a: jax.vjp(loss, *a)[1], q, k, v)
    biggest = max(int(np.prod(x.shape)) for x in jax.tree.leaves(residuals))
    assert biggest <= B * H * t * D, biggest  # the size of q; plain attention keeps B * H * T * T


def _largest_value(jaxpr) -> int:
    """Elements of the largest value any equation of `jaxpr` (or of a jaxpr inside it) produces."""
    sizes = [0]
    for eqn in jaxpr.eqns:
        sizes += [int(np.prod(v.aval.shape)) for v in eqn.outvars if hasattr(v.aval, "shape")]
        for param in eqn.params.values():
            for sub in param if isinstance(param, tuple | list) else (param,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    sizes.append(_largest_value(inner))
    return max(sizes)


@pytest.mark.parametrize("impl", ["plain", "blockwise"])
def test_no_score_sized_value_in_a_scanned_decoder_gradient(impl, monkeypatch):
    """Inside a scan over layers the mask is loop-invariant; autodiff must still not precompute every
    block's mask (or anything [T, S]) ahead of the loop. The plain path, for contrast, has [T, S] scores."""
    monkeypatch.setattr(attention, "BLOCK_Q", 32)
    monkeypatch.setattr(attention, "BLOCK_K", 32)
    t = 256
    model = _llama(attention=impl, scan_layers=True, remat=True)
    ids = jnp.zeros((2, t), jnp.int32)
    grad = nnx.grad(lambda m: jnp.sum(m(ids, attention_mask=jnp.ones_like(ids))[..., :2]))
    largest = _largest_value(jax.make_jaxpr(grad)(model).jaxpr)
    scores = 2 * 4 * t * t  # B * H * T * S
    assert (largest >= scores) == (impl == "plain"), (largest, scores)


def test_auto_resolves_by_backend_and_length():
    on_cpu = dict(dtype=jnp.bfloat16, head_dim=128)
    assert attention.resolve("auto", num_keys=attention.BLOCKWISE_MIN_KEYS - 1, **on_cpu) == "plain"
    assert attention.resolve("auto", num_keys=attention.BLOCKWISE_MIN_KEYS, **on_cpu) == "blockwise"
    assert attention.resolve("plain", num_keys=10**6, **on_cpu) == "plain"
    assert attention.cudnn_supported(jnp.bfloat16, 128) and not attention.cudnn_supported(jnp.float32, 128)
    assert not attention.cudnn_supported(jnp.bfloat16, 256)
    with pytest.raises(ValueError, match="attention='cudnn' needs a GPU"):
        attention.prepare(attention.AttentionMask(), "cudnn", dtype=jnp.bfloat16, head_dim=64, t=4, s=4)
    with pytest.raises(ValueError, match="attention='flash'"):
        attention.resolve("flash", num_keys=4, **on_cpu)


def _llama(**kw):
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                      num_kv_heads=2, attention_bias=True, **kw)
    return LlamaForCausalLM(cfg, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("window", [None, 5])
def test_decoder_blockwise_equals_plain(window, monkeypatch):
    monkeypatch.setattr(attention, "BLOCK_Q", 8)  # several blocks in a short sequence
    monkeypatch.setattr(attention, "BLOCK_K", 8)
    ids = jnp.asarray(np.random.RandomState(3).randint(0, 64, (2, 19)))
    mask = np.ones((2, 19), np.int32)
    mask[1, :6] = 0
    real = mask.astype(bool)

    def loss(m):
        logits = m(ids, attention_mask=jnp.asarray(mask))
        return jnp.sum(jnp.where(real[..., None], jax.nn.log_softmax(logits), 0.0)[..., :5]), logits

    grads = {}
    for impl in ("plain", "blockwise"):
        model = _llama(sliding_window=window, attention=impl)
        (_, logits), g = nnx.jit(nnx.value_and_grad(loss, has_aux=True))(model)
        grads[impl] = (np.asarray(logits), nnx.to_pure_dict(g))
    np.testing.assert_allclose(grads["blockwise"][0][real], grads["plain"][0][real], atol=1e-5, rtol=0)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=0), grads["blockwise"][1],
                 grads["plain"][1])


def test_kv_cache_decoding_with_blockwise_equals_plain(monkeypatch):
    monkeypatch.setattr(attention, "BLOCK_Q", 4)  # the 16-slot cache in 4 key blocks (the last ones empty
    monkeypatch.setattr(attention, "BLOCK_K", 4)  # until decoding reaches them: skipped)
    ids = jnp.asarray(np.random.RandomState(4).randint(0, 64, (2, 12)))
    mask = np.ones((2, 12), np.int32)
    mask[0, :3] = 0
    out = {}
    for impl in ("plain", "blockwise"):
        model = _llama(attention=impl)
        step = nnx.jit(lambda m, x, mk, c: m(x, attention_mask=mk, cache=c))
        cache = init_cache(model.config, 2, 16)
        first, cache = step(model, ids[:, :9], jnp.asarray(mask[:, :9]), cache)
        chunks = [first]
        for t in (9, 10, 11):
            logits, cache = step(model, ids[:, t:t + 1], jnp.asarray(mask[:, t:t + 1]), cache)
            chunks.append(logits)
        out[impl] = np.concatenate([np.asarray(c) for c in chunks], axis=1)
    real = mask.astype(bool)
    np.testing.assert_allclose(out["blockwise"][real], out["plain"][real], atol=1e-5, rtol=0)


def test_clip_tower_blockwise_equals_plain(monkeypatch):
    monkeypatch.setattr(attention, "BLOCK_Q", 4)
    monkeypatch.setattr(attention, "BLOCK_K", 4)
    cfg = CLIPConfig(image_size=32, patch_size=8, hidden_size=16, intermediate_size=32, num_layers=2,
                     num_heads=2)
    x = jnp.asarray(np.random.RandomState(5).randn(2, 32, 32, 3).astype(np.float32))
    out = {}
    for impl in ("plain", "blockwise"):
        tower = CLIPVisionTransformer(dataclasses.replace(cfg, attention=impl), rngs=nnx.Rngs(0))
        loss = lambda m: jnp.sum(jnp.sin(m(x).hidden_states[-1]))  # noqa: E731
        out[impl] = nnx.jit(nnx.value_and_grad(loss))(tower)
    # the loss sums 544 sines of either output (each within 1e-5): its rounding differs by ~1e-6
    np.testing.assert_allclose(out["blockwise"][0], out["plain"][0], atol=1e-5, rtol=0)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=0),
                 nnx.to_pure_dict(out["blockwise"][1]), nnx.to_pure_dict(out["plain"][1]))


@pytest.mark.slow  # full train-step compiles
def test_config_key_reaches_the_train_step():
    """`--config.model.text.attention=blockwise` (and the tower's) through the real train step: same
    losses."""
    from test_train import _batch

    losses = {}
    for impl in ("plain", "blockwise"):
        config = load_config(TINY, [f"model.text.attention={impl}", f"model.vision.attention={impl}"])
        mesh = sharding.make_mesh({"data": 1}, devices=jax.devices()[:1])
        base = experiment.model_config(config, vocab_size=64, image_token_id=4)
        assert base.text.attention == base.vision.attention == impl
        st = train.build_stage(config, 1, base, mesh, total_steps=10)
        params = train.init_params(config, st.model_cfg, st.param_shardings)
        opt = jax.jit(st.tx.init, out_shardings=st.opt_shardings)(params)
        out = []
        for i in range(2):
            params, opt, m = st.step_fn(params, opt, sharding.global_batch(_batch(base, seed=i), mesh))
            out.append(float(m["loss"]))
        losses[impl] = out
    np.testing.assert_allclose(losses["blockwise"], losses["plain"], rtol=1e-5)
    with pytest.raises(ConfigError, match=r"config\.model\.text\.attention='flash'"):
        experiment.model_config(load_config(TINY, ["model.text.attention=flash"]), vocab_size=64,
                                image_token_id=4)

"""LoRA on a tiny LLaMA: identity at init, merge equivalence, sharding names, the optimizer lora group."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import emollm_jax  # noqa: F401  (turns off flax eager sharding before any model is built)
from emollm_jax import lora, optim
from emollm_jax import sharding as shd
from emollm_jax.models.llama import LlamaConfig, LlamaForCausalLM

TINY = LlamaConfig(
    vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2
)
TARGETS = ("q_proj", "v_proj", "down_proj")
IDS = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 7)), jnp.int32)


def _paths(model, kind=nnx.Param):
    return {p for p, _ in nnx.to_flat_state(nnx.state(model, kind))}


def _with_lora(rank=4, alpha=8.0):
    model = LlamaForCausalLM(TINY, rngs=nnx.Rngs(0))
    before_paths, before = _paths(model), model(IDS)
    wrapped = lora.apply_lora(model, rank, alpha, TARGETS, nnx.Rngs(1))
    return model, wrapped, before_paths, before


def _randomize_b(model, seed=2):
    """Give every adapter a non-zero B, as training would."""
    key = jax.random.key(seed)
    for _, node in nnx.iter_graph(model):
        if isinstance(node, lora.LoRA):
            key, sub = jax.random.split(key)
            node.b[...] = 0.2 * jax.random.normal(sub, node.b[...].shape)


def test_apply_lora_keeps_output_and_base_paths():
    model, wrapped, before_paths, before = _with_lora()
    assert len(wrapped) == TINY.num_layers * len(TARGETS)
    assert "model/layers/1/self_attn/v_proj" in wrapped
    np.testing.assert_array_equal(np.asarray(model(IDS)), np.asarray(before))  # B = 0: exactly the base
    after = _paths(model)
    assert before_paths < after  # base kernels keep their paths (checkpoints and key maps still apply)
    added = after - before_paths
    assert added == _paths(model, nnx.LoRAParam)
    assert ("model", "layers", 0, "self_attn", "q_proj", "lora", "a") in added
    a = model.model.layers[0].mlp.down_proj.lora.a[...]
    b = model.model.layers[0].mlp.down_proj.lora.b[...]
    assert a.shape == (TINY.intermediate_size, 4) and b.shape == (4, TINY.hidden_size)
    assert np.any(np.asarray(a)) and not np.any(np.asarray(b))
    assert {optim.param_group(p) for p in added} == {"lora"}


def test_lora_update_is_scaled_low_rank():
    model, _, _, _ = _with_lora(rank=4, alpha=8.0)
    _randomize_b(model)
    layer = model.model.layers[1].self_attn.q_proj
    x = jax.random.normal(jax.random.key(5), (3, TINY.hidden_size))
    a, b = np.asarray(layer.lora.a[...]), np.asarray(layer.lora.b[...])
    want = np.asarray(x) @ np.asarray(layer.kernel[...]) + (8.0 / 4) * (np.asarray(x) @ a @ b)
    np.testing.assert_allclose(np.asarray(layer(x)), want, rtol=1e-5, atol=1e-5)


def test_merge_equals_unmerged_and_restores_plain_linears():
    model, _, before_paths, before = _with_lora()
    _randomize_b(model)
    unmerged = np.asarray(model(IDS))
    assert np.abs(unmerged - np.asarray(before)).max() > 1e-3  # the adapters do change the output
    assert lora.merge_lora(model) == TINY.num_layers * len(TARGETS)
    np.testing.assert_allclose(np.asarray(model(IDS)), unmerged, rtol=1e-5, atol=1e-5)
    assert _paths(model) == before_paths
    assert type(model.model.layers[0].self_attn.q_proj) is nnx.Linear
    assert lora.merge_lora(model) == 0


def test_lora_params_get_logical_shardings():
    model, _, _, _ = _with_lora()
    mesh = shd.make_mesh({"fsdp": 4, "tensor": 2})
    sh = shd.logical_shardings(nnx.state(model, nnx.Param), mesh)
    q = sh["model"]["layers"][0]["self_attn"]["q_proj"]["lora"]
    assert q["a"].get_value().is_equivalent_to(NamedSharding(mesh, P("fsdp", None)), 2)
    assert q["b"].get_value().is_equivalent_to(NamedSharding(mesh, P(None, "tensor")), 2)


def test_lora_group_trains_only_adapters():
    model, _, _, _ = _with_lora()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    opt = optim.make_optimizer(
        dict(
            trainable=["lora"], lr=1e-2, schedule="constant", warmup_steps=0, weight_decay=0.1, grad_clip=1.0
        ),
        params,
        total_steps=5,
    )
    state = opt.tx.init(params)
    lora_bytes = sum(x.nbytes for x in jax.tree.leaves(nnx.state(model, nnx.LoRAParam)))
    assert 2 * lora_bytes <= optim.state_bytes(state) <= 2 * lora_bytes + 64

    @jax.jit
    def step(params, state):
        def loss_fn(p):
            logits = nnx.merge(graphdef, p, rest)(IDS[:, :-1])
            return optax.softmax_cross_entropy_with_integer_labels(logits, IDS[:, 1:]).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, state = opt.tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    new, losses = params, []
    for _ in range(3):
        new, state, loss = step(new, state)
        losses.append(float(loss))
    assert losses[-1] < losses[0]
    for (path, old), (_, cur) in zip(nnx.to_flat_state(params), nnx.to_flat_state(new), strict=True):
        moved = not np.array_equal(np.asarray(old.get_value()), np.asarray(cur.get_value()))
        assert moved == ("lora" in path), path


def test_bad_targets():
    model = LlamaForCausalLM(TINY, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="no nnx.Linear named any of \\('qkv',\\)"):
        lora.apply_lora(model, 4, 8.0, ("qkv",), nnx.Rngs(0))
    lora.apply_lora(model, 4, 8.0, ("q_proj",), nnx.Rngs(0))
    with pytest.raises(ValueError, match="q_proj already has LoRA"):
        lora.apply_lora(model, 4, 8.0, ("q_proj",), nnx.Rngs(0))
    with pytest.raises(ValueError, match="rank=0"):
        lora.apply_lora(LlamaForCausalLM(TINY, rngs=nnx.Rngs(0)), 0, 8.0, ("q_proj",), nnx.Rngs(0))

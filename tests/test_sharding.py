"""Mesh construction, logical-axis rules, optimizer-state shardings and mesh-independence of training."""

import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import emollm_jax  # noqa: F401  (turns off flax eager sharding before any model is built)
from emollm_jax import sharding as shd
from emollm_jax.models.llama import LlamaConfig, LlamaForCausalLM

TINY = LlamaConfig(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=48,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    max_position_embeddings=64,
)


def _abstract_params(cfg=TINY):
    model = nnx.eval_shape(lambda: LlamaForCausalLM(cfg, rngs=nnx.Rngs(0)))
    return nnx.state(model, nnx.Param)


def _sharding_of(state, *path):
    node = state
    for k in path:
        node = node[k]
    return node.get_value() if hasattr(node, "get_value") else node.value


def test_make_mesh_shapes_and_fill():
    mesh = shd.make_mesh({"data": -1, "tensor": 2})
    assert dict(mesh.shape) == {"data": 4, "fsdp": 1, "tensor": 2}
    assert mesh.axis_names == ("data", "fsdp", "tensor")
    assert dict(shd.make_mesh({"fsdp": 8}).shape) == {"data": 1, "fsdp": 8, "tensor": 1}
    one = shd.make_mesh({}, devices=jax.devices()[:1])
    assert one.size == 1


@pytest.mark.parametrize(
    "shape, axis",
    [
        ({"data": 3}, "data"),
        ({"fsdp": -1, "tensor": 3}, "fsdp"),
        ({"data": -1, "tensor": -1}, "data"),
        ({"model": 2}, "model"),
        ({"tensor": 0}, "tensor"),
    ],
)
def test_make_mesh_errors_name_the_axis(shape, axis):
    with pytest.raises(ValueError, match=repr(axis)):
        shd.make_mesh(shape)


def test_llama_param_shardings_follow_rules():
    mesh = shd.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    sh = shd.logical_shardings(_abstract_params(), mesh, shd.DEFAULT_RULES)
    expect = {
        ("model", "embed_tokens", "embedding"): P("tensor", "fsdp"),  # (vocab, embed)
        ("model", "layers", 0, "self_attn", "q_proj", "kernel"): P("fsdp", "tensor"),  # (embed, heads)
        ("model", "layers", 1, "self_attn", "k_proj", "kernel"): P("fsdp", "tensor"),  # (embed, kv_heads)
        ("model", "layers", 0, "self_attn", "o_proj", "kernel"): P("tensor", "fsdp"),  # (heads, embed)
        ("model", "layers", 0, "mlp", "down_proj", "kernel"): P("tensor", "fsdp"),  # (mlp, embed)
        ("model", "layers", 0, "input_layernorm", "weight"): P(None),  # (norm,)
        ("lm_head", "kernel"): P("fsdp", "tensor"),  # (embed, vocab)
    }
    for path, spec in expect.items():
        got = _sharding_of(sh, *path)
        assert isinstance(got, NamedSharding)
        ndim = len(spec) if len(spec) else 1
        assert got.is_equivalent_to(NamedSharding(mesh, spec), ndim), (path, got.spec, spec)
    # The rules really matter: a different table gives a different placement.
    other = shd.logical_shardings(_abstract_params(), mesh, [("embed", "tensor"), ("mlp", "fsdp")])
    got = _sharding_of(other, "model", "layers", 0, "mlp", "up_proj", "kernel")
    assert got.is_equivalent_to(NamedSharding(mesh, P("tensor", "fsdp")), 2)


def test_placed_params_are_sharded_on_devices():
    mesh = shd.make_mesh({"fsdp": 4, "tensor": 2})
    model = LlamaForCausalLM(TINY, rngs=nnx.Rngs(0))
    params = nnx.state(model, nnx.Param)
    sh = shd.logical_shardings(params, mesh, shd.DEFAULT_RULES)
    placed = jax.device_put(params, sh)
    q = placed["model"]["layers"][0]["self_attn"]["q_proj"]["kernel"].get_value()
    assert q.sharding.is_equivalent_to(NamedSharding(mesh, P("fsdp", "tensor")), 2)
    assert q.addressable_shards[0].data.shape == (32 // 4, 32 // 2)
    np.testing.assert_array_equal(
        np.asarray(q), np.asarray(params["model"]["layers"][0]["self_attn"]["q_proj"]["kernel"].get_value())
    )


class _Odd(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        init = nnx.initializers.normal(0.02)
        self.w = nnx.Param(init(rngs.params(), (6, 16)), out_sharding=("embed", "mlp"))
        self.v = nnx.Param(init(rngs.params(), (8, 8)), out_sharding=("batch", "embed"))  # both want fsdp


def test_non_dividing_dim_falls_back_with_warning(caplog):
    mesh = shd.make_mesh({"data": 1, "fsdp": 4, "tensor": 2})
    state = nnx.state(nnx.eval_shape(lambda: _Odd(nnx.Rngs(0))), nnx.Param)
    with caplog.at_level(logging.WARNING, logger="emollm_jax.sharding"):
        sh = shd.logical_shardings(state, mesh, shd.DEFAULT_RULES)
    w = _sharding_of(sh, "w")
    assert w.is_equivalent_to(NamedSharding(mesh, P(None, "tensor")), 2), w.spec
    msgs = [r.getMessage() for r in caplog.records]
    assert any("w dim 0 (embed) of size 6 is not divisible by mesh axis 'fsdp'" in m for m in msgs), msgs
    # batch -> (data, fsdp) takes fsdp on dim 0, so embed cannot reuse it on dim 1.
    v = _sharding_of(sh, "v")
    assert v.is_equivalent_to(NamedSharding(mesh, P(("data", "fsdp"), None)), 2), v.spec
    assert any("already used" in m for m in msgs), msgs


def test_rule_naming_unknown_mesh_axis_is_an_error():
    mesh = shd.make_mesh({"data": -1})
    with pytest.raises(
        ValueError, match="(lm_head/kernel|embed_tokens/embedding): rule 'vocab' -> 'model' names no axis"
    ):
        shd.logical_shardings(_abstract_params(), mesh, [("vocab", "model")])


def test_optimizer_state_mirrors_param_shardings():
    mesh = shd.make_mesh({"fsdp": 4, "tensor": 2})
    params = _abstract_params()
    psh = shd.logical_shardings(params, mesh, shd.DEFAULT_RULES)
    tx = optax.MultiSteps(optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3)), every_k_schedule=2)
    opt_shapes = jax.eval_shape(tx.init, params)
    osh = shd.optimizer_shardings(opt_shapes, psh, mesh)
    want = _sharding_of(psh, "model", "layers", 0, "mlp", "gate_proj", "kernel")
    mu = osh.inner_opt_state[1][0].mu["model"]["layers"][0]["mlp"]["gate_proj"]["kernel"]
    acc = osh.acc_grads["model"]["layers"][0]["mlp"]["gate_proj"]["kernel"]
    for s in (mu, acc):
        s = s.get_value() if hasattr(s, "get_value") else s
        assert s.is_equivalent_to(want, 2)
    assert osh.mini_step.is_equivalent_to(shd.replicated(mesh), 0)


def _batch(n=8, t=8, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, TINY.vocab_size, size=(n, t + 1), dtype=np.int32)
    return {"input_ids": ids[:, :-1], "targets": ids[:, 1:]}


def run_adamw(mesh, steps=3, cfg=TINY, batches=None):
    """Losses of `steps` jitted AdamW steps of a tiny LLaMA placed on `mesh` by DEFAULT_RULES."""
    model = LlamaForCausalLM(cfg, rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx = optax.adamw(1e-2, weight_decay=0.1)
    psh = shd.logical_shardings(params, mesh, shd.DEFAULT_RULES)
    osh = shd.optimizer_shardings(jax.eval_shape(tx.init, params), psh, mesh)
    params = jax.device_put(params, psh)
    opt_state = jax.jit(tx.init, out_shardings=osh)(params)

    def step(params, opt_state, batch):
        def loss_fn(p):
            logits = nnx.merge(graphdef, p, rest)(batch["input_ids"])
            return optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"]).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    dsh = shd.data_sharding(mesh)
    step = jax.jit(
        step,
        in_shardings=(psh, osh, dsh),
        out_shardings=(psh, osh, shd.replicated(mesh)),
        donate_argnums=(0, 1),
    )
    losses = []
    for i in range(steps):
        batch = shd.global_batch(batches[i] if batches else _batch(seed=i), mesh)
        params, opt_state, loss = step(params, opt_state, batch)
        losses.append(float(loss))
    q = params["model"]["layers"][0]["self_attn"]["q_proj"]["kernel"].get_value()
    return np.array(losses), q.sharding


@functools.cache
def _single_device_losses():
    return run_adamw(shd.make_mesh({}, devices=jax.devices()[:1]))[0]


@pytest.mark.parametrize("shape", [{"data": 8}, {"fsdp": 8}, {"data": 2, "fsdp": 2, "tensor": 2}])
def test_loss_is_mesh_independent(shape):
    ref = _single_device_losses()
    mesh = shd.make_mesh(shape)
    got, q_sharding = run_adamw(mesh)
    assert ref[-1] < ref[0]  # it trains
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5)
    # Parameters stay where the rules put them after the donated update.
    want = shd.logical_to_spec(("embed", "heads"), (32, 32), mesh, shd.DEFAULT_RULES)
    assert q_sharding.is_equivalent_to(NamedSharding(mesh, want), 2)


def test_global_batch_is_sharded_over_batch_axes():
    mesh = shd.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    b = shd.global_batch({"x": np.arange(16, dtype=np.int32).reshape(4, 4)}, mesh)["x"]
    assert b.shape == (4, 4)
    assert b.sharding.is_equivalent_to(NamedSharding(mesh, P(("data", "fsdp"))), 2)
    assert {s.data.shape for s in b.addressable_shards} == {(1, 4)}
    with pytest.raises(ValueError, match="batch\\['x'\\].*not divisible"):
        shd.global_batch({"x": np.zeros((3, 4), np.int32)}, mesh)
    assert jnp.array_equal(b, np.arange(16).reshape(4, 4))


def test_initialize_distributed_single_process_is_noop(monkeypatch):
    for k in (
        "JAX_COORDINATOR_ADDRESS",
        "JAX_NUM_PROCESSES",
        "JAX_PROCESS_ID",
        "SLURM_JOB_ID",
        "SLURM_NTASKS",
    ):
        monkeypatch.delenv(k, raising=False)
    assert shd.initialize_distributed() is False
    monkeypatch.setenv("JAX_NUM_PROCESSES", "1")
    assert shd.initialize_distributed() is False
    monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
    with pytest.raises(ValueError, match="JAX_COORDINATOR_ADDRESS"):
        shd.initialize_distributed()
    monkeypatch.setenv("JAX_NUM_PROCESSES", "two")
    with pytest.raises(ValueError, match="JAX_NUM_PROCESSES='two'"):
        shd.initialize_distributed()

"""Optimizer groups, freezing without optimizer state, schedules, clipping, decay mask and accumulation."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import emollm_jax  # noqa: F401  (turns off flax eager sharding before any model is built)
from emollm_jax import optim
from emollm_jax.models.llama import LlamaConfig, LlamaForCausalLM

TINY = LlamaConfig(
    vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2
)


class ToyVLM(nnx.Module):
    """EmoLLM's top-level layout (vision / projector / llm) with small parts."""

    def __init__(self, rngs: nnx.Rngs):
        self.vision = nnx.Sequential(nnx.Linear(4, 8, rngs=rngs), nnx.LayerNorm(8, rngs=rngs))
        self.projector = nnx.Linear(8, 32, rngs=rngs)
        self.llm = LlamaForCausalLM(TINY, rngs=rngs)


def _params():
    return nnx.state(ToyVLM(nnx.Rngs(0)), nnx.Param)


def _grads(params, scale=1.0):
    """A gradient with every entry non-zero: d/dp of 0.5 * scale * sum(p**2 + p)."""
    return jax.grad(lambda p: 0.5 * scale * sum(jnp.sum(x**2 + x) for x in jax.tree.leaves(p)))(params)


def _stage(**kw):
    return (
        dict(
            trainable=["projector"],
            lr=1e-2,
            schedule="constant",
            warmup_steps=0,
            weight_decay=0.0,
            grad_clip=0.0,
            grad_accum=1,
        )
        | kw
    )


def _leaves_by_group(tree):
    groups = optim.group_labels(tree)
    out = {}
    for g, x in zip(jax.tree.leaves(groups), jax.tree.leaves(tree), strict=True):
        out.setdefault(g, []).append(np.asarray(x))
    return out


def _bytes(leaves):
    return sum(x.nbytes for x in leaves)


def test_param_group_by_top_level_attribute():
    assert optim.param_group(("vision", "encoder", "layers", 0, "mlp", "fc1", "kernel")) == "vision"
    assert optim.param_group(("projector", "linear_1", "kernel")) == "projector"
    assert optim.param_group(("llm", "model", "layers", 3, "self_attn", "q_proj", "kernel")) == "llm"
    assert optim.param_group(("llm", "model", "layers", 3, "self_attn", "q_proj", "lora", "a")) == "lora"
    assert optim.param_group(("model", "embed_tokens", "embedding")) == "llm"  # bare decoder
    labels = _leaves_by_group(_params())
    assert set(labels) == {"vision", "projector", "llm"}


@pytest.mark.parametrize("trainable", [["projector"], ["projector", "llm"]])
def test_frozen_groups_have_no_state_and_do_not_move(trainable):
    params = _params()
    opt = optim.make_optimizer(_stage(trainable=trainable), params, total_steps=10)
    state = opt.tx.init(params)
    by_group = _leaves_by_group(params)
    trainable_bytes = sum(_bytes(by_group[g]) for g in trainable)
    # Adam keeps mu and nu for trainable leaves only; the rest of the state is a few scalar counts.
    n_trainable_leaves = sum(len(by_group[g]) for g in trainable)
    big = [x for x in jax.tree.leaves(state) if np.ndim(x) > 0]
    assert len(big) == 2 * n_trainable_leaves
    assert trainable_bytes * 2 <= optim.state_bytes(state) <= trainable_bytes * 2 + 64
    total = sum(_bytes(v) for v in by_group.values())
    assert optim.state_bytes(state) < 2 * total  # what masking instead of set_to_zero would cost

    new = params
    for _ in range(3):
        updates, state = opt.tx.update(_grads(new), state, new)
        new = optax.apply_updates(new, updates)
    before, after = _leaves_by_group(params), _leaves_by_group(new)
    for g in before:
        moved = [not np.array_equal(a, b) for a, b in zip(before[g], after[g], strict=True)]
        assert all(moved) if g in trainable else not any(moved), g


def test_lr_schedule_values():
    cos = optim.lr_schedule(1e-3, total_steps=110, warmup_steps=10, kind="cosine")
    np.testing.assert_allclose(
        [float(cos(s)) for s in (0, 5, 10, 60, 110, 200)], [0.0, 5e-4, 1e-3, 5e-4, 0.0, 0.0], atol=1e-9
    )
    np.testing.assert_allclose(float(cos(35)), 1e-3 * 0.5 * (1 + np.cos(np.pi / 4)), rtol=1e-6)
    const = optim.lr_schedule(2e-4, total_steps=100, warmup_steps=4, kind="constant")
    np.testing.assert_allclose([float(const(s)) for s in (0, 2, 4, 99)], [0.0, 1e-4, 2e-4, 2e-4], rtol=1e-6)
    # warmup_ratio resolves against the stage length, and lr_fn is what the updates use.
    opt = optim.make_optimizer(_stage(schedule="cosine", warmup_ratio=0.1, warmup_steps=None), _params(), 50)
    np.testing.assert_allclose(float(opt.lr_fn(5)), 1e-2, rtol=1e-6)
    np.testing.assert_allclose(float(opt.lr_fn(2)), 1e-2 * 2 / 5, rtol=1e-6)


def test_clipping_uses_trainable_grads_only():
    params = _params()
    opt = optim.make_optimizer(_stage(grad_clip=0.5), params, total_steps=10)
    proj = params["projector"]
    ref = optax.chain(optax.clip_by_global_norm(0.5), optax.adamw(1e-2, weight_decay=0.0))
    s, rs = opt.tx.init(params), ref.init(proj)
    # Step sizes differ between steps, so Adam's result depends on how each step was clipped.
    for scale in (50.0, 0.01, 3.0):
        g = _grads(params, scale)
        u, s = opt.tx.update(g, s, params)
        ru, rs = ref.update(g["projector"], rs, proj)
    for a, b in zip(jax.tree.leaves(u["projector"]), jax.tree.leaves(ru), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9)


def test_weight_decay_skips_norms_and_biases():
    params = _params()
    opt = optim.make_optimizer(_stage(trainable=["vision"], weight_decay=0.1), params, total_steps=10)
    zero = jax.tree.map(jnp.zeros_like, params)
    u, _ = opt.tx.update(zero, opt.tx.init(params), params)
    vis = u["vision"]["layers"]
    np.testing.assert_allclose(
        vis[0]["kernel"].get_value(),
        -1e-2 * 0.1 * params["vision"]["layers"][0]["kernel"].get_value(),
        rtol=1e-6,
    )
    for leaf in (vis[0]["bias"], vis[1]["scale"], vis[1]["bias"]):
        assert not np.any(leaf.get_value())


def test_grad_accumulation_matches_mean_gradient():
    params = _params()
    acc = optim.make_optimizer(_stage(grad_accum=2, weight_decay=0.05, grad_clip=1.0), params, 10)
    one = optim.make_optimizer(_stage(grad_accum=1, weight_decay=0.05, grad_clip=1.0), params, 10)
    g1, g2 = _grads(params, 1.0), _grads(params, 3.0)
    s = acc.tx.init(params)
    u1, s = acc.tx.update(g1, s, params)
    assert not any(np.any(x) for x in jax.tree.leaves(u1))  # first micro-batch: no update yet
    u2, s = acc.tx.update(g2, s, params)
    mean = jax.tree.map(lambda a, b: (a + b) / 2, g1, g2)
    ref, _ = one.tx.update(mean, one.tx.init(params), params)
    for a, b in zip(jax.tree.leaves(u2), jax.tree.leaves(ref), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-9)
    # Accumulated gradients exist for the trainable group only.
    by_group = _leaves_by_group(params)
    assert optim.state_bytes(s) <= 3 * _bytes(by_group["projector"]) + 64


def test_bad_stage_names_the_key():
    with pytest.raises(ValueError, match="stage.trainable.*unknown group 'decoder'"):
        optim.make_optimizer(_stage(trainable=["decoder"]), _params(), 10)
    with pytest.raises(ValueError, match="stage.trainable names group 'lora'.*no parameter"):
        optim.make_optimizer(_stage(trainable=["lora"]), _params(), 10)
    with pytest.raises(ValueError, match="schedule='linear'"):
        optim.make_optimizer(_stage(schedule="linear"), _params(), 10)

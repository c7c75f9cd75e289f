"""Training checkpoints: round trip, resharding on restore, retention, interrupted saves, params-only."""

import functools

import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from jax.sharding import NamedSharding

import emollm_jax  # noqa: F401  (turns off flax eager sharding before any model is built)
from emollm_jax import checkpoint as ckpt
from emollm_jax import optim
from emollm_jax import sharding as shd
from emollm_jax.models.llama import LlamaConfig, LlamaForCausalLM

TINY = LlamaConfig(
    vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2
)
STAGE = dict(
    trainable=["llm"], lr=1e-2, schedule="constant", warmup_steps=0, weight_decay=0.01, grad_clip=1.0
)


@functools.cache
def _init():
    """Initial params (built once: eager init compiles every initializer) and the optimizer."""
    params = nnx.state(LlamaForCausalLM(TINY, rngs=nnx.Rngs(0)), nnx.Param)
    tx = optim.make_optimizer(STAGE, params, total_steps=10).tx

    def step(g, o, p):
        u, o = tx.update(g, o, p)
        return optax.apply_updates(p, u), o

    return params, tx, jax.jit(step)


def _trained_state(mesh, steps=2):
    """Params and optimizer state of a tiny LLaMA after a few updates, placed on `mesh` by DEFAULT_RULES."""
    params, tx, _ = _init()
    psh = shd.logical_shardings(params, mesh)
    osh = shd.optimizer_shardings(jax.eval_shape(tx.init, params), psh, mesh)
    params = jax.device_put(params, psh)
    opt_state = jax.jit(tx.init, out_shardings=osh)(params)
    for i in range(steps):
        params, opt_state = _update(jax.tree.map(lambda p, i=i: (i + 1) * 0.1 * p, params), opt_state, params)
    return params, opt_state, tx


def _update(grads, opt_state, params):
    return _init()[2](grads, opt_state, params)


def _targets(mesh, tx):
    abstract = nnx.state(nnx.eval_shape(lambda: LlamaForCausalLM(TINY, rngs=nnx.Rngs(1))), nnx.Param)
    psh = shd.logical_shardings(abstract, mesh)
    abstract_opt = jax.eval_shape(tx.init, abstract)
    return abstract, psh, abstract_opt, shd.optimizer_shardings(abstract_opt, psh, mesh)


def _assert_trees_equal(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb) > 0
    for x, y in zip(la, lb, strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _assert_placed(tree, shardings):
    for x, s in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings), strict=True):
        assert x.sharding.is_equivalent_to(s, x.ndim), (x.sharding, s)


def test_round_trip_onto_a_different_mesh(tmp_path):
    src = shd.make_mesh({"data": 8})
    params, opt_state, tx = _trained_state(src)
    meta = {
        "stage": 1,
        "stage_step": 7,
        "config": {"lr": 0.01, "tasks": ["emo_c"]},
        "rng": ckpt.rng_to_json(jax.random.key(3)),
    }
    data_state = {"next_index": 123, "epoch": 2}
    with ckpt.Checkpointer(tmp_path / "ckpt") as c:
        assert c.save(10, params=params, opt_state=opt_state, meta=meta, data_state=data_state)
        c.wait()
    # A fresh process would build a new Checkpointer and restore onto its own, different mesh.
    dst = shd.make_mesh({"fsdp": 2, "tensor": 2}, devices=jax.devices()[:4])
    abstract, psh, abstract_opt, osh = _targets(dst, tx)
    with ckpt.Checkpointer(tmp_path / "ckpt") as c:
        assert c.latest_step() == 10
        p2, o2, meta2, data2 = c.restore(
            abstract_params=abstract, abstract_opt_state=abstract_opt, param_shardings=psh, opt_shardings=osh
        )
    assert isinstance(p2, nnx.State)
    _assert_trees_equal(p2, params)
    _assert_trees_equal(o2, opt_state)
    _assert_placed(p2, psh)
    _assert_placed(o2, osh)
    q = p2["model"]["layers"][0]["self_attn"]["q_proj"]["kernel"].get_value()
    assert q.sharding.mesh.shape == dst.shape and len(q.sharding.device_set) == 4
    assert meta2 == {"step": 10, **meta}
    assert data2 == data_state
    key = ckpt.rng_from_json(meta2["rng"])
    np.testing.assert_array_equal(jax.random.key_data(key), jax.random.key_data(jax.random.key(3)))
    # The restored state keeps training exactly like the original.
    g = jax.tree.map(lambda p: 0.3 * p, params)
    u1, _ = _update(g, opt_state, params)
    u2, _ = _update(jax.device_put(g, psh), o2, p2)
    for a, b in zip(jax.tree.leaves(u1), jax.tree.leaves(u2), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)


def test_keeps_last_k_and_respects_interval(tmp_path):
    mesh = shd.make_mesh({"data": 8})
    params, opt_state, _ = _trained_state(mesh, steps=0)
    with ckpt.Checkpointer(tmp_path, max_to_keep=2, save_interval_steps=2) as c:
        saved = [c.save(s, params=params, opt_state=opt_state, meta={}) for s in range(1, 8)]
        assert saved == [True, True, False, True, False, True, False]  # the first save always happens
        assert c.save(7, params=params, opt_state=opt_state, meta={}, force=True)
        assert c.all_steps() == [6, 7]
        assert not c.save(7, params=params, opt_state=opt_state, meta={}, force=True)  # already there
    assert sorted(p.name for p in tmp_path.iterdir()) == ["6", "7"]


def test_interrupted_save_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    mesh = shd.make_mesh({"data": 8})
    params, opt_state, tx = _trained_state(mesh, steps=1)
    c = ckpt.Checkpointer(tmp_path, max_to_keep=1)
    c.save(1, params=params, opt_state=opt_state, meta={"ok": True})

    def boom(*args, **kwargs):
        raise OSError("disk full (simulated)")

    # The params item is written, then the metadata write fails: the step must not become visible.
    monkeypatch.setattr(ocp.JsonCheckpointHandler, "async_save", boom)
    monkeypatch.setattr(ocp.JsonCheckpointHandler, "save", boom)
    with pytest.raises(OSError, match="disk full"):
        c.save(2, params=params, opt_state=opt_state, meta={"ok": False})
    monkeypatch.undo()
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "1"]
    assert leftovers and all("tmp" in n for n in leftovers), leftovers  # the save really started
    assert c.all_steps() == [1]
    c.close()

    c = ckpt.Checkpointer(tmp_path, max_to_keep=1)
    assert c.all_steps() == [1] and c.latest_step() == 1
    abstract, psh, abstract_opt, osh = _targets(mesh, tx)
    p, _, meta, data = c.restore(
        abstract_params=abstract, abstract_opt_state=abstract_opt, param_shardings=psh, opt_shardings=osh
    )
    _assert_trees_equal(p, params)
    assert meta["ok"] is True and data is None
    # The next good save replaces step 1 and the partial step's leftovers are cleaned up.
    assert c.save(3, params=params, opt_state=opt_state, meta={})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["3"]
    c.close()


def test_restore_errors(tmp_path):
    mesh = shd.make_mesh({"data": 8})
    params, opt_state, tx = _trained_state(mesh, steps=0)
    abstract, psh, abstract_opt, osh = _targets(mesh, tx)
    with ckpt.Checkpointer(tmp_path) as c:
        with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
            c.restore(
                abstract_params=abstract,
                abstract_opt_state=abstract_opt,
                param_shardings=psh,
                opt_shardings=osh,
            )
        with pytest.raises(TypeError, match="'rng' is not JSON"):
            c.save(1, params=params, opt_state=opt_state, meta={"rng": jax.random.key(0)})
        with pytest.raises(ValueError, match="no sharding"):
            c.save(1, params=params, opt_state=opt_state, meta={})
            c.restore(1, abstract_params=abstract, abstract_opt_state=abstract_opt)


def test_params_only_checkpoint(tmp_path):
    mesh = shd.make_mesh({"fsdp": 4, "tensor": 2})
    params, opt_state, tx = _trained_state(shd.make_mesh({"data": 8}), steps=1)
    ckpt.save_params(tmp_path / "converted", params)
    abstract, psh, _, _ = _targets(mesh, tx)
    restored = ckpt.restore_params(tmp_path / "converted", abstract, psh)
    _assert_trees_equal(restored, params)
    _assert_placed(restored, psh)
    # A pure-dict target works too, and so does a training checkpoint directory (latest step's params).
    pure = nnx.to_pure_dict(shd.with_shardings(abstract, psh))
    with ckpt.Checkpointer(tmp_path / "run") as c:
        c.save(3, params=params, opt_state=opt_state, meta={})
    _assert_trees_equal(ckpt.restore_params(tmp_path / "run", pure), params)
    # Concrete params as the target (their own placement), called on the class as the loaders do.
    concrete = jax.device_put(_init()[0], psh)
    again = ckpt.Checkpointer.restore_params(tmp_path / "run" / "3", concrete, None)
    _assert_trees_equal(again, params)
    _assert_placed(again, psh)
    # The conversion CLI's layout: <dir>/params next to hf_config.json / convert.json.
    ckpt.save_params(tmp_path / "cli" / "params", params)
    _assert_trees_equal(ckpt.restore_params(tmp_path / "cli", abstract, psh), params)
    # A model that does not match the file fails naming the keys.
    other = nnx.state(
        nnx.eval_shape(
            lambda: LlamaForCausalLM(
                LlamaConfig(**{**TINY.__dict__, "tie_word_embeddings": True}), rngs=nnx.Rngs(0)
            )
        ),
        nnx.Param,
    )
    other_sh = jax.tree.map(lambda _: NamedSharding(mesh, jax.sharding.PartitionSpec()), other)
    with pytest.raises(KeyError, match="not in target: \\['lm_head/kernel'\\]"):
        ckpt.restore_params(tmp_path / "converted", other, other_sh)
    with pytest.raises(FileNotFoundError, match="no such checkpoint"):
        ckpt.restore_params(tmp_path / "missing", abstract, psh)


def test_async_save(tmp_path):
    mesh = shd.make_mesh({"data": 8})
    params, opt_state, tx = _trained_state(mesh, steps=1)
    with ckpt.Checkpointer(tmp_path, async_save=True) as c:
        assert c.save(5, params=params, opt_state=opt_state, meta={"a": 1}, data_state={"i": 4})
        c.wait()
        abstract, psh, abstract_opt, osh = _targets(mesh, tx)
        p, o, meta, data = c.restore(
            5,
            abstract_params=abstract,
            abstract_opt_state=abstract_opt,
            param_shardings=psh,
            opt_shardings=osh,
        )
    _assert_trees_equal(p, params)
    assert meta == {"step": 5, "a": 1} and data == {"i": 4}

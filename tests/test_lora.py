"""LoRA on a tiny LLaMA: identity at init, merge equivalence, sharding names, the optimizer lora group."""

import json

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


# ------------------------------------------------------------------------------------ config.lora, export

CONFIG = "configs/emobench.py:tiny"


def _tiny_config(**lora_fields):
    from emollm_jax.configuration import load_config

    config = load_config(CONFIG, {f"lora.{k}": v for k, v in lora_fields.items()})
    config.model.text.update(num_layers=2)
    return config


def _emollm(config, seed=0):
    from emollm_jax import experiment

    cfg = experiment.model_config(config, vocab_size=64, image_token_id=4)
    return experiment.new_model(cfg, seed)


def test_config_lora_is_applied_when_the_model_is_built():
    from emollm_jax import experiment

    plain = _emollm(_tiny_config())
    model = _emollm(_tiny_config(rank=4, alpha=8.0, vision_targets=("q_proj",)))
    paths = {"/".join(map(str, p)) for p in lora.adapters(model)}
    decoder = {f"llm/model/layers/{i}/self_attn/{t}" for i in range(2) for t in ("q_proj", "v_proj")}
    tower = {f"vision/encoder/layers/{i}/self_attn/q_proj" for i in range(2)}
    assert paths == decoder | tower  # the decoder's own lora_targets, and the tower's named ones
    assert model.llm.model.layers[0].self_attn.q_proj.lora.a[...].shape == (128, 4)
    # the adapters draw from their own stream: the base weights equal the same seed's model without them
    base = nnx.state(model, nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam)))
    for (p, a), (q, b) in zip(nnx.to_flat_state(base), nnx.to_flat_state(nnx.state(plain, nnx.Param)),
                              strict=True):
        assert p == q
        np.testing.assert_array_equal(np.asarray(a.get_value()), np.asarray(b.get_value()))
    # the same model again (abstract shapes, evaluation, prediction build it the same way)
    again = _emollm(_tiny_config(rank=4, alpha=8.0, vision_targets=("q_proj",)))
    assert lora.adapters(again).keys() == lora.adapters(model).keys()
    assert experiment.model_config(_tiny_config(), vocab_size=64, image_token_id=4).lora is None


def test_lora_config_refuses_bad_values_naming_the_key():
    from emollm_jax.configuration import ConfigError
    from emollm_jax.run_config import parse_sections

    bad = (("dropout", 1.0, "in \\[0, 1\\)"), ("rank", -1, ">= 0"), ("alpha", 0.0, "positive"))
    for key, value, why in bad:
        with pytest.raises(ConfigError, match=f"config.lora.{key}={value!r}: must .*{why}"):
            parse_sections(_tiny_config(**{key: value}))


def test_dropout_only_in_training_steps_and_deterministic_per_key():
    model = _emollm(_tiny_config(rank=4, dropout=0.5))
    _randomize_b(model)
    ids = jnp.asarray(np.random.default_rng(0).integers(5, 64, (2, 9)), jnp.int32)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def logits(key=None, dropout=True):
        m = nnx.merge(graphdef, params, rest)
        if key is not None:
            assert lora.set_dropout_key(m, key) == 4
        if not dropout:
            for update in lora.adapters(m).values():
                update.dropout = 0.0
        return np.asarray(m.llm(ids))

    off = logits(dropout=False)
    np.testing.assert_array_equal(logits(), off)  # no key (eval, predict, generate): no dropout
    one = logits(jax.random.key(1))
    assert np.abs(one - off).max() > 1e-4
    np.testing.assert_array_equal(logits(jax.random.key(1)), one)  # same key: same masks
    assert np.abs(logits(jax.random.key(2)) - one).max() > 1e-4
    a, b = (lora.batch_key(0, ids), lora.batch_key(0, ids + 1))
    assert not np.array_equal(jax.random.key_data(a), jax.random.key_data(b))
    np.testing.assert_array_equal(jax.random.key_data(a), jax.random.key_data(lora.batch_key(0, ids)))


def test_a_stage_trains_lora_with_the_projector():
    """`--config.lora.rank=4 "--config.stages.emotional.trainable=('lora','projector')"`: the optimizer has
    state for the adapters and the projector only; the vision tower is frozen unless its adapters train."""
    from emollm_jax import experiment, train

    mesh = shd.make_mesh({"data": 1}, devices=jax.devices()[:1])
    for vision_targets, frozen in (((), True), (("q_proj",), False)):
        config = _tiny_config(rank=4, vision_targets=vision_targets)
        config.stages.emotional.trainable = ("lora", "projector")
        base = experiment.model_config(config, vocab_size=64, image_token_id=4)
        st = train.build_stage(config, 1, base, mesh, total_steps=10)
        assert st.model_cfg.freeze_vision is frozen
        moments = [x for x in jax.tree.leaves(st.abstract_opt) if x.ndim > 0]  # Adam's mu and nu
        groups = [optim.param_group(p) for p, _ in nnx.to_flat_state(st.abstract_params)]
        assert {"vision", "llm", "lora", "projector"} <= set(groups)
        assert len(moments) == 2 * sum(g in ("lora", "projector") for g in groups)


def test_save_hf_merges_adapters(tmp_path):
    from safetensors import safe_open

    from emollm_jax.convert import load_hf, save_hf

    model, _, _, _ = _with_lora()
    _randomize_b(model)
    want = np.asarray(model(IDS))
    save_hf(model, tmp_path / "hf")
    with safe_open(str(tmp_path / "hf" / "model.safetensors"), "numpy") as f:
        assert not [k for k in f.keys() if "lora" in k]
    np.testing.assert_allclose(np.asarray(load_hf(tmp_path / "hf")(IDS)), want, rtol=1e-5, atol=1e-5)
    assert lora.has_adapters(model)  # merged on the way out, not in place


def test_peft_loads_the_adapter_export_on_the_hf_decoder(tmp_path):
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    import transformers

    from emollm_jax.convert import save_hf
    from emollm_jax.convert.export import save_peft

    model, _, _, before = _with_lora()
    save_hf(model, tmp_path / "base")  # B = 0: the base model
    _randomize_b(model)
    save_peft(model, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["peft_type"]) == (4, 8.0, "LORA")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    with torch.no_grad():
        np.testing.assert_allclose(hf(torch.tensor(np.asarray(IDS))).logits.numpy(), np.asarray(before),
                                   rtol=1e-4, atol=1e-4)
        peft_model = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter")
        got = peft_model(torch.tensor(np.asarray(IDS))).logits.numpy()
    np.testing.assert_allclose(got, np.asarray(model(IDS)), rtol=1e-4, atol=1e-4)
    assert np.abs(got - np.asarray(before)).max() > 1e-3  # the adapters are in there

"""LLaMA-family decoder vs Hugging Face PyTorch on tiny random models (fp32), plus KV-cache consistency."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from emollm_jax.convert import load_hf
from emollm_jax.models.llama import LlamaConfig, LlamaForCausalLM, init_cache

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=128)
CASES = {
    "llama_mha": ("llama", dict(num_key_value_heads=4)),
    "llama_gqa": ("llama", dict(num_key_value_heads=2)),
    "llama3_rope": ("llama", dict(num_key_value_heads=2, rope_scaling=dict(
        rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=16))),
    "linear_rope": ("llama", dict(num_key_value_heads=2, rope_scaling=dict(rope_type="linear", factor=2.0))),
    "mistral_window": ("mistral", dict(num_key_value_heads=2, sliding_window=4, head_dim=8)),
    "qwen2_bias_tied": ("qwen2", dict(num_key_value_heads=2, tie_word_embeddings=True)),
}
_HF = {"llama": ("LlamaConfig", "LlamaForCausalLM"), "mistral": ("MistralConfig", "MistralForCausalLM"),
       "qwen2": ("Qwen2Config", "Qwen2ForCausalLM")}


@nnx.jit
def forward(model, ids, mask=None):
    return model(ids, attention_mask=mask)


def make_hf(family: str, path, **overrides):
    """A tiny random HF causal LM saved to `path`; returns the torch model."""
    cfg_cls, model_cls = (getattr(transformers, n) for n in _HF[family])
    torch.manual_seed(0)
    model = model_cls(cfg_cls(**{**TINY, **overrides})).eval()
    with torch.no_grad():  # non-trivial norms and biases so that mapping mistakes show up
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(path)
    return model


def torch_logits(model, ids, mask=None):
    with torch.no_grad():
        kw = {} if mask is None else {"attention_mask": torch.tensor(mask)}
        return model(torch.tensor(ids), **kw).logits.numpy()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    out = {}
    for name, (family, kw) in CASES.items():
        path = tmp_path_factory.mktemp(name)
        out[name] = (make_hf(family, path, **kw), load_hf(path))
    return out


@pytest.mark.parametrize("name", list(CASES))
def test_logits_match_hf(models, name):
    hf, ours = models[name]
    ids = np.random.RandomState(1).randint(0, 128, (2, 24))
    out = np.asarray(forward(ours, jnp.asarray(ids)))
    np.testing.assert_allclose(out, torch_logits(hf, ids), atol=1e-4, rtol=0)


def test_qwen2_has_biases_and_tied_head(models):
    _, ours = models["qwen2_bias_tied"]
    assert not hasattr(ours, "lm_head")
    assert ours.model.layers[0].self_attn.q_proj.bias is not None
    assert ours.model.layers[0].self_attn.o_proj.bias is None


@pytest.mark.parametrize("name", ["llama_gqa", "qwen2_bias_tied"])
def test_left_padded_batch_matches_hf_and_unpadded(models, name):
    hf, ours = models[name]
    rs = np.random.RandomState(2)
    ids = rs.randint(0, 128, (3, 12))
    mask = np.ones((3, 12), np.int64)
    mask[1, :4] = 0
    mask[2, :9] = 0
    out = np.asarray(forward(ours, jnp.asarray(ids), jnp.asarray(mask)))
    ref = torch_logits(hf, ids, mask)
    real = mask.astype(bool)
    np.testing.assert_allclose(out[real], ref[real], atol=1e-4, rtol=0)
    alone = np.asarray(forward(ours, jnp.asarray(ids[1:2, 4:])))  # no padding: same positions, same logits
    np.testing.assert_allclose(out[1, 4:], alone[0], atol=1e-5, rtol=0)


def test_right_padding_does_not_change_real_positions(models):
    _, ours = models["llama_gqa"]
    ids = np.random.RandomState(3).randint(0, 128, (1, 10))
    mask = np.ones((1, 10), np.int64)
    mask[0, 7:] = 0
    out = np.asarray(forward(ours, jnp.asarray(ids), jnp.asarray(mask)))
    alone = np.asarray(forward(ours, jnp.asarray(ids[:, :7])))
    np.testing.assert_allclose(out[0, :7], alone[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["llama_gqa", "mistral_window", "qwen2_bias_tied"])
def test_kv_cache_prefill_then_decode_equals_full_forward(models, name):
    _, ours = models[name]
    rs = np.random.RandomState(4)
    ids = rs.randint(0, 128, (2, 14))
    mask = np.ones((2, 14), np.int32)
    mask[0, :3] = 0  # left padding in the prompt
    full = np.asarray(forward(ours, jnp.asarray(ids), jnp.asarray(mask)))

    step = nnx.jit(lambda m, x, mk, c: m(x, attention_mask=mk, cache=c))
    cache = init_cache(ours.config, batch=2, max_len=20)
    out, cache = step(ours, jnp.asarray(ids[:, :8]), jnp.asarray(mask[:, :8]), cache)  # prefill
    chunks = [np.asarray(out)]
    for t in (8, 9, 10, 11):  # one-token decodes, then a two-token chunk
        width = 2 if t == 11 else 1
        out, cache = step(ours, jnp.asarray(ids[:, t:t + width]), jnp.asarray(mask[:, t:t + width]), cache)
        chunks.append(np.asarray(out))
    got = np.concatenate(chunks, axis=1)
    real = mask[:, :got.shape[1]].astype(bool)
    assert int(cache.index) == 13
    np.testing.assert_allclose(got[real], full[:, :13][real], atol=1e-5, rtol=0)


def test_return_hidden_and_logits_compose(models):
    _, ours = models["llama_gqa"]
    ids = jnp.asarray(np.random.RandomState(5).randint(0, 128, (2, 6)))
    hidden = ours(ids, return_hidden=True)
    assert hidden.shape == (2, 6, 64)
    np.testing.assert_allclose(np.asarray(ours.logits(hidden)), np.asarray(ours(ids)), atol=1e-6, rtol=0)
    embeds = ours.embed(ids)
    np.testing.assert_allclose(np.asarray(ours(inputs_embeds=embeds)), np.asarray(ours(ids)), atol=1e-6)


def test_config_round_trip_and_legacy_rope_keys():
    cfg = LlamaConfig(vocab_size=10, hidden_size=8, intermediate_size=16, num_layers=1, num_heads=2,
                      num_kv_heads=1, rope_scaling=(("factor", 2.0), ("rope_type", "linear")), rope_theta=5e5)
    assert LlamaConfig.from_hf(cfg.to_hf()) == dataclasses.replace(cfg, head_dim=4)
    legacy = dict(cfg.to_hf(), rope_theta=5e5, rope_scaling={"type": "linear", "factor": 2.0})
    del legacy["rope_parameters"]
    assert LlamaConfig.from_hf(legacy).rope_scaling == cfg.rope_scaling
    assert LlamaConfig.from_hf(legacy).rope_theta == 5e5
    hf_cfg = transformers.AutoConfig.for_model(**cfg.to_hf())
    assert LlamaConfig.from_hf(hf_cfg.to_dict()) == dataclasses.replace(cfg, head_dim=4)


def test_mistral_window_that_never_binds_is_dropped_and_unsupported_rope_refused():
    base = dict(model_type="mistral", vocab_size=10, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                num_attention_heads=2, max_position_embeddings=64)
    assert LlamaConfig.from_hf(dict(base, sliding_window=64)).sliding_window is None
    assert LlamaConfig.from_hf(dict(base, sliding_window=16)).sliding_window == 16
    with pytest.raises(ValueError, match="rope_type='yarn'"):
        LlamaConfig.from_hf(dict(base, rope_scaling={"rope_type": "yarn", "factor": 2.0}))


def test_params_carry_logical_axes_and_dtypes():
    cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=24, num_layers=1, num_heads=2,
                      num_kv_heads=1, attention_bias=True, dtype="bfloat16", param_dtype="bfloat16")
    model = LlamaForCausalLM(cfg, rngs=nnx.Rngs(0))
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        names = var.get_metadata().get("out_sharding")
        assert names is not None and len(names) == var.get_value().ndim, path
        assert var.get_value().dtype == jnp.bfloat16, path
    assert model.lm_head.kernel.get_metadata()["out_sharding"] == ("embed", "vocab")
    k_proj = model.model.layers[0].self_attn.k_proj
    assert k_proj.kernel.get_metadata()["out_sharding"] == ("embed", "kv_heads")
    assert forward(model, jnp.zeros((1, 3), jnp.int32)).dtype == jnp.float32


def test_remat_gives_same_loss_and_grads():
    cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=24, num_layers=2, num_heads=2,
                      num_kv_heads=1)
    ids = jnp.asarray(np.random.RandomState(6).randint(0, 32, (2, 5)))

    def loss(m):
        return jnp.mean(jax.nn.log_softmax(m(ids))[..., 0])

    plain = LlamaForCausalLM(cfg, rngs=nnx.Rngs(0))
    remat = LlamaForCausalLM(dataclasses.replace(cfg, remat=True), rngs=nnx.Rngs(0))
    grad_fn = nnx.jit(nnx.value_and_grad(loss))
    (l1, g1), (l2, g2) = grad_fn(plain), grad_fn(remat)
    np.testing.assert_allclose(l1, l2, atol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), nnx.to_pure_dict(g1),
                 nnx.to_pure_dict(g2))

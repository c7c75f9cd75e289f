"""Scanned layer stacks (`scan_layers`): equal to the loop (forward and gradients, fp32, 1e-5) for the decoder
and the CLIP tower under every remat policy; KV-cache decoding; HF checkpoints load into and save from the
scanned form; params checkpoints and LoRA cross between the layouts; the train step takes the config key."""

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from safetensors.numpy import load_file

from emollm_jax import checkpoint, experiment, lora, sharding, train
from emollm_jax.configuration import load_config
from emollm_jax.convert import load_hf, open_checkpoint, save_hf
from emollm_jax.convert.core import abstract_model, fill_model
from emollm_jax.convert.hf import families
from emollm_jax.convert.keymap import KeyMap
from emollm_jax.generate import generate
from emollm_jax.models import stack
from emollm_jax.models.clip import CLIPConfig, CLIPVisionTransformer
from emollm_jax.models.llama import LlamaConfig, LlamaForCausalLM

TINY = f"{Path(__file__).resolve().parents[1] / 'configs' / 'emobench.py'}:tiny"
LLM = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=3, num_heads=4,
                  num_kv_heads=2, attention_bias=True, sliding_window=6)
VIT = CLIPConfig(image_size=32, patch_size=8, hidden_size=16, intermediate_size=32, num_layers=3, num_heads=2)
IDS = jnp.asarray(np.random.RandomState(0).randint(0, 64, (2, 11)))
MASK = jnp.asarray(np.arange(11)[None] >= np.array([[3], [0]]), jnp.int32)  # row 0 left padded by 3


def _pure(tree):
    return nnx.to_pure_dict(tree) if isinstance(tree, nnx.State) else tree


def _close(a, b, atol=1e-5):
    """Two parameter-shaped trees, possibly in different layouts, agree within atol."""
    a = stack.relayout(_pure(a), _pure(b))
    jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=0),
                 a, _pure(b))


def test_scanned_params_are_the_stacked_unrolled_ones():
    loop = LlamaForCausalLM(LLM, rngs=nnx.Rngs(0))
    scanned = LlamaForCausalLM(dataclasses.replace(LLM, scan_layers=True), rngs=nnx.Rngs(0))
    kernel = scanned.model.layers.self_attn.q_proj.kernel
    assert kernel[...].shape == (3, 32, 32)
    assert kernel.get_metadata()["out_sharding"] == ("layers", "embed", "heads")
    stacked = stack.relayout(nnx.state(loop, nnx.Param), nnx.state(scanned, nnx.Param))
    jax.tree.map(np.testing.assert_array_equal, stacked, nnx.to_pure_dict(nnx.state(scanned, nnx.Param)))
    # and back: the unrolled layout again, exactly
    back = stack.relayout(nnx.state(scanned, nnx.Param), nnx.state(loop, nnx.Param))
    jax.tree.map(np.testing.assert_array_equal, back, nnx.to_pure_dict(nnx.state(loop, nnx.Param)))
    with pytest.raises(KeyError, match="keys differ"):
        stack.relayout({"layers": {"x": 1}}, {"layers": {"y": 1}})


@pytest.mark.parametrize("remat, policy", [(False, "full"), (True, "full"), (True, "dots"),
                                           (True, "dots_no_batch")])
def test_decoder_scan_equals_loop(remat, policy):
    def loss(m):
        logits = m(IDS, attention_mask=MASK)
        return jnp.sum(jax.nn.log_softmax(logits)[..., :4] * MASK[..., None])

    out = []
    for scan in (False, True):
        cfg = dataclasses.replace(LLM, scan_layers=scan, remat=remat, remat_policy=policy)
        model = LlamaForCausalLM(cfg, rngs=nnx.Rngs(0))
        out.append(nnx.jit(nnx.value_and_grad(loss))(model))
    np.testing.assert_allclose(out[1][0], out[0][0], rtol=1e-6)
    _close(out[1][1], out[0][1])


@pytest.mark.parametrize("remat", [False, True])
def test_tower_scan_equals_loop(remat):
    x = jnp.asarray(np.random.RandomState(1).randn(2, 32, 32, 3).astype(np.float32))

    def loss(m):
        out = m(x)
        return jnp.sum(jnp.sin(out.hidden_states[-2])) + jnp.sum(out.pooled ** 2)

    results = []
    for scan in (False, True):
        cfg = dataclasses.replace(VIT, scan_layers=scan, remat=remat)
        tower = CLIPVisionTransformer(cfg, rngs=nnx.Rngs(0))
        hidden = nnx.jit(lambda m: m(x).hidden_states)(tower)
        results.append((hidden, *nnx.jit(nnx.value_and_grad(loss))(tower)))
    (h0, l0, g0), (h1, l1, g1) = results
    assert len(h1) == len(h0) == VIT.num_layers + 1
    for a, b in zip(h0, h1, strict=True):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-5, rtol=0)
    np.testing.assert_allclose(l1, l0, rtol=1e-6)
    _close(g1, g0)


def test_generate_with_scanned_decoder_gives_the_loop_tokens():
    loop = LlamaForCausalLM(LLM, rngs=nnx.Rngs(0))
    scanned = LlamaForCausalLM(dataclasses.replace(LLM, scan_layers=True), rngs=nnx.Rngs(0))
    kw = dict(max_new_tokens=6, eos_id=63, pad_id=0)
    a, b = generate(loop, IDS, MASK, **kw), generate(scanned, IDS, MASK, **kw)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert len(set(np.asarray(a).ravel().tolist())) > 2  # real tokens, not all padding


# --------------------------------------------------------------------------------- HF checkpoints

HF_LLM = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    torch.manual_seed(0)
    out = {}
    for name, model in (
        ("qwen2", transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**HF_LLM))),
        ("mistral", transformers.MistralForCausalLM(transformers.MistralConfig(**HF_LLM, sliding_window=5))),
        ("clip", transformers.CLIPVisionModel(transformers.CLIPVisionConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=32,
            patch_size=8))),
    ):
        path = tmp_path_factory.mktemp(name)
        model.eval().save_pretrained(path)
        out[name] = (path, model)
    return out


@pytest.mark.parametrize("name", ["qwen2", "mistral"])
def test_hf_decoder_loads_scanned_matches_hf_and_saves_the_same_keys(hf_dirs, tmp_path, name):
    path, hf = hf_dirs[name]
    ours = load_hf(path, scan_layers=True)
    assert stack.is_scanned(ours.model.layers)
    ids = np.random.RandomState(2).randint(0, 128, (2, 12))
    with torch.no_grad():
        ref = hf(torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(np.asarray(nnx.jit(lambda m, x: m(x))(ours, jnp.asarray(ids))), ref, atol=1e-4)
    save_hf(ours, tmp_path / "back")
    original = load_file(path / "model.safetensors")
    written = load_file(tmp_path / "back" / "model.safetensors")
    assert set(written) == set(original)
    for key, value in original.items():
        np.testing.assert_array_equal(written[key], value, err_msg=key)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back").eval()
    with torch.no_grad():
        np.testing.assert_allclose(back(torch.tensor(ids)).logits.numpy(), ref, atol=1e-5, rtol=0)


def test_hf_tower_loads_scanned_and_matches_hf(hf_dirs):
    path, hf = hf_dirs["clip"]
    ours = load_hf(path, scan_layers=True)
    pixels = np.random.RandomState(3).randn(2, 3, 32, 32).astype(np.float32)
    with torch.no_grad():
        ref = hf(torch.tensor(pixels), output_hidden_states=True)
    out = nnx.jit(lambda m, x: m(x))(ours, jnp.asarray(pixels.transpose(0, 2, 3, 1)))
    for a, b in zip(out.hidden_states, ref.hidden_states, strict=True):
        np.testing.assert_allclose(np.asarray(a), b.numpy(), atol=1e-4, rtol=0)


def test_scanned_fill_streams_row_by_row(hf_dirs):
    """Each layer's tensor is placed as it is read (never the whole stack on the host), and a missing layer
    is named."""
    path, _ = hf_dirs["qwen2"]
    source = open_checkpoint(path)
    events = []
    original = source.iter_tensors

    def recording():
        for key, arr in original():
            events.append("read")
            yield key, arr

    source.iter_tensors = recording

    def put(p, arr):
        events.append("put")
        return jnp.asarray(arr)

    fam = next(f for f in families() if f.name == "qwen2")
    config = fam.config_from_hf(json.loads((path / "config.json").read_text()), scan_layers=True)
    key_map = KeyMap.table(config.hf_key_table())
    fill_model(abstract_model(fam, config), source, key_map, shardings=put)
    assert events == ["read", "put"] * len(source.keys())

    class Without:  # the same checkpoint minus layer 1's up_proj
        def iter_tensors(self):
            return ((k, v) for k, v in original() if k != "model.layers.1.mlp.up_proj.weight")

    with pytest.raises(Exception, match=r"model\.layers\.mlp\.up_proj\.kernel misses layers \[1\] of 3"):
        fill_model(abstract_model(fam, config), Without(), key_map)


def test_scanned_fill_onto_a_mesh(hf_dirs):
    path, _ = hf_dirs["qwen2"]
    mesh = sharding.make_mesh({"fsdp": 4, "tensor": 2})
    fam = next(f for f in families() if f.name == "qwen2")
    config = fam.config_from_hf(json.loads((path / "config.json").read_text()), scan_layers=True)
    abstract = abstract_model(fam, config)
    shardings = sharding.logical_shardings(nnx.state(abstract), mesh)
    ours = load_hf(path, scan_layers=True, shardings=shardings)
    kernel = ours.model.layers.mlp.up_proj.kernel[...]
    want = sharding.logical_to_spec(("layers", "embed", "mlp"), kernel.shape, mesh, sharding.DEFAULT_RULES)
    assert kernel.sharding.is_equivalent_to(jax.sharding.NamedSharding(mesh, want), 3)
    plain = load_hf(path)
    row = plain.model.layers[2].mlp.up_proj.kernel[...]
    np.testing.assert_array_equal(np.asarray(kernel[2]), np.asarray(row))


# ------------------------------------------------------------------------------ params checkpoints, LoRA


@pytest.mark.parametrize("saved_scanned", [False, True])
def test_params_checkpoint_crosses_layouts(tmp_path, saved_scanned):
    saved = LlamaForCausalLM(dataclasses.replace(LLM, scan_layers=saved_scanned), rngs=nnx.Rngs(3))
    checkpoint.save_params(tmp_path / "params", nnx.state(saved, nnx.Param))
    other = LlamaForCausalLM(dataclasses.replace(LLM, scan_layers=not saved_scanned), rngs=nnx.Rngs(0))
    restored = checkpoint.restore_params(tmp_path / "params", nnx.state(other, nnx.Param))
    nnx.update(other, restored)
    np.testing.assert_allclose(np.asarray(other(IDS)), np.asarray(saved(IDS)), atol=1e-5, rtol=0)
    mismatched = LlamaForCausalLM(dataclasses.replace(LLM, num_layers=2), rngs=nnx.Rngs(0))
    error = (ValueError, r"model/layers/\S+ has shape \(3, 32.*in the checkpoint, the target \(2, 32") \
        if saved_scanned else (KeyError, "checkpoint and target differ")
    with pytest.raises(error[0], match=error[1]):
        checkpoint.restore_params(tmp_path / "params", nnx.state(mismatched, nnx.Param))


def test_lora_on_a_scanned_decoder_equals_the_loop_and_merges():
    loop = LlamaForCausalLM(LLM, rngs=nnx.Rngs(0))
    scanned = LlamaForCausalLM(dataclasses.replace(LLM, scan_layers=True), rngs=nnx.Rngs(0))
    wrapped = lora.apply_lora(scanned, 4, 8.0, ("q_proj", "down_proj"), nnx.Rngs(1))
    assert set(wrapped) == {"model/layers/self_attn/q_proj", "model/layers/mlp/down_proj"}
    adapter = scanned.model.layers.self_attn.q_proj.lora
    assert adapter.a[...].shape == (3, 32, 4) and adapter.b[...].shape == (3, 4, 32)
    assert adapter.a.get_metadata()["out_sharding"] == ("layers", "embed", "lora_rank")
    lora.apply_lora(loop, 4, 8.0, ("q_proj", "down_proj"), nnx.Rngs(1))
    key = jax.random.key(7)
    for _, node in nnx.iter_graph(scanned):  # trained adapters: random, then copied into the loop model
        if isinstance(node, lora.LoRA):
            key, k1, k2 = jax.random.split(key, 3)
            node.a[...] = jax.random.normal(k1, node.a[...].shape)
            node.b[...] = 0.2 * jax.random.normal(k2, node.b[...].shape)
    nnx.update(loop, stack.relayout_state(nnx.state(scanned, nnx.LoRAParam), nnx.state(loop, nnx.LoRAParam)))
    out = np.asarray(scanned(IDS, attention_mask=MASK))
    np.testing.assert_allclose(out, np.asarray(loop(IDS, attention_mask=MASK)), atol=1e-5, rtol=0)
    assert lora.merge_lora(scanned) == 2
    np.testing.assert_allclose(np.asarray(scanned(IDS, attention_mask=MASK)), out, atol=1e-5, rtol=0)
    assert type(scanned.model.layers.self_attn.q_proj) is nnx.Linear


# ------------------------------------------------------------------------------------ through the config


def _stage(config, mesh):
    base = experiment.model_config(config, vocab_size=64, image_token_id=4)
    return base, train.build_stage(config, 1, base, mesh, total_steps=10)


@pytest.mark.slow  # full train-step compiles
def test_train_step_scanned_equals_loop_and_loads_unrolled_params(tmp_path):
    """`model.text.scan_layers` / `model.vision.scan_layers` through the real step: the same losses; and
    `config.init.params` saved by the loop model loads into the scanned one."""
    from test_train import _batch

    mesh = sharding.make_mesh({"data": 1}, devices=jax.devices()[:1])
    losses = {}
    for scan in (False, True):
        config = load_config(TINY, [f"model.text.scan_layers={scan}", f"model.vision.scan_layers={scan}",
                                    "model.text.remat=True"])
        config.seed = 0 if scan else 5  # the scanned run only matches if it loaded the loop's weights
        base, st = _stage(config, mesh)
        assert base.text.scan_layers is scan and base.vision.scan_layers is scan
        if scan:  # start from the loop model's params, saved unrolled
            config.init.params = str(tmp_path / "loop_params")
        params = train.init_params(config, st.model_cfg, st.param_shardings)
        if not scan:
            checkpoint.save_params(tmp_path / "loop_params", params)
        opt = jax.jit(st.tx.init, out_shardings=st.opt_shardings)(params)
        out = []
        for i in range(2):
            params, opt, m = st.step_fn(params, opt, sharding.global_batch(_batch(base, seed=i), mesh))
            out.append(float(m["loss"]))
        losses[scan] = out
    np.testing.assert_allclose(losses[True], losses[False], rtol=1e-5)


def test_llava_scanned_matches_hf_logits_and_greedy_generation(tmp_path):
    """Both towers scanned (`load_hf(..., scan_layers=True)`): HF parity of the logits with an image, and
    greedy decoding through the scanned decoder's KV cache gives HF `generate`'s tokens."""
    from test_llava import IMG, TEXT, VISION, _hf_logits, _inputs, _no_eos, _perturb

    torch.manual_seed(0)
    hf = transformers.LlavaForConditionalGeneration(transformers.LlavaConfig(
        vision_config=transformers.CLIPVisionConfig(**VISION), text_config=transformers.LlamaConfig(**TEXT),
        image_token_index=IMG)).eval()
    _perturb(hf)
    hf, path = _no_eos(hf), tmp_path
    hf.save_pretrained(path)
    ours = load_hf(path, scan_layers=True)
    assert stack.is_scanned(ours.llm.model.layers) and stack.is_scanned(ours.vision.encoder.layers)
    ids, nchw, nhwc = _inputs()
    got = nnx.jit(lambda m, i, p: m(i, pixel_values=p))(ours, jnp.asarray(ids, jnp.int32), nhwc)
    np.testing.assert_allclose(np.asarray(got), _hf_logits(hf, ids, nchw), atol=1e-4, rtol=0)
    ids, nchw, nhwc = _inputs(seed=1, t=20, starts=(1, 3))
    mask = np.ones_like(ids)
    with torch.no_grad():
        want = hf.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                           pixel_values=torch.tensor(nchw), max_new_tokens=12, do_sample=False)
    tokens = generate(ours, ids, mask, pixel_values=nhwc, max_new_tokens=12, eos_id=-1, pad_id=0)
    np.testing.assert_array_equal(np.asarray(tokens), want[:, ids.shape[1]:].numpy())

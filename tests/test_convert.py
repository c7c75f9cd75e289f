"""HF <-> emollm_jax conversion: round trips via transformers, older layouts, strictness, streaming, CLI."""

import inspect
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from safetensors.numpy import load_file, save_file

from emollm_jax.convert import CheckpointError, load_hf, open_checkpoint, save_hf
from emollm_jax.convert.__main__ import main as cli
from emollm_jax.convert.core import abstract_model, fill_model
from emollm_jax.convert.hf import families
from emollm_jax.convert.keymap import KeyMap
from emollm_jax.convert.orbax_params import load_params

LLM = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
           num_key_value_heads=2)
VIT = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, image_size=32,
           patch_size=8)


@nnx.jit
def lm_forward(model, ids):
    return model(ids)


def logits(torch_model, ids):
    with torch.no_grad():
        return torch_model(torch.tensor(ids)).logits.numpy()


def clip_out(torch_model, pixels):
    with torch.no_grad():
        return torch_model(torch.tensor(pixels)).pooler_output.numpy()


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLM)).eval()
    path = tmp_path_factory.mktemp("llama")
    model.save_pretrained(path)
    return path, model


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    torch.manual_seed(0)
    model = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**VIT)).eval()
    path = tmp_path_factory.mktemp("clip")
    model.save_pretrained(path)
    return path, model


IDS = np.random.RandomState(0).randint(0, 128, (2, 9))
PIXELS = np.random.RandomState(0).randn(2, 3, 32, 32).astype(np.float32)


@pytest.mark.parametrize("family", ["llama", "qwen2_tied"])
def test_lm_round_trip_through_transformers(tmp_path, family):
    torch.manual_seed(1)
    if family == "llama":
        hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLM)).eval()
    else:
        hf = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**LLM, tie_word_embeddings=True)).eval()
    hf.save_pretrained(tmp_path / "hf")
    ours = load_hf(tmp_path / "hf")
    np.testing.assert_allclose(np.asarray(lm_forward(ours, jnp.asarray(IDS))), logits(hf, IDS), atol=1e-4)
    save_hf(ours, tmp_path / "back", extra_config={"eos_token_id": 2})
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back").eval()
    assert type(back) is type(hf)
    np.testing.assert_allclose(logits(back, IDS), logits(hf, IDS), atol=1e-5, rtol=0)
    assert json.loads((tmp_path / "back" / "generation_config.json").read_text())["eos_token_id"] == 2


def test_clip_round_trip_through_transformers(tmp_path, clip_dir):
    path, hf = clip_dir
    save_hf(load_hf(path), tmp_path / "back")
    back = transformers.CLIPVisionModel.from_pretrained(tmp_path / "back").eval()
    np.testing.assert_allclose(clip_out(back, PIXELS), clip_out(hf, PIXELS), atol=1e-5, rtol=0)


def test_vision_half_of_clip_model(tmp_path):
    torch.manual_seed(2)
    full = transformers.CLIPModel(transformers.CLIPConfig(
        vision_config=VIT, text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                            num_attention_heads=2, vocab_size=50), projection_dim=16)).eval()
    full.save_pretrained(tmp_path)
    keys = open_checkpoint(tmp_path).keys()
    assert any(k.startswith("text_model.") for k in keys)  # the text half is there, and skipped on purpose
    ours = load_hf(tmp_path)
    with torch.no_grad():
        ref = full.vision_model(torch.tensor(PIXELS)).pooler_output.numpy()
    np.testing.assert_allclose(np.asarray(ours(jnp.asarray(PIXELS.transpose(0, 2, 3, 1))).pooled), ref,
                               atol=1e-4)


def _relayout(src, dst, rename, extra=None):
    """Copies an HF dir with its tensors renamed (simulating older published layouts)."""
    dst.mkdir()
    shutil.copy(src / "config.json", dst / "config.json")
    tensors = {rename(k): v for k, v in load_file(src / "model.safetensors").items()}
    tensors.update(extra or {})
    save_file(tensors, dst / "model.safetensors")
    return dst


@pytest.mark.parametrize("prefix", ["vision_model.", "vision_tower.vision_model."])
def test_older_clip_prefixes_load_identically(tmp_path, clip_dir, prefix):
    path, _ = clip_dir
    extra = {prefix + "embeddings.position_ids": np.arange(17, dtype=np.int64)[None]}
    old = _relayout(path, tmp_path / "old", lambda k: prefix + k, extra)
    a, b = load_hf(path), load_hf(old)
    pure = lambda m: nnx.to_pure_dict(nnx.state(m))
    jax.tree.map(np.testing.assert_array_equal, pure(a), pure(b))


def test_old_llama_rotary_buffers_are_ignored(tmp_path, llama_dir):
    path, hf = llama_dir
    extra = {f"model.layers.{i}.self_attn.rotary_emb.inv_freq": np.ones(8, np.float32) for i in range(2)}
    ours = load_hf(_relayout(path, tmp_path / "old", lambda k: k, extra))
    np.testing.assert_allclose(np.asarray(lm_forward(ours, jnp.asarray(IDS))), logits(hf, IDS), atol=1e-4)


def test_sharded_index_loads(tmp_path, llama_dir):
    _, hf = llama_dir
    hf.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert len(open_checkpoint(tmp_path).files()) > 1
    ours = load_hf(tmp_path)
    np.testing.assert_allclose(np.asarray(lm_forward(ours, jnp.asarray(IDS))), logits(hf, IDS), atol=1e-4)


def test_missing_key_is_named(tmp_path, llama_dir):
    path, _ = llama_dir
    bad = _relayout(path, tmp_path / "bad", lambda k: k)
    tensors = load_file(bad / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, bad / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.mlp\.up_proj\.kernel"):
        load_hf(bad)


def test_extra_key_is_named(tmp_path, llama_dir):
    path, _ = llama_dir
    bad = _relayout(path, tmp_path / "bad", lambda k: k, {"model.layers.0.mlp.extra.weight": np.ones(3)})
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\.mlp\.extra\.weight"):
        load_hf(bad)


def test_wrong_shape_names_key_and_both_shapes(tmp_path, llama_dir):
    path, _ = llama_dir
    bad = _relayout(path, tmp_path / "bad", lambda k: k)
    tensors = load_file(bad / "model.safetensors")
    tensors["model.norm.weight"] = np.ones(65, np.float32)
    save_file(tensors, bad / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"model\.norm\.weight.*expected \(64,\).*found \(65,\)"):
        load_hf(bad)


def test_truncated_file_is_named(tmp_path, llama_dir):
    path, _ = llama_dir
    bad = _relayout(path, tmp_path / "bad", lambda k: k)
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_hf(bad)


def test_bin_needs_explicit_flag(tmp_path, llama_dir):
    path, hf = llama_dir
    (tmp_path / "bin").mkdir()
    shutil.copy(path / "config.json", tmp_path / "bin" / "config.json")
    torch.save(hf.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin.*allow_pickle=True"):
        load_hf(tmp_path / "bin")
    ours = load_hf(tmp_path / "bin", allow_pickle=True)
    np.testing.assert_allclose(np.asarray(lm_forward(ours, jnp.asarray(IDS))), logits(hf, IDS), atol=1e-4)


def test_tensors_stream_one_at_a_time(llama_dir):
    path, _ = llama_dir
    source = open_checkpoint(path)
    assert inspect.isgenerator(source.iter_tensors())
    events = []
    original = source.iter_tensors

    def recording():
        for key, arr in original():
            events.append("read")
            yield key, arr

    source.iter_tensors = recording

    def put(path, arr):
        events.append("put")
        return jnp.asarray(arr)

    fam = next(f for f in families() if f.name == "llama")
    config = fam.config_from_hf(json.loads((path / "config.json").read_text()))
    fill_model(abstract_model(fam, config), source, KeyMap.table(config.hf_key_table()), shardings=put)
    assert events == ["read", "put"] * len(source.keys())  # each tensor is placed before the next is read


def test_load_onto_a_mesh_and_in_bfloat16(llama_dir):
    path, _ = llama_dir
    mesh = jax.make_mesh((8,), ("fsdp",))
    rows = jax.sharding.NamedSharding(mesh, jax.P("fsdp"))

    def shard(p, arr):
        split = arr.ndim == 2 and arr.shape[0] % 8 == 0
        return jax.device_put(arr, rows if split else rows.update(spec=jax.P()))

    ours = load_hf(path, "bfloat16", shardings=shard)
    emb = ours.model.embed_tokens.embedding[...]
    assert emb.dtype == jnp.bfloat16
    assert emb.sharding.is_equivalent_to(rows, 2)
    assert len(emb.addressable_shards) == 8


def test_cli_orbax_and_back_to_hf(tmp_path, llama_dir):
    path, hf = llama_dir
    assert cli(["--hf_dir", str(path), "--out", str(tmp_path / "ckpt")]) == 0
    restored = load_params(tmp_path / "ckpt")
    np.testing.assert_allclose(np.asarray(lm_forward(restored, jnp.asarray(IDS))), logits(hf, IDS), atol=1e-4)
    assert cli(["--ckpt", str(tmp_path / "ckpt"), "--out", str(tmp_path / "hf"), "--to_hf"]) == 0
    back = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf").eval()
    np.testing.assert_allclose(logits(back, IDS), logits(hf, IDS), atol=1e-5, rtol=0)

"""Llava conversion vs transformers on tiny random models: logits, greedy generation, layouts, export."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from safetensors.numpy import load_file, save_file

import emollm_jax  # noqa: F401  (flax config first)
from emollm_jax.convert import load_hf, save_hf
from emollm_jax.convert.llava import load_llava_original
from emollm_jax.convert.safetensors_io import CheckpointError
from emollm_jax.generate import generate
from emollm_jax.models.emollm import EmoLLM, visual_tokens_per_media
from emollm_jax.models.llama import LlamaForCausalLM

IMG, V, N_IMG = 100, 128, 16  # image token inside the vocab; 32 px / patch 8 = 16 patches
TEXT = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128)  # fmt: skip
VISION = dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
              num_attention_heads=4)  # fmt: skip


def _perturb(model):
    """Non-trivial norms and biases, so mapping mistakes show up."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))


def _no_eos(model):
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


@pytest.fixture(scope="module")
def hf_llava(tmp_path_factory):
    cfg = transformers.LlavaConfig(
        vision_config=transformers.CLIPVisionConfig(**VISION),
        text_config=transformers.LlamaConfig(**TEXT),
        image_token_index=IMG,
    )
    torch.manual_seed(0)
    model = transformers.LlavaForConditionalGeneration(cfg).eval()
    _perturb(model)
    path = tmp_path_factory.mktemp("llava")
    model.save_pretrained(path)
    return _no_eos(model), path


@pytest.fixture(scope="module")
def ours(hf_llava):
    return load_hf(hf_llava[1])


def _inputs(seed=0, t=24, starts=(2, 5)):
    """int ids [B, T] with N_IMG image tokens per row, and pixels NCHW (torch) / NHWC (ours)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, IMG, size=(len(starts), t)).astype(np.int64)
    for b, s in enumerate(starts):
        ids[b, s : s + N_IMG] = IMG
    pixels = rng.standard_normal((len(starts), 3, 32, 32)).astype(np.float32)
    return ids, pixels, pixels.transpose(0, 2, 3, 1)


def _hf_logits(model, ids, pixels=None, **kw):
    with torch.no_grad():
        extra = {} if pixels is None else {"pixel_values": torch.tensor(pixels)}
        return model(input_ids=torch.tensor(ids), **extra, **kw).logits.numpy()


def test_load_and_logits_match(hf_llava, ours):
    assert isinstance(ours, EmoLLM)
    cfg = ours.config
    assert (cfg.image_token_id, cfg.vision_feature_layer, cfg.vision_feature_select) == (IMG, -2, "patch")
    assert visual_tokens_per_media(cfg, 1) == N_IMG
    ids, nchw, nhwc = _inputs()
    want = _hf_logits(hf_llava[0], ids, nchw)
    got = np.asarray(nnx.jit(lambda m, i, p: m(i, pixel_values=p))(ours, jnp.asarray(ids, jnp.int32), nhwc))
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def test_greedy_with_image_matches_hf_generate(hf_llava, ours):
    ids, nchw, nhwc = _inputs(seed=1, t=20, starts=(1, 3))
    mask = np.ones_like(ids)
    with torch.no_grad():
        hf = hf_llava[0].generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                                  pixel_values=torch.tensor(nchw), max_new_tokens=20,
                                  do_sample=False)  # fmt: skip
    got = generate(ours, ids, mask, pixel_values=nhwc, max_new_tokens=20, eos_id=-1, pad_id=0)
    np.testing.assert_array_equal(np.asarray(got), hf[:, ids.shape[1] :].numpy())


def test_greedy_llama_matches_hf_generate(tmp_path):
    torch.manual_seed(1)
    hf = _no_eos(transformers.LlamaForCausalLM(transformers.LlamaConfig(**TEXT)).eval())
    _perturb(hf)
    hf.save_pretrained(tmp_path)
    model = load_hf(tmp_path)
    assert isinstance(model, LlamaForCausalLM)
    ids = np.random.default_rng(2).integers(3, V, size=(3, 10))
    mask = np.ones_like(ids)
    mask[1, :4] = 0  # left padding
    mask[2, :7] = 0
    with torch.no_grad():
        want = hf.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), max_new_tokens=20,
                           do_sample=False)[:, 10:].numpy()  # fmt: skip
    got = generate(model, ids, mask, max_new_tokens=20, eos_id=-1, pad_id=0)
    np.testing.assert_array_equal(np.asarray(got), want)


def test_llava_hf_hub_layout_loads(hf_llava, ours, tmp_path):
    """The layout of llava-hf checkpoints on the hub: the tower under ``vision_tower.vision_model.``."""
    src = hf_llava[1]
    tensors = {k.replace("vision_tower.", "vision_tower.vision_model.", 1): v
               for k, v in load_file(src / "model.safetensors").items()}  # fmt: skip
    tensors["vision_tower.vision_model.embeddings.position_ids"] = np.arange(17)[None]
    save_file(tensors, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text((src / "config.json").read_text())
    old = load_hf(tmp_path)
    jax.tree.map(np.testing.assert_array_equal, nnx.state(old, nnx.Param), nnx.state(ours, nnx.Param))


def _write_original(hf_model, path, clip_path):
    """Original-LLaVA layout: LLaMA keys + model.mm_projector.{0,2}, LLaMA config + mm_*; CLIP elsewhere."""
    state = {k: v.numpy() for k, v in hf_model.state_dict().items()}
    tensors = {}
    for k, v in state.items():
        if k.startswith("model.language_model."):
            tensors["model." + k.removeprefix("model.language_model.")] = v
        elif k.startswith("model.multi_modal_projector."):
            rest = k.removeprefix("model.multi_modal_projector.")
            tensors["model.mm_projector." + rest.replace("linear_1", "0").replace("linear_2", "2")] = v
        elif k == "lm_head.weight":
            tensors[k] = v
    path.mkdir()
    save_file(tensors, path / "model.safetensors")
    config = {**TEXT, "architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava_llama",
              "mm_vision_tower": "openai/clip-vit-tiny", "mm_projector_type": "mlp2x_gelu",
              "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch", "mm_hidden_size": 32,
              "mm_use_im_start_end": False, "image_aspect_ratio": "pad"}  # fmt: skip
    (path / "config.json").write_text(json.dumps(config))
    hf_model.model.vision_tower.save_pretrained(clip_path)


def test_original_llava_layout_loads(hf_llava, tmp_path):
    lm, clip = tmp_path / "llava_orig", tmp_path / "clip"
    _write_original(hf_llava[0], lm, clip)
    with pytest.raises(CheckpointError, match="load_llava_original"):
        load_hf(lm)
    model = load_llava_original(lm, clip)
    assert model.config.image_token_id == -200
    ids, nchw, nhwc = _inputs(seed=3)
    want = _hf_logits(hf_llava[0], ids, nchw)
    ours_ids = jnp.asarray(np.where(ids == IMG, -200, ids), jnp.int32)
    got = np.asarray(nnx.jit(lambda m, i, p: m(i, pixel_values=p))(model, ours_ids, nhwc))
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def test_export_round_trip(hf_llava, ours, tmp_path):
    out = save_hf(ours, tmp_path / "export")
    written = set(load_file(out / "model.safetensors"))
    assert written == set(load_file(hf_llava[1] / "model.safetensors"))  # transformers' own on-disk names
    back = transformers.LlavaForConditionalGeneration.from_pretrained(out).eval()
    ids, nchw, nhwc = _inputs(seed=4)
    mask = np.ones_like(ids)
    want = np.asarray(ours(jnp.asarray(ids, jnp.int32), attention_mask=jnp.asarray(mask), pixel_values=nhwc))
    np.testing.assert_allclose(
        _hf_logits(back, ids, nchw, attention_mask=torch.tensor(mask)), want, atol=1e-5
    )


def test_original_llava_layout_through_the_cli(hf_llava, tmp_path):
    from emollm_jax.convert.__main__ import main as convert_main
    from emollm_jax.convert.orbax_params import load_params

    lm, clip = tmp_path / "llava_orig", tmp_path / "clip"
    _write_original(hf_llava[0], lm, clip)
    assert convert_main(["--hf_dir", str(lm), "--clip_dir", str(clip), "--out", str(tmp_path / "ckpt")]) == 0
    restored = load_params(tmp_path / "ckpt")
    direct = load_llava_original(lm, clip)
    jax.tree.map(np.testing.assert_array_equal, nnx.state(restored, nnx.Param), nnx.state(direct, nnx.Param))


def test_llava_towers_under_an_mvp_projector(hf_llava, ours):
    """`--init_from` a LLaVA checkpoint with the config's MVP projector: both towers load, MVP stays fresh."""
    import dataclasses

    import ml_collections

    from emollm_jax import experiment
    from emollm_jax.models.projectors import MVPConfig

    cfg = dataclasses.replace(ours.config, projector=MVPConfig(levels=(-1, -2)))
    model = EmoLLM(cfg, rngs=nnx.Rngs(0))
    fresh_projector = jax.tree.map(np.asarray, nnx.state(model.projector, nnx.Param))
    config = ml_collections.ConfigDict({"init": {"hf": "", "llm": "", "vision": "", "params": ""}})
    experiment.load_initial_weights(config, model, init_from=str(hf_llava[1]))
    for tower in ("llm", "vision"):
        jax.tree.map(np.testing.assert_array_equal, nnx.state(getattr(model, tower), nnx.Param),
                     nnx.state(getattr(ours, tower), nnx.Param))
    jax.tree.map(np.testing.assert_array_equal, nnx.state(model.projector, nnx.Param), fresh_projector)

"""The LLaVA families EmoLLM is built on vs transformers' LlavaForConditionalGeneration, tiny random models.

Each family keeps every non-size field of its published checkpoint's config (token ids, feature layer and
strategy, activations, norms' eps, rope settings, tie flags, biases); only widths, depths and image sizes
shrink. For each: which registered parts it loads as, logits with an image in a left-padded batch within
1e-4, 20 greedy tokens identical to HF `generate`, both checkpoint layouts (transformers 5's
`save_pretrained` and the llava-hf hub files) loading the same weights, and `save_hf` back into a
directory transformers loads within 1e-5.
"""

import copy
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
from emollm_jax.generate import generate
from emollm_jax.models.emollm import EmoLLM, visual_tokens_per_media

# ------------------------------------------------------------------------ the published configs' fields
# Vision: openai/clip-vit-large-patch14-336 (LLaVA-1.5, BakLLaVA, LLaVA-Llama-3) and the 26-layer
# google/siglip-so400m-patch14-384 without its head (LLaVA-Interleave). Images 336/384 -> 56 (4x4 patches).
CLIP_L336 = dict(model_type="clip_vision_model", hidden_act="quick_gelu", layer_norm_eps=1e-5, patch_size=14,
                 projection_dim=768)
SIGLIP_SO400M = dict(model_type="siglip_vision_model", hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6,
                     patch_size=14, vision_use_head=False)
# Text: lmsys/vicuna-7b-v1.5 (llava-1.5-7b-hf: vocab 32064 with <image> 32000, <pad> 32001),
# SkunkworksAI/BakLLaVA-1 (Mistral-7B), Meta-Llama-3-8B-Instruct (xtuner llava-llama-3-8b-v1_1: vocab 128320,
# <image> 128257, <pad> 128256), its 3.1 successor's llama3 rope scaling, Qwen/Qwen1.5-0.5B-Chat
# (llava-interleave-qwen-0.5b: vocab 152000, <image> 151646, tied embeddings, q/k/v biases).
VICUNA = dict(model_type="llama", hidden_act="silu", rms_norm_eps=1e-5, rope_theta=10000.0,
              max_position_embeddings=4096, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
              vocab_size=32064)
MISTRAL = dict(model_type="mistral", hidden_act="silu", rms_norm_eps=1e-5, rope_theta=10000.0,
               max_position_embeddings=32768, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
               vocab_size=32064, sliding_window=4096)
LLAMA3 = dict(model_type="llama", hidden_act="silu", rms_norm_eps=1e-5, rope_theta=500000.0,
              max_position_embeddings=8192, bos_token_id=128000, eos_token_id=128009,
              tie_word_embeddings=False, vocab_size=128320)
LLAMA31_ROPE = dict(rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                      high_freq_factor=4.0, original_max_position_embeddings=8192),
                    max_position_embeddings=131072)
QWEN15 = dict(model_type="qwen2", hidden_act="silu", rms_norm_eps=1e-6, rope_theta=1000000.0,
              max_position_embeddings=32768, bos_token_id=151643, eos_token_id=151645,
              tie_word_embeddings=True, vocab_size=152000, use_sliding_window=False, sliding_window=32768,
              max_window_layers=21)

LLAVA15 = dict(image_token_index=32000, pad_token_id=32001, vision_feature_layer=-2,
               vision_feature_select_strategy="default")
LLAVA_LLAMA3 = dict(LLAVA15, image_token_index=128257, pad_token_id=128256)
INTERLEAVE = dict(image_token_index=151646, vision_feature_layer=-1, vision_feature_select_strategy="full",
                  tie_word_embeddings=True)
# family: (vision, text, Llava top-level fields, our vision kind, our decoder kind). The LLaMA-3.1 one also
# reads HF's list form of vision_feature_layer (two layers concatenated on the feature axis).
FAMILIES = {
    "llava15_vicuna": (CLIP_L336, VICUNA, LLAVA15, "clip", "llama"),
    "bakllava_mistral": (CLIP_L336, MISTRAL, LLAVA15, "clip", "mistral"),
    "llava_llama3": (CLIP_L336, LLAMA3, LLAVA_LLAMA3, "clip", "llama3"),
    "llava_llama31_layers": (CLIP_L336, {**LLAMA3, **LLAMA31_ROPE},
                             dict(LLAVA_LLAMA3, vision_feature_layer=[-2, -3]), "clip", "llama3"),
    "interleave_qwen": (SIGLIP_SO400M, QWEN15, INTERLEAVE, "siglip", "qwen2"),
}
# Sizes only: widths, depths, heads (each family's kv-head ratio kept), the image, Mistral's window (so it
# binds within the test's sequences).
VISION_SIZE = dict(image_size=56, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                   num_attention_heads=4)
TEXT_SIZE = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
KV_HEADS = {"llama": 4, "mistral": 1, "llama3": 1, "qwen2": 4}  # Vicuna/Qwen1.5 MHA; Mistral/LLaMA-3 32:8
WINDOW = 24
_HF_CONFIGS = {"clip_vision_model": "CLIPVisionConfig", "siglip_vision_model": "SiglipVisionConfig",
               "llama": "LlamaConfig", "mistral": "MistralConfig", "qwen2": "Qwen2Config"}


def _hf_config(family: str) -> transformers.LlavaConfig:
    vision, text, top, _, kind = copy.deepcopy(FAMILIES[family])  # transformers edits the dicts it gets
    vision = {k: v for k, v in {**vision, **VISION_SIZE}.items() if k != "model_type"}
    text = {k: v for k, v in text.items() if k != "model_type"}
    text.update(TEXT_SIZE, num_key_value_heads=KV_HEADS[kind])
    if kind == "mistral":
        text["sliding_window"] = WINDOW
    vision_cls = getattr(transformers, _HF_CONFIGS[FAMILIES[family][0]["model_type"]])
    text_cls = getattr(transformers, _HF_CONFIGS[FAMILIES[family][1]["model_type"]])
    return transformers.LlavaConfig(vision_config=vision_cls(**vision), text_config=text_cls(**text),
                                    projector_hidden_act="gelu", **top)


def _perturb(model):
    """Non-trivial norms and biases, so mapping mistakes show up."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))


def _hub_layout(src, dst):
    """The llava-hf hub files: the tower under `vision_tower.vision_model.` (+ its position_ids buffer)."""
    dst.mkdir()
    tensors = {k.replace("vision_tower.", "vision_tower.vision_model.", 1): v
               for k, v in load_file(src / "model.safetensors").items()}
    num_positions = next(v.shape[0] for k, v in tensors.items() if k.endswith("position_embedding.weight"))
    tensors["vision_tower.vision_model.embeddings.position_ids"] = np.arange(num_positions)[None]
    save_file(tensors, dst / "model.safetensors")
    (dst / "config.json").write_text((src / "config.json").read_text())
    return dst


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory):
    """(name, HF model, its transformers-5 directory, ours loaded from the hub layout)."""
    torch.manual_seed(0)
    hf = transformers.LlavaForConditionalGeneration(_hf_config(request.param)).eval()
    _perturb(hf)
    hf.generation_config.eos_token_id = None  # 20 tokens whatever comes
    hf.generation_config.pad_token_id = 0
    root = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(root / "hf")
    t5, hub = load_hf(root / "hf"), load_hf(_hub_layout(root / "hf", root / "hub"))
    jax.tree.map(np.testing.assert_array_equal, nnx.state(t5, nnx.Param), nnx.state(hub, nnx.Param))
    return request.param, hf, root / "hf", hub


def _batch(model: EmoLLM, vocab_cap: int, seed: int = 0):
    """A left-padded batch of 3 rows, rows 0 and 2 with an image, row 1 text only.

    Returns ids int[3, T], mask int[3, T], HF pixels float[2, 3, S, S], ours float[3, 1, S, S, 3], and
    frame_media int32[3, 1].
    """
    cfg = model.config
    n_img, size = visual_tokens_per_media(cfg, 1), cfg.vision.image_size
    rng = np.random.default_rng(seed)
    pads, t = (0, 5, 3), n_img + 14
    ids = rng.integers(3, vocab_cap, size=(3, t))
    mask = np.ones((3, t), np.int64)
    for row, pad in enumerate(pads):
        mask[row, :pad] = 0
        ids[row, :pad] = 0
    for row in (0, 2):
        start = pads[row] + 2
        ids[row, start:start + n_img] = cfg.image_token_id
    pixels = rng.uniform(-1, 1, (2, 3, size, size)).astype(np.float32)
    ours = np.zeros((3, 1, size, size, 3), np.float32)
    ours[0, 0], ours[2, 0] = pixels[0].transpose(1, 2, 0), pixels[1].transpose(1, 2, 0)
    return ids, mask, pixels, ours, np.asarray([[0], [-1], [0]], np.int32)


def _positions(mask, stride=1):
    """int[B, T]: as HF generate derives them from the mask, times `stride` (spread out, so that tokens a few
    apart sit thousands of positions apart, where rope_theta and LLaMA-3.1's rope scaling matter)."""
    return np.maximum(np.cumsum(mask, -1) - 1, 0) * stride


def _hf_logits(model, ids, mask, pixels, stride=1):
    positions = _positions(mask, stride)
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                     position_ids=torch.tensor(positions), pixel_values=torch.tensor(pixels)).logits.numpy()


@nnx.jit
def _our_logits(model, ids, mask, pixels, frame_media, positions):
    return model(ids, attention_mask=mask, pixel_values=pixels, frame_media=frame_media, positions=positions)


def test_the_checkpoint_loads_as_its_registered_parts(family):
    name, hf, _, ours = family
    vision, text, top, vision_kind, text_kind = FAMILIES[name]
    cfg = ours.config
    assert (cfg.vision.kind, cfg.text.kind, cfg.projector.kind) == (vision_kind, text_kind, "mlp2x_gelu")
    layers = top["vision_feature_layer"]
    assert cfg.feature_layers == (tuple(layers) if isinstance(layers, list) else (layers,))
    strategy = top["vision_feature_select_strategy"]
    assert cfg.vision_feature_select == ("patch" if strategy == "default" else "full")
    assert cfg.image_token_id == top["image_token_index"]
    assert cfg.text.tie_word_embeddings is text["tie_word_embeddings"]
    assert cfg.text.rope_theta == text["rope_theta"] and cfg.text.vocab_size == text["vocab_size"]
    assert cfg.text.rope_scaling_dict == text.get("rope_scaling")
    assert cfg.vision.hidden_act == vision["hidden_act"]
    assert cfg.vision.layer_norm_eps == vision["layer_norm_eps"]
    assert ours.projector.linear_1.kernel.shape[0] == cfg.vision.width * len(cfg.feature_layers)
    # the image tokens HF's processor would write per image (image_seq_length) are the ones we splice
    grid = (VISION_SIZE["image_size"] // vision["patch_size"]) ** 2
    assert visual_tokens_per_media(cfg, 1) == grid + cfg.vision.num_prefix_tokens - cfg.first_patch


@pytest.mark.parametrize("stride", [1, 97], ids=["positions", "spread_positions"])
def test_logits_with_an_image_in_a_left_padded_batch_match_hf(family, stride):
    _, hf, _, ours = family
    ids, mask, hf_pixels, pixels, frame_media = _batch(ours, 1000)
    want = _hf_logits(hf, ids, mask, hf_pixels, stride)
    got = np.asarray(_our_logits(ours, jnp.asarray(ids, jnp.int32), jnp.asarray(mask), pixels, frame_media,
                                 jnp.asarray(_positions(mask, stride))))
    real = mask.astype(bool)
    np.testing.assert_allclose(got[real], want[real], atol=1e-4, rtol=0)


def test_twenty_greedy_tokens_equal_hf_generate(family):
    _, hf, _, ours = family
    ids, mask, hf_pixels, pixels, frame_media = _batch(ours, 1000, seed=1)
    with torch.no_grad():
        want = hf.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                           pixel_values=torch.tensor(hf_pixels), max_new_tokens=20, do_sample=False)
    got = generate(ours, ids, mask, pixel_values=pixels, frame_media=frame_media, max_new_tokens=20,
                   eos_id=-1, pad_id=0)
    np.testing.assert_array_equal(np.asarray(got), want[:, ids.shape[1]:].numpy())


def test_export_loads_back_into_transformers(family, tmp_path):
    name, hf, src, ours = family
    out = save_hf(ours, tmp_path / "export")
    assert set(load_file(out / "model.safetensors")) == set(load_file(src / "model.safetensors"))
    back = transformers.LlavaForConditionalGeneration.from_pretrained(out).eval()
    written = json.loads((out / "config.json").read_text())
    original = json.loads((src / "config.json").read_text())
    for key in ("image_token_index", "vision_feature_layer", "vision_feature_select_strategy",
                "projector_hidden_act", "tie_word_embeddings"):
        assert written[key] == original[key], key
    for part, keys in (("text_config", ("model_type", "rope_parameters", "rms_norm_eps",
                                        "tie_word_embeddings", "vocab_size", "num_key_value_heads")),
                       ("vision_config", ("model_type", "hidden_act", "layer_norm_eps", "patch_size"))):
        for key in keys:
            assert written[part].get(key) == original[part].get(key), (part, key)
    if FAMILIES[name][4] == "mistral":
        assert written["text_config"]["sliding_window"] == WINDOW
    ids, mask, hf_pixels, _, _ = _batch(ours, 1000, seed=2)
    np.testing.assert_allclose(_hf_logits(back, ids, mask, hf_pixels), _hf_logits(hf, ids, mask, hf_pixels),
                               atol=1e-5, rtol=0)


def test_the_convert_cli_writes_what_load_hf_reads(family, tmp_path):
    from emollm_jax.convert.__main__ import main as convert_main
    from emollm_jax.convert.orbax_params import load_params

    _, _, src, ours = family
    assert convert_main(["--hf_dir", str(src), "--out", str(tmp_path / "ckpt")]) == 0
    restored = load_params(tmp_path / "ckpt")
    assert restored.config == ours.config
    jax.tree.map(np.testing.assert_array_equal, nnx.state(restored, nnx.Param), nnx.state(ours, nnx.Param))


# ------------------------------------------------------------------------------------ LLaMA-3 vs LLaMA-2
@pytest.mark.parametrize("fields, kind", [
    (dict(vocab_size=32000, bos_token_id=1), "llama"),                          # LLaMA-2 / Vicuna
    (dict(vocab_size=32064, bos_token_id=1, rope_scaling=dict(type="linear", factor=2.0)), "llama"),
    (dict(vocab_size=128256, bos_token_id=128000), "llama3"),                   # LLaMA-3
    (dict(vocab_size=128256, rope_parameters=dict(rope_type="llama3", factor=8.0)), "llama3"),  # 3.1
    (dict(vocab_size=256, rope_scaling=dict(rope_type="llama3", factor=8.0)), "llama3"),        # tiny 3.1
    (dict(vocab_size=256, bos_token_id=128000), "llama3"),                      # tiny 3, its bos id kept
])
def test_llama3_is_told_from_llama2_by_its_config(fields, kind):
    from emollm_jax.models.llama import LlamaConfig
    from emollm_jax.models.parts import DECODERS, hf_part

    hf = dict(model_type="llama", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
              num_attention_heads=4, **fields)
    cls = hf_part(DECODERS, hf)
    assert cls.kind == kind and issubclass(cls, LlamaConfig)
    assert cls.from_hf(hf).chat_template == {"llama": "vicuna_v1", "llama3": "llama3"}[kind]


# ------------------------------------------------------------------------ every tower with every decoder
TOWER = dict(image_size=28, patch_size=14, hidden_size=16, intermediate_size=32, num_layers=3, num_heads=2)
TEXT = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
            max_position_embeddings=64)


def _config_blocks(tower: str, decoder: str, projector, **model):
    """A `config.model` block naming the parts by kind, as a config file or the command line does."""
    import ml_collections

    from emollm_jax.models.parts import DECODERS, VISION_TOWERS

    fields = {"vision_feature_layer": -2, "vision_feature_select": "patch", "video_pooling": "concat",
              **model}
    return ml_collections.ConfigDict(dict(vision=VISION_TOWERS.get(tower).block(**TOWER), projector=projector,
                                          text=DECODERS.get(decoder).block(**TEXT), **fields))


@pytest.mark.parametrize("decoder", ["llama", "llama3", "mistral", "qwen2"])
@pytest.mark.parametrize("tower", ["clip", "siglip"])
def test_every_registered_tower_and_decoder_train_together_under_mvp(tower, decoder):
    from emollm_jax.models.emollm import EmoLLMConfig
    from emollm_jax.models.projectors import MVPConfig

    pool = "cls" if tower == "clip" else "mean"  # SigLIP has no class token
    mvp = MVPConfig.block(levels=(-1, -3), global_pool=pool, fusion="gated_sum")
    cfg = EmoLLMConfig.from_config(_config_blocks(tower, decoder, mvp), vocab_size=64, image_token_id=63)
    assert (cfg.vision.kind, cfg.text.kind) == (tower, decoder)
    model = EmoLLM(cfg, rngs=nnx.Rngs(0))
    n = visual_tokens_per_media(cfg, 1)
    ids = jnp.asarray([[1, 2] + [63] * n + [5, 6, 7]], jnp.int32)
    pixels = jax.random.uniform(jax.random.key(0), (1, 28, 28, 3), minval=-1, maxval=1)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(params):
        logits = nnx.merge(graphdef, params, rest)(ids, pixel_values=pixels)
        return jax.nn.logsumexp(logits[0, -1]) - logits[0, -1, 7]

    value, grads = jax.jit(jax.value_and_grad(loss))(params)
    assert np.isfinite(float(value))
    norms = {part: float(optax_norm(grads[part])) for part in ("projector", "llm")}
    assert all(np.isfinite(v) and v > 0 for v in norms.values()), norms


def optax_norm(tree) -> jax.Array:
    return jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(tree)))


def test_a_list_of_feature_layers_from_a_config_block():
    """HF's list form in `config.model.vision_feature_layer`: layers concatenated, the projector as wide."""
    from emollm_jax.configuration import ConfigError
    from emollm_jax.models.emollm import EmoLLMConfig
    from emollm_jax.models.projectors import MLPProjectorConfig, MVPConfig

    block = _config_blocks("siglip", "qwen2", MLPProjectorConfig.block(), vision_feature_layer=(-1, -2, -4))
    cfg = EmoLLMConfig.from_config(block, vocab_size=64, image_token_id=63)
    assert cfg.feature_layers == (-1, -2, -4) and cfg.feature_width == 3 * TOWER["hidden_size"]
    model = EmoLLM(cfg, rngs=nnx.Rngs(0))
    pixels = jax.random.uniform(jax.random.key(1), (2, 28, 28, 3))
    hidden = model.vision(pixels).hidden_states
    feats = model.vision_features(pixels)
    want = jnp.concatenate([hidden[-1], hidden[-2], hidden[-4]], axis=-1)[:, 1:]
    np.testing.assert_array_equal(feats.patches, want)
    # MVP's multilevel perspective reads single layers: refused with a list, naming the key
    block.projector = MVPConfig.block(levels=(-1, -2), global_pool="mean")
    with pytest.raises(ConfigError, match=r"model\.vision_feature_layer=\(-1, -2, -4\): several layers"):
        EmoLLMConfig.from_config(block, vocab_size=64, image_token_id=63)
    block.projector.perspectives = ("token", "relation", "global")  # no levels: the list is fine
    assert EmoLLMConfig.from_config(block, vocab_size=64, image_token_id=63).feature_width == 48


# ---------------------------------------------------------------------------- real-size config variants
def _variant(name: str):
    from pathlib import Path

    from emollm_jax.configuration import load_config

    config = load_config(f"{Path(__file__).resolve().parents[1] / 'configs' / 'emobench.py'}:{name}")
    config.data.root, config.init.llm, config.init.vision = "/data", "/w/llm", "/w/tower"
    return config


def _params(module) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(module, nnx.Param)))


@pytest.mark.parametrize("variant, vision_kind, decoder_kind, template, llm_params", [
    # Qwen1.5-0.5B-Chat's published 463,987,712 parameters (tied), plus the 64 embedding rows llava adds
    ("qwen05b", "siglip", "qwen2", "chatml", 463_987_712 + 64 * 1024),
    ("llama3_8b", "clip", "llama3", "llama3", 8_030_261_248),  # Meta-Llama-3-8B's published count
])
def test_real_size_variants(variant, vision_kind, decoder_kind, template, llm_params):
    from emollm_jax import data, experiment
    from emollm_jax.configuration import ConfigError
    from emollm_jax.run_config import validate_config

    config = _variant(variant)
    assert validate_config(config, 8)["fsdp"] == 8 and validate_config(config, 1)["fsdp"] == 1
    cfg = experiment.model_config(config, vocab_size=config.model.text.vocab_size,
                                  image_token_id=max(config.model.image_token_id, 0))
    assert (cfg.vision.kind, cfg.text.kind, cfg.projector.kind) == (vision_kind, decoder_kind, "mvp")
    assert data.template_name(config) == template == cfg.text.chat_template
    model = nnx.eval_shape(lambda: EmoLLM(cfg, rngs=nnx.Rngs(0)))
    assert _params(model.llm) == llm_params
    config.data.root = ""
    with pytest.raises(ConfigError, match=rf"data\.root.*{variant}"):
        validate_config(config, 8)


def test_qwen05b_is_llava_interleave_qwen_05b():
    """The variant loads llava-interleave-qwen-0.5b's config.json as the same model (tower, feature layer,
    token count, decoder), so `--config.init.hf` on that checkpoint fills every parameter."""
    from emollm_jax import experiment
    from emollm_jax.convert.llava import config_from_llava_hf

    config = _variant("qwen05b")
    ours = experiment.model_config(config, vocab_size=152000, image_token_id=151646)
    text = dict(QWEN15, hidden_size=1024, intermediate_size=2816, num_hidden_layers=24,
                num_attention_heads=16, num_key_value_heads=16)
    vision = dict(SIGLIP_SO400M, image_size=384, hidden_size=1152, intermediate_size=4304,
                  num_hidden_layers=26, num_attention_heads=16)
    hub = config_from_llava_hf(dict(model_type="llava", text_config=text, vision_config=vision, **INTERLEAVE))
    tower = ("image_size", "patch_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
             "layer_norm_eps", "hidden_act", "use_head")
    assert {f: getattr(hub.vision, f) for f in tower} == {f: getattr(ours.vision, f) for f in tower}
    assert (hub.feature_layers, hub.vision_feature_select, hub.image_token_id) == (
        ours.feature_layers, ours.vision_feature_select, ours.image_token_id)
    assert hub.tokens_per_frame == ours.tokens_per_frame == 729
    fields = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
              "rms_norm_eps", "rope_theta", "tie_word_embeddings", "attention_bias", "sliding_window")
    assert {f: getattr(hub.text, f) for f in fields} == {f: getattr(ours.text, f) for f in fields}


def test_a_head_tied_by_the_llava_config_alone(tmp_path):
    """transformers ties a Llava's lm_head when its top-level tie_word_embeddings says so, whatever the text
    config says (and writes no head): so do we."""
    config = _hf_config("interleave_qwen")
    config.text_config.tie_word_embeddings = False
    config.tie_word_embeddings = True
    torch.manual_seed(1)
    hf = transformers.LlavaForConditionalGeneration(config).eval()
    _perturb(hf)
    hf.save_pretrained(tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    assert written["tie_word_embeddings"] and not written["text_config"]["tie_word_embeddings"]
    ours = load_hf(tmp_path)
    assert ours.config.text.tie_word_embeddings
    ids, mask, hf_pixels, pixels, frame_media = _batch(ours, 1000)
    got = _our_logits(ours, jnp.asarray(ids, jnp.int32), jnp.asarray(mask), pixels, frame_media,
                      jnp.asarray(_positions(mask)))
    real = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(got)[real], _hf_logits(hf, ids, mask, hf_pixels)[real], atol=1e-4)

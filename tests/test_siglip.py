"""SigLIP vision tower vs transformers' SiglipVisionModel (tiny random models, fp32), its checkpoint layouts,
export, position-embedding resampling, and its preprocessing vs SiglipImageProcessor."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from PIL import Image

import emollm_jax  # noqa: F401  (flax config first)
from data_pipeline.media import load_media, preprocess_image
from emollm_jax.convert import load_hf, open_checkpoint, save_hf
from emollm_jax.models.layers import resample_posemb
from emollm_jax.models.siglip import SiglipConfig, SiglipVisionTransformer

# Every non-size field as in google/siglip-so400m-patch14-384's vision config (gelu_pytorch_tanh, eps 1e-6,
# the pooling head on); sizes tiny. Patch 14 kept, and, as 384 px there, an image size that is not a multiple
# of it (44 px: 3x3 patches, the remainder dropped).
TINY = dict(image_size=44, patch_size=14, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
            num_attention_heads=4, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6)
PIXELS = np.random.default_rng(0).uniform(-1, 1, (2, 3, 44, 44)).astype(np.float32)


def _perturb(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias") or name.endswith("probe"):
                p.add_(0.1 * torch.randn_like(p))


def _hf_tower(path, seed=0, **overrides):
    torch.manual_seed(seed)
    model = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**{**TINY, **overrides})).eval()
    _perturb(model)
    model.save_pretrained(path)
    return model


def _hf_out(model, pixels=PIXELS):
    with torch.no_grad():
        return model(torch.tensor(pixels), output_hidden_states=True)


@nnx.jit
def _ours(model, pixels):
    out = model(pixels)
    return out.hidden_states, out.pooled, model.post_layernorm(out.hidden_states[-1])


def _nhwc(pixels=PIXELS):
    return jnp.asarray(pixels.transpose(0, 2, 3, 1))


@pytest.fixture(scope="module", params=[True, False], ids=["head", "no_head"])
def tower(request, tmp_path_factory):
    path = tmp_path_factory.mktemp("siglip")
    return _hf_tower(path, vision_use_head=request.param), path


def test_every_hidden_state_and_the_pooled_output_match_hf(tower):
    hf, path = tower
    ours = load_hf(path)
    assert isinstance(ours, SiglipVisionTransformer) and ours.config.num_prefix_tokens == 0
    assert ours.config.use_head is hf.config.vision_use_head
    ref = _hf_out(hf)
    hidden, pooled, last = _ours(ours, _nhwc())
    assert len(hidden) == len(ref.hidden_states) == TINY["num_hidden_layers"] + 1
    for got, want in zip(hidden, ref.hidden_states, strict=True):
        assert got.shape == (2, 9, 32)  # no class token: one row per patch
        np.testing.assert_allclose(np.asarray(got), want.numpy(), atol=1e-4, rtol=0)
    np.testing.assert_allclose(np.asarray(last), ref.last_hidden_state.numpy(), atol=1e-4, rtol=0)
    if hf.config.vision_use_head:
        np.testing.assert_allclose(np.asarray(pooled), ref.pooler_output.numpy(), atol=1e-4, rtol=0)
    else:
        assert pooled is None and ref.pooler_output is None


def test_export_round_trip_through_transformers(tower, tmp_path):
    hf, path = tower
    out = save_hf(load_hf(path), tmp_path / "back")
    assert set(open_checkpoint(out).keys()) == set(open_checkpoint(path).keys())
    back = transformers.SiglipVisionModel.from_pretrained(out).eval()
    got, want = _hf_out(back), _hf_out(hf)
    for a, b in zip(got.hidden_states, want.hidden_states, strict=True):
        np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-5, rtol=0)
    np.testing.assert_allclose(got.last_hidden_state.numpy(), want.last_hidden_state.numpy(), atol=1e-5)


def test_hub_layout_and_the_vision_half_of_a_siglip_model(tmp_path):
    """google/siglip-* files: a SiglipModel (text half skipped on purpose) with `vision_model.` keys."""
    torch.manual_seed(3)
    text = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                num_attention_heads=4, max_position_embeddings=16)
    full = transformers.SiglipModel(transformers.SiglipConfig(vision_config=TINY, text_config=text)).eval()
    _perturb(full)
    full.save_pretrained(tmp_path)
    keys = set(open_checkpoint(tmp_path).keys())
    assert "vision_model.embeddings.patch_embedding.weight" in keys and any(k.startswith("text_model.")
                                                                            for k in keys)
    ours = load_hf(tmp_path)
    with torch.no_grad():
        ref = full.vision_model(torch.tensor(PIXELS))
    _, pooled, last = _ours(ours, _nhwc())
    np.testing.assert_allclose(np.asarray(last), ref.last_hidden_state.numpy(), atol=1e-4, rtol=0)
    np.testing.assert_allclose(np.asarray(pooled), ref.pooler_output.numpy(), atol=1e-4, rtol=0)


def test_a_head_in_the_file_is_skipped_when_the_config_drops_it(tmp_path):
    hf = _hf_tower(tmp_path, seed=4, vision_use_head=True)
    path = tmp_path
    ours = load_hf(path, use_head=False)
    assert ours.head is None
    np.testing.assert_allclose(np.asarray(_ours(ours, _nhwc())[2]), _hf_out(hf).last_hidden_state.numpy(),
                               atol=1e-4, rtol=0)


def test_position_embeddings_resampled_for_another_size(tower):
    _, path = tower
    small = load_hf(path)
    big = load_hf(path, image_size=70)  # 3x3 grid -> 5x5
    table = np.asarray(big.embeddings.position_embedding.embedding[...])
    assert table.shape == (25, 32)
    want = resample_posemb(small.embeddings.position_embedding.embedding[...], 5)
    np.testing.assert_allclose(table, np.asarray(want), atol=1e-6)
    pixels = np.random.default_rng(1).uniform(-1, 1, (1, 70, 70, 3)).astype(np.float32)
    assert big(jnp.asarray(pixels)).hidden_states[-1].shape == (1, 25, 32)


def test_config_round_trip_and_checks():
    cfg = SiglipConfig.from_hf({"model_type": "siglip_vision_model", **TINY, "vision_use_head": False})
    assert SiglipConfig.from_hf(cfg.to_hf()) == cfg
    assert cfg.preprocessing().mode == "resize" and cfg.preprocessing().mean == (0.5, 0.5, 0.5)
    with pytest.raises(ValueError, match="not a SigLIP vision config"):
        SiglipConfig.from_hf({"model_type": "clip_vision_model"})
    with pytest.raises(ValueError, match="image_mode"):
        SiglipConfig(image_mode="stretch")
    flops = dataclasses.replace(cfg, use_head=True).forward_flops(2)
    assert flops > cfg.forward_flops(2) > 0 and cfg.forward_flops(2) == 2 * cfg.forward_flops(1)


# Measured max |ours - SiglipImageProcessor| over these shapes: 1.2e-7 (both resize with PIL bicubic on
# uint8; without torchvision, transformers' SiglipImageProcessor is its PIL backend).
@pytest.mark.parametrize("h, w, size", [(37, 53, 32), (300, 200, 224), (64, 64, 64), (400, 90, 384)])
def test_preprocessing_matches_siglip_image_processor(h, w, size):
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    img = np.random.default_rng(h * w).integers(0, 256, (h, w, 3), dtype=np.uint8)
    hf = SiglipImageProcessorPil(size={"height": size, "width": size})
    ref = hf(images=Image.fromarray(img), return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
    pre = SiglipConfig(image_size=size, patch_size=16).preprocessing()
    got = preprocess_image(img, pre.image_size, pre.mode, pre.mean, pre.std)
    assert got.shape == (size, size, 3)
    np.testing.assert_allclose(got, ref, atol=1e-5, rtol=0)


def test_the_pipeline_reads_pixels_the_siglip_way(tmp_path):
    """The tower's preprocessing reaches `load_media` through the pipeline spec (model config -> pixels)."""
    import ml_collections

    from emollm_jax import data
    from emollm_jax.models.emollm import EmoLLMConfig
    from emollm_jax.models.llama import Qwen2Config
    from emollm_jax.models.projectors import MLPProjectorConfig

    cfg = EmoLLMConfig(vision=SiglipConfig(image_size=28, patch_size=14), projector=MLPProjectorConfig(),
                       text=Qwen2Config(vocab_size=40, hidden_size=16, intermediate_size=24, num_layers=1,
                                        num_heads=2, num_kv_heads=1),
                       image_token_id=39, vision_feature_layer=-1, vision_feature_select="full")
    config = ml_collections.ConfigDict(dict(seed=0, model=dict(text=dict(kind="qwen2")), data=dict(
        template="", num_frames=2, seq_buckets=(), max_len=64, num_workers=0)))
    spec = data.pipeline_spec(config, cfg, sources=("x.jsonl",), tokenizer="t", data_root=str(tmp_path),
                              batch_size=1, training=True)
    assert (spec.image_mode, spec.image_mean, spec.image_std) == ("resize", (0.5,) * 3, (0.5,) * 3)
    assert spec.visual_tokens(1) == 4 and spec.template == "chatml"
    img = np.random.default_rng(5).integers(0, 256, (20, 50, 3), dtype=np.uint8)
    Image.fromarray(img).save(tmp_path / "a.png")
    pixels = load_media({"id": "r", "image": "a.png"}, tmp_path, image_size=spec.image_size, num_frames=2,
                        mode=spec.image_mode, mean=spec.image_mean, std=spec.image_std)
    want = np.asarray(Image.fromarray(img).resize((28, 28), Image.Resampling.BICUBIC), np.float32) / 127.5 - 1
    np.testing.assert_allclose(pixels[0], want, atol=1e-5)
    assert pixels.shape == (1, 28, 28, 3)


def test_scanned_siglip_matches_transformers_and_exports_back(tmp_path):
    """`scan_layers=True` on a SigLIP tower (CLIP's encoder blocks, stacked): every hidden state within 1e-4
    of transformers, and the export of the stacked layers loads back into transformers unchanged."""
    import numpy as np
    import torch
    import transformers

    from emollm_jax.convert import load_hf, save_hf

    cfg = transformers.SiglipVisionConfig(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                                          num_hidden_layers=3, num_attention_heads=4)
    torch.manual_seed(0)
    hf = transformers.SiglipVisionModel(cfg).eval()
    hf.save_pretrained(tmp_path / "hf")
    x = np.random.RandomState(0).randn(2, 32, 32, 3).astype(np.float32)
    with torch.no_grad():
        ref = hf(torch.tensor(x).permute(0, 3, 1, 2), output_hidden_states=True)
    ours = load_hf(tmp_path / "hf", scan_layers=True)
    assert ours.config.scan_layers
    out = ours(x)
    assert len(out.hidden_states) == len(ref.hidden_states)
    for a, b in zip(out.hidden_states, ref.hidden_states, strict=True):
        np.testing.assert_allclose(np.asarray(a), b.numpy(), atol=1e-4)
    np.testing.assert_allclose(np.asarray(out.pooled), ref.pooler_output.numpy(), atol=1e-4)
    save_hf(ours, tmp_path / "back")
    back = transformers.SiglipVisionModel.from_pretrained(tmp_path / "back").eval()
    with torch.no_grad():
        again = back(torch.tensor(x).permute(0, 3, 1, 2)).last_hidden_state
    np.testing.assert_allclose(again.numpy(), ref.last_hidden_state.numpy(), atol=1e-5)

"""CLIP vision tower vs HF PyTorch on a tiny random model (fp32), and position-embedding resampling."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from emollm_jax.convert import load_hf
from emollm_jax.models.clip import CLIPConfig, CLIPVisionTransformer
from emollm_jax.models.layers import resample_posemb

TINY = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, image_size=32,
            patch_size=8)


@nnx.jit
def forward(model, pixels):
    return model(pixels)


def make_hf(path, **overrides):
    torch.manual_seed(0)
    model = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**{**TINY, **overrides})).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(path)
    return model


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    path = tmp_path_factory.mktemp("clip")
    return make_hf(path), load_hf(path), path


def test_every_hidden_state_and_pooled_match_hf(pair):
    hf, ours, _ = pair
    pixels = np.random.RandomState(0).randn(3, 3, 32, 32).astype(np.float32)  # NCHW for torch
    with torch.no_grad():
        ref = hf(torch.tensor(pixels), output_hidden_states=True)
    out = forward(ours, jnp.asarray(pixels.transpose(0, 2, 3, 1)))
    assert len(out.hidden_states) == len(ref.hidden_states) == 3
    for i, (a, b) in enumerate(zip(out.hidden_states, ref.hidden_states, strict=True)):
        np.testing.assert_allclose(np.asarray(a), b.numpy(), atol=1e-4, rtol=0, err_msg=f"hidden_states[{i}]")
    np.testing.assert_allclose(np.asarray(out.hidden_states[-1]), ref.last_hidden_state.numpy(), atol=1e-4)
    np.testing.assert_allclose(np.asarray(out.pooled), ref.pooler_output.numpy(), atol=1e-4, rtol=0)


def test_resample_posemb_keeps_class_and_interpolates_grid():
    d = 3
    rows, cols = np.meshgrid(np.arange(4.0), np.arange(4.0), indexing="ij")
    grid = np.stack([rows, cols, np.ones_like(rows)], -1).reshape(16, d)
    posemb = np.concatenate([np.full((1, d), 7.0), grid]).astype(np.float32)
    out = np.asarray(resample_posemb(jnp.asarray(posemb), 8))
    assert out.shape == (65, d)
    np.testing.assert_array_equal(out[0], posemb[0])
    up = out[1:].reshape(8, 8, d)
    np.testing.assert_allclose(up[..., 2], 1.0, atol=1e-6)  # constants stay constant
    # half-pixel bilinear: interior rows map linearly (new row r sits at old (r + 0.5) / 2 - 0.5)
    np.testing.assert_allclose(up[1:7, 0, 0], (np.arange(1, 7) + 0.5) / 2 - 0.5, atol=1e-5)
    assert np.all(np.diff(up[..., 1], axis=1) >= 0)  # monotone along columns
    np.testing.assert_array_equal(np.asarray(resample_posemb(jnp.asarray(posemb), 4)), posemb)


def test_load_at_larger_image_size_resamples_position_embedding(pair):
    hf, _, path = pair
    big = load_hf(path, image_size=64)
    file_pos = hf.state_dict()["embeddings.position_embedding.weight"].numpy()
    np.testing.assert_allclose(np.asarray(big.embeddings.position_embedding.embedding[...]),
                               np.asarray(resample_posemb(jnp.asarray(file_pos), 8)), atol=1e-6)
    out = forward(big, jnp.zeros((1, 64, 64, 3)))
    assert out.hidden_states[-1].shape == (1, 65, 64)


def test_wrong_image_size_is_a_clear_error(pair):
    _, ours, _ = pair
    with pytest.raises(ValueError, match="resample_posemb"):
        ours(jnp.zeros((1, 48, 48, 3)))


def test_config_from_clip_model_dict_and_round_trip():
    full = transformers.CLIPConfig(vision_config=TINY).to_dict()
    cfg = CLIPConfig.from_hf(full)
    assert (cfg.hidden_size, cfg.num_layers, cfg.patch_size, cfg.image_size) == (64, 2, 8, 32)
    assert CLIPConfig.from_hf(cfg.to_hf()) == cfg


def test_logical_axes_and_remat():
    cfg = CLIPConfig(image_size=32, patch_size=16, hidden_size=16, intermediate_size=32, num_layers=2,
                       num_heads=2)
    model = CLIPVisionTransformer(cfg, rngs=nnx.Rngs(0))
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        names = var.get_metadata().get("out_sharding")
        assert names is not None and len(names) == var.get_value().ndim, path
    remat = CLIPVisionTransformer(dataclasses.replace(cfg, remat=True), rngs=nnx.Rngs(0))
    x = jnp.asarray(np.random.RandomState(1).randn(2, 32, 32, 3).astype(np.float32))
    np.testing.assert_allclose(np.asarray(forward(model, x).pooled),
                               np.asarray(forward(remat, x).pooled), atol=1e-6)

"""Whisper audio tower vs transformers' WhisperEncoder on tiny random models (fp32): every hidden state, the
checkpoint layouts it comes in, export back to a directory transformers loads, and the CLI."""

import json
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from safetensors.numpy import load_file
from test_audio import speech_like
from transformers.models.whisper.modeling_whisper import WhisperEncoder as HFWhisperEncoder

from data_pipeline.audio import log_mel_spectrogram
from emollm_jax.convert import load_hf, save_hf
from emollm_jax.convert.__main__ import main as cli
from emollm_jax.convert.orbax_params import load_params
from emollm_jax.models.parts import AUDIO_TOWERS, AudioPreprocessing
from emollm_jax.models.whisper import WhisperConfig, WhisperEncoder


def _encoder(mels, width, layers, heads, ffn, positions, **more):
    return dict(num_mel_bins=mels, d_model=width, encoder_layers=layers, encoder_attention_heads=heads,
                encoder_ffn_dim=ffn, max_source_positions=positions, **more)


# name -> (HF class saved, encoder shape); decoders (one small layer) and the classifier's head are in the
# files only to be skipped
CONFIGS = {
    "model_80mel_4heads": ("WhisperModel", _encoder(80, 64, 2, 4, 96, 30)),
    "generation_128mel_3heads": ("WhisperForConditionalGeneration", _encoder(128, 48, 3, 3, 80, 25)),
    "model_8heads_gelu_new": ("WhisperModel", _encoder(80, 64, 1, 8, 128, 16,
                                                       activation_function="gelu_new")),
    "encoder_only_128mel_2heads": ("WhisperEncoder", _encoder(128, 32, 2, 2, 64, 20)),
    "classifier_80mel_2heads": ("WhisperForAudioClassification",
                                _encoder(80, 32, 2, 2, 48, 12, use_weighted_layer_sum=True, num_labels=3)),
}
DECODER = dict(decoder_layers=1, decoder_attention_heads=2, decoder_ffn_dim=32, vocab_size=64,
               max_target_positions=16, pad_token_id=0, bos_token_id=1, eos_token_id=2,
               decoder_start_token_id=1)


def make_hf(path, arch, encoder, seed=0):
    """Saves a random HF Whisper of class `arch`; returns its encoder (torch, eval). LayerNorms, biases and
    the stored positions are perturbed so that a loader that skipped or recomputed them would fail."""
    torch.manual_seed(seed)
    cfg = transformers.WhisperConfig(**DECODER, **encoder)
    model = (HFWhisperEncoder(cfg) if arch == "WhisperEncoder" else getattr(transformers, arch)(cfg)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias") or "embed_positions" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(path)
    return model if arch == "WhisperEncoder" else model.get_encoder()


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def pair(request, tmp_path_factory):
    arch, encoder = CONFIGS[request.param]
    path = tmp_path_factory.mktemp(request.param)
    return make_hf(path, arch, encoder), path, encoder


def features(encoder, batch=2, seed=0):
    return np.random.RandomState(seed).randn(batch, encoder["num_mel_bins"],
                                             2 * encoder["max_source_positions"]).astype(np.float32)


def hf_hidden(hf, x):
    with torch.no_grad():
        return hf(torch.tensor(x), output_hidden_states=True)


@nnx.jit
def all_hidden(model, x):
    return model.hidden_states(x)


@nnx.jit
def last_hidden(model, x):
    return model(x)


def test_every_hidden_state_matches_transformers(pair):
    hf, path, encoder = pair
    ours = load_hf(path)
    assert isinstance(ours, WhisperEncoder)
    x = features(encoder)
    ref = hf_hidden(hf, x)
    out = all_hidden(ours, jnp.asarray(x))
    assert len(out) == len(ref.hidden_states) == encoder["encoder_layers"] + 1
    assert len(out) == ours.config.num_hidden_states
    for i, (a, b) in enumerate(zip(out, ref.hidden_states, strict=True)):
        np.testing.assert_allclose(np.asarray(a), b.numpy(), rtol=0, atol=1e-4, err_msg=f"hidden_states[{i}]")
    last = last_hidden(ours, jnp.asarray(x))  # the public call: float[B, frames // 2, D]
    assert last.shape == (2, x.shape[-1] // 2, encoder["d_model"])
    np.testing.assert_allclose(np.asarray(last), ref.last_hidden_state.numpy(), rtol=0, atol=1e-4)


def test_front_end_features_of_speech_go_through_both_encoders(tmp_path):
    """waveform -> log_mel_spectrogram -> our encoder, vs the extractor's features -> transformers'
    encoder."""
    arch, encoder = CONFIGS["model_80mel_4heads"]
    encoder = {**encoder, "max_source_positions": 50}  # 100 frames of 10 ms: 1 s windows
    hf = make_hf(tmp_path, arch, encoder, seed=1)
    seconds = 1
    waves = [speech_like(0.45, seed=21), speech_like(1.3, seed=22)]  # padded, and cut
    ours_in = np.stack([log_mel_spectrogram(w, 80, window_seconds=seconds) for w in waves])
    extractor = transformers.WhisperFeatureExtractor(feature_size=80, chunk_length=seconds)
    ref_in = extractor(waves, sampling_rate=16_000, return_tensors="np")["input_features"]
    np.testing.assert_allclose(ours_in, ref_in, rtol=0, atol=1e-4)
    out = last_hidden(load_hf(tmp_path), jnp.asarray(ours_in))
    np.testing.assert_allclose(np.asarray(out), hf_hidden(hf, ref_in).last_hidden_state.numpy(), rtol=0,
                               atol=1e-4)


def test_loads_onto_a_mesh_by_the_default_rules_and_runs_there(tmp_path):
    """Placed by the logical names through `sharding.DEFAULT_RULES` (fsdp 4 x tensor 2) as tensors are read;
    the sharded forward still matches transformers."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from emollm_jax import sharding
    from emollm_jax.pytree import path_keys

    arch, encoder = CONFIGS["model_80mel_4heads"]
    hf = make_hf(tmp_path, arch, encoder)
    mesh = sharding.make_mesh({"fsdp": 4, "tensor": 2})
    abstract = nnx.eval_shape(lambda: WhisperConfig.from_hf(hf.config.to_dict()).build(rngs=nnx.Rngs(0)))
    placement = sharding.logical_shardings(nnx.state(abstract), mesh, sharding.DEFAULT_RULES)
    flat = {path_keys(k): s for k, s in jax.tree_util.tree_leaves_with_path(
        placement, is_leaf=lambda x: isinstance(x, NamedSharding))}
    ours = load_hf(tmp_path, shardings=lambda path, arr: jax.device_put(arr, flat[path]))
    q = ours.layers[0].self_attn.q_proj.kernel[...]
    assert q.sharding.is_equivalent_to(NamedSharding(mesh, P("fsdp", "tensor")), 2)
    assert ours.embed_positions[...].sharding.is_equivalent_to(NamedSharding(mesh, P(None, "fsdp")), 2)
    x = features(encoder, batch=4, seed=5)
    np.testing.assert_allclose(np.asarray(last_hidden(ours, jnp.asarray(x))),
                               hf_hidden(hf, x).last_hidden_state.numpy(), rtol=0, atol=1e-4)


def test_decoder_keys_are_accounted_for_and_skipped_with_a_log_line(tmp_path, caplog):
    arch, encoder = CONFIGS["generation_128mel_3heads"]
    make_hf(tmp_path, arch, encoder)
    keys = load_file(tmp_path / "model.safetensors").keys()
    beside = [k for k in keys if not k.startswith("model.encoder.")]
    assert beside and all(k.startswith("model.decoder.") for k in beside)
    with caplog.at_level(logging.INFO, logger="emollm_jax.convert.hf"):
        load_hf(tmp_path)
    line = next(r.getMessage() for r in caplog.records if "skipped on purpose" in r.getMessage())
    assert f"{len(beside)} checkpoint keys" in line and "model.decoder." in line


def test_an_unknown_key_beside_the_encoder_is_still_an_error(tmp_path):
    from safetensors.numpy import save_file

    from emollm_jax.convert import CheckpointError

    arch, encoder = CONFIGS["model_80mel_4heads"]
    make_hf(tmp_path, arch, encoder)
    tensors = load_file(tmp_path / "model.safetensors")
    tensors["encoder.adapter.weight"] = np.zeros((2, 2), np.float32)
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"encoder\.adapter\.weight"):
        load_hf(tmp_path)


def test_save_hf_writes_an_encoder_directory_transformers_loads(tmp_path):
    """WhisperModel dir -> ours -> save_hf -> transformers' WhisperEncoder (no missing or unexpected key),
    its output within 1e-5 of the original's; and back into ours unchanged."""
    arch, encoder = CONFIGS["generation_128mel_3heads"]
    hf = make_hf(tmp_path / "src", arch, encoder)
    ours = load_hf(tmp_path / "src")
    save_hf(ours, tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["architectures"] == ["WhisperEncoder"] and config["num_mel_bins"] == 128
    back, info = HFWhisperEncoder.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    x = features(encoder, seed=3)
    np.testing.assert_allclose(hf_hidden(back.eval(), x).last_hidden_state.numpy(),
                               hf_hidden(hf, x).last_hidden_state.numpy(), rtol=0, atol=1e-5)
    again = load_hf(tmp_path / "out")
    assert again.config == ours.config
    for (path, a), (_, b) in zip(nnx.to_flat_state(nnx.state(ours, nnx.Param)),
                                 nnx.to_flat_state(nnx.state(again, nnx.Param)), strict=True):
        np.testing.assert_array_equal(np.asarray(a.get_value()), np.asarray(b.get_value()), err_msg=str(path))


def test_cli_converts_a_whisper_directory_to_orbax_and_back(tmp_path):
    arch, encoder = CONFIGS["model_8heads_gelu_new"]
    hf = make_hf(tmp_path / "src", arch, encoder)
    assert cli(["--hf_dir", str(tmp_path / "src"), "--out", str(tmp_path / "ckpt")]) == 0
    x = features(encoder, seed=4)
    restored = load_params(tmp_path / "ckpt")
    np.testing.assert_allclose(np.asarray(last_hidden(restored, jnp.asarray(x))),
                               hf_hidden(hf, x).last_hidden_state.numpy(), rtol=0, atol=1e-4)
    assert cli(["--ckpt", str(tmp_path / "ckpt"), "--out", str(tmp_path / "hf"), "--to_hf"]) == 0
    back = HFWhisperEncoder.from_pretrained(tmp_path / "hf").eval()
    np.testing.assert_allclose(hf_hidden(back, x).last_hidden_state.numpy(),
                               hf_hidden(hf, x).last_hidden_state.numpy(), rtol=0, atol=1e-5)


def test_wrong_input_layout_is_a_clear_error():
    model = WhisperConfig(hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2,
                          max_source_positions=10).build(rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"float\[B, 80, 20\].*got \(1, 20, 80\)"):
        model(jnp.zeros((1, 20, 80)))  # time-major features: the wrong layout
    with pytest.raises(ValueError, match=r"got \(1, 80, 3000\)"):
        model(jnp.zeros((1, 80, 3000)))  # a 30 s window for a tower built for 0.2 s


def test_config_from_and_to_hf_and_what_the_tower_offers():
    hf = transformers.WhisperConfig(num_mel_bins=128, d_model=1280, encoder_layers=32,
                                    encoder_attention_heads=20, encoder_ffn_dim=5120).to_dict()  # large-v3
    cfg = WhisperConfig.from_hf(hf)
    assert (cfg.n_mels, cfg.width, cfg.num_layers, cfg.num_heads, cfg.mel_frames, cfg.frames_per_window) == (
        128, 1280, 32, 20, 3000, 1500)
    assert cfg.preprocessing() == AudioPreprocessing(n_mels=128, window_seconds=30.0)
    assert WhisperConfig.from_hf(cfg.to_hf()) == cfg
    assert AUDIO_TOWERS.get("whisper") is WhisperConfig
    with pytest.raises(ValueError, match="not a Whisper config"):
        WhisperConfig.from_hf({"model_type": "clip"})


def test_forward_flops_agree_with_xla_cost_analysis():
    """The analytic count vs XLA's own count of the compiled forward (which also counts the elementwise ops,
    a few percent at this width)."""
    cfg = WhisperConfig(num_mel_bins=80, hidden_size=256, intermediate_size=1024, num_layers=2, num_heads=4,
                        max_source_positions=128)
    graphdef, state = nnx.split(cfg.build(rngs=nnx.Rngs(0)))
    forward = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))
    cost = forward.lower(state, jnp.zeros((3, 80, 256))).compile().cost_analysis()
    xla = (cost[0] if isinstance(cost, list) else cost)["flops"]
    assert 0.9 < cfg.forward_flops(3) / xla < 1.02, (cfg.forward_flops(3), xla)


def test_logical_axes_frozen_positions_and_remat():
    cfg = WhisperConfig(num_mel_bins=16, hidden_size=16, intermediate_size=32, num_layers=2, num_heads=2,
                        max_source_positions=8)
    model = cfg.build(rngs=nnx.Rngs(0))
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        names = var.get_metadata().get("out_sharding")
        assert names is not None and len(names) == var.get_value().ndim, path
    x = jnp.asarray(np.random.RandomState(2).randn(2, 16, 16).astype(np.float32))
    grads = nnx.grad(lambda m: jnp.sum(m(x) ** 2))(model)
    assert not np.any(np.asarray(grads.embed_positions[...]))  # stored positions never train
    assert np.any(np.asarray(grads.conv1.kernel[...]))
    remat = WhisperConfig(**{**cfg.__dict__, "remat": True}).build(rngs=nnx.Rngs(0))
    np.testing.assert_allclose(np.asarray(last_hidden(model, x)), np.asarray(last_hidden(remat, x)),
                               atol=1e-6)

"""Whisper audio tower (HF `WhisperEncoder`) in Flax NNX: two GELU conv1d layers, the stored sinusoidal
positions, pre-LN blocks, a final LayerNorm.

Input is transformers' layout, log-mel features float[B, n_mels, 2 * max_source_positions] (Whisper: 80 or 128
bins x 3000 frames = 30 s; `data_pipeline.audio.log_mel_windows` makes them); the second conv halves the
frames, so one window gives float[B, max_source_positions, D]. Attribute names mirror HF's (`conv1`,
`embed_positions`, `layers[i].self_attn.q_proj`, `self_attn_layer_norm`, `fc1`, `final_layer_norm`,
`layer_norm`) so the key table below reads row by row. The positions are a parameter (checkpoints store them)
that never trains: HF freezes them, here they sit behind `stop_gradient`.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from data_pipeline.audio import FRAMES_PER_SECOND
from emollm_jax.models import layers
from emollm_jax.models.parts import AudioPreprocessing, AudioTowerConfig, KeyRow, audio_tower


@audio_tower("whisper")
@dataclasses.dataclass(frozen=True)
class WhisperConfig(AudioTowerConfig):
    """Whisper encoder hyper-parameters; defaults are whisper-base's. HF names: num_mel_bins, d_model,
    encoder_ffn_dim, encoder_layers, encoder_attention_heads, max_source_positions, activation_function.
    tiny 384/4/6, base 512/6/8, small 768/12/12, medium 1024/24/16, large 1280/32/20 (width/layers/heads;
    intermediate 4 x width); large-v3 reads 128 mel bins."""

    num_mel_bins: int = 80
    hidden_size: int = 512
    intermediate_size: int = 2048
    num_layers: int = 6
    num_heads: int = 8
    max_source_positions: int = 1500
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-5  # torch nn.LayerNorm's default, which Whisper uses (not in its config)
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat: bool = False

    logical_axes = ("audio_embed", "audio_mlp", "audio_heads", "audio_pos", "norm")
    hf_model_types = ("whisper",)
    # encoder-only (what save_hf writes), WhisperModel / WhisperForAudioClassification,
    # WhisperForConditionalGeneration
    hf_prefixes = ("", "encoder.", "model.encoder.")
    hf_probe_key = "conv1.weight"

    def check(self) -> None:
        if self.hidden_act not in layers.ACTIVATIONS:
            self.fail("hidden_act", f"supported: {sorted(layers.ACTIVATIONS)}")
        if self.hidden_size % self.num_heads:
            self.fail("hidden_size", f"not divisible by num_heads={self.num_heads}")
        if self.hidden_size % 2:
            self.fail("hidden_size", "must be even (sinusoidal positions pair sines with cosines)")
        for name in ("num_mel_bins", "num_layers", "max_source_positions", "intermediate_size"):
            if getattr(self, name) < 1:
                self.fail(name, "must be positive")

    @property
    def width(self) -> int:
        return self.hidden_size

    @property
    def n_mels(self) -> int:
        return self.num_mel_bins

    @property
    def mel_frames(self) -> int:
        return 2 * self.max_source_positions

    @property
    def frames_per_window(self) -> int:
        return self.max_source_positions

    @property
    def num_hidden_states(self) -> int:
        return self.num_layers + 1

    def build(self, *, rngs: nnx.Rngs) -> WhisperEncoder:
        return WhisperEncoder(self, rngs=rngs)

    def preprocessing(self) -> AudioPreprocessing:
        return AudioPreprocessing(self.num_mel_bins, self.mel_frames / FRAMES_PER_SECOND)

    def forward_flops(self, windows: int) -> float:
        """Matmul FLOPs of the two convs and the encoder layers for `windows` windows."""
        d, t = self.hidden_size, self.max_source_positions
        convs = 2.0 * 3 * self.num_mel_bins * d * self.mel_frames + 2.0 * 3 * d * d * t
        per_layer = 2.0 * t * (4 * d * d + 2 * d * self.intermediate_size) + 4.0 * t * t * d
        return windows * (convs + self.num_layers * per_layer)

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any], **overrides: Any) -> WhisperConfig:
        """A WhisperConfig dict (config.json of any Whisper checkpoint); missing keys take HF's defaults."""
        if hf.get("model_type", "whisper") not in cls.hf_model_types:
            raise ValueError(f"config model_type={hf.get('model_type')!r} is not a Whisper config")
        kwargs = dict(
            num_mel_bins=int(hf.get("num_mel_bins", 80)),
            hidden_size=int(hf.get("d_model", 384)),
            intermediate_size=int(hf.get("encoder_ffn_dim", 1536)),
            num_layers=int(hf.get("encoder_layers", 4)),
            num_heads=int(hf.get("encoder_attention_heads", 6)),
            max_source_positions=int(hf.get("max_source_positions", 1500)),
            hidden_act=hf.get("activation_function", "gelu"),
        )
        kwargs.update(overrides)
        return cls(**kwargs)

    def to_hf(self) -> dict[str, Any]:
        """config.json of the encoder-only directory `save_hf` writes, which transformers' `WhisperEncoder`
        loads with every key accounted for (a WhisperModel directory would need a decoder we do not have)."""
        return dict(
            architectures=["WhisperEncoder"],
            model_type="whisper",
            num_mel_bins=self.num_mel_bins,
            d_model=self.hidden_size,
            encoder_ffn_dim=self.intermediate_size,
            encoder_layers=self.num_layers,
            encoder_attention_heads=self.num_heads,
            max_source_positions=self.max_source_positions,
            activation_function=self.hidden_act,
            dtype=self.param_dtype,
        )

    def hf_key_table(self) -> list[KeyRow]:
        return list(HF_KEYS)

    def hf_ignore(self, hf: Mapping[str, Any]) -> list[str]:
        """The text decoder (and an audio classifier's head) beside the encoder: skipped on purpose, since the
        audio tower is the encoder alone (`load_hf` logs how many keys that was)."""
        return list(_BESIDE_THE_ENCODER)


L = "layers.{i}."
# HF key (after the checkpoint's prefix, one of `hf_prefixes`) -> our nnx.State path, hook. Linear weights are
# transposed, conv weights go [O, I, k] -> [k, I, O], LayerNorm `weight` is our `scale`; k_proj has no bias.
HF_KEYS: list[KeyRow] = [
    ("conv1.weight",                      "conv1.kernel",                        "conv"),
    ("conv1.bias",                        "conv1.bias",                          "none"),
    ("conv2.weight",                      "conv2.kernel",                        "conv"),
    ("conv2.bias",                        "conv2.bias",                          "none"),
    ("embed_positions.weight",            "embed_positions",                     "none"),
    (L + "self_attn_layer_norm.weight",   L + "self_attn_layer_norm.scale",      "none"),
    (L + "self_attn_layer_norm.bias",     L + "self_attn_layer_norm.bias",       "none"),
    (L + "self_attn.q_proj.weight",       L + "self_attn.q_proj.kernel",         "transpose"),
    (L + "self_attn.q_proj.bias",         L + "self_attn.q_proj.bias",           "none"),
    (L + "self_attn.k_proj.weight",       L + "self_attn.k_proj.kernel",         "transpose"),
    (L + "self_attn.v_proj.weight",       L + "self_attn.v_proj.kernel",         "transpose"),
    (L + "self_attn.v_proj.bias",         L + "self_attn.v_proj.bias",           "none"),
    (L + "self_attn.out_proj.weight",     L + "self_attn.out_proj.kernel",       "transpose"),
    (L + "self_attn.out_proj.bias",       L + "self_attn.out_proj.bias",         "none"),
    (L + "final_layer_norm.weight",       L + "final_layer_norm.scale",          "none"),
    (L + "final_layer_norm.bias",         L + "final_layer_norm.bias",           "none"),
    (L + "fc1.weight",                    L + "fc1.kernel",                      "transpose"),
    (L + "fc1.bias",                      L + "fc1.bias",                        "none"),
    (L + "fc2.weight",                    L + "fc2.kernel",                      "transpose"),
    (L + "fc2.bias",                      L + "fc2.bias",                        "none"),
    ("layer_norm.weight",                 "layer_norm.scale",                    "none"),
    ("layer_norm.bias",                   "layer_norm.bias",                     "none"),
]  # fmt: skip
# WhisperModel's `decoder.*`, WhisperForConditionalGeneration's `model.decoder.*` and `proj_out.weight` (tied
# to the token embedding), WhisperForAudioClassification's head.
_BESIDE_THE_ENCODER = [r"(model\.)?decoder\..*", re.escape("proj_out.weight"), r"projector\..*",
                       r"classifier\..*", "layer_weights"]


def sinusoids(length: int, channels: int, max_timescale: float = 10_000.0) -> np.ndarray:
    """float32[length, channels]: Whisper's positions, sines then cosines over geometric timescales (what a
    fresh HF model initialises `embed_positions` to; checkpoints store them)."""
    increment = np.log(max_timescale) / (channels // 2 - 1)
    inv = np.exp(-increment * np.arange(channels // 2, dtype=np.float32))
    scaled = np.arange(length, dtype=np.float32)[:, None] * inv[None, :]
    return np.concatenate([np.sin(scaled), np.cos(scaled)], axis=1).astype(np.float32)


def _dtypes(cfg: WhisperConfig) -> dict[str, Any]:
    return dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))


def _linear(cfg: WhisperConfig, n_in: int, n_out: int, names: tuple[str, str], rngs: nnx.Rngs, *,
            bias: bool = True) -> nnx.Linear:
    return layers.linear(n_in, n_out, names, rngs, bias=bias, **_dtypes(cfg))


def _layer_norm(cfg: WhisperConfig, rngs: nnx.Rngs) -> nnx.LayerNorm:
    return layers.layer_norm(cfg.hidden_size, cfg.layer_norm_eps, rngs, **_dtypes(cfg))


class WhisperAttention(nnx.Module):
    def __init__(self, cfg: WhisperConfig, *, rngs: nnx.Rngs):
        d = cfg.hidden_size
        self.num_heads = cfg.num_heads
        self.q_proj = _linear(cfg, d, d, ("audio_embed", "audio_heads"), rngs)
        self.k_proj = _linear(cfg, d, d, ("audio_embed", "audio_heads"), rngs, bias=False)
        self.v_proj = _linear(cfg, d, d, ("audio_embed", "audio_heads"), rngs)
        self.out_proj = _linear(cfg, d, d, ("audio_heads", "audio_embed"), rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, t, d = x.shape
        heads = lambda y: y.reshape(b, t, self.num_heads, d // self.num_heads)
        out = layers.dot_product_attention(heads(self.q_proj(x)), heads(self.k_proj(x)),
                                           heads(self.v_proj(x)), 0.0)
        return self.out_proj(out.reshape(b, t, d))


class WhisperEncoderLayer(nnx.Module):
    def __init__(self, cfg: WhisperConfig, *, rngs: nnx.Rngs):
        self.act = cfg.hidden_act
        self.self_attn_layer_norm = _layer_norm(cfg, rngs)
        self.self_attn = WhisperAttention(cfg, rngs=rngs)
        self.final_layer_norm = _layer_norm(cfg, rngs)
        self.fc1 = _linear(cfg, cfg.hidden_size, cfg.intermediate_size, ("audio_embed", "audio_mlp"), rngs)
        self.fc2 = _linear(cfg, cfg.intermediate_size, cfg.hidden_size, ("audio_mlp", "audio_embed"), rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.self_attn(self.self_attn_layer_norm(x))
        return x + self.fc2(layers.activation(self.act)(self.fc1(self.final_layer_norm(x))))


def _run_layer(layer: WhisperEncoderLayer, x: jax.Array) -> jax.Array:
    return layer(x)


class WhisperEncoder(nnx.Module):
    """HF `WhisperEncoder`: input_features float[B, n_mels, 2 * max_source_positions] -> the last hidden
    state float[B, max_source_positions, D] (`__call__`) or every depth (`hidden_states`)."""

    def __init__(self, config: WhisperConfig, *, rngs: nnx.Rngs):
        self.config = config
        d = config.hidden_size
        names = (None, "audio_embed")
        self.conv1 = layers.conv1d(config.num_mel_bins, d, 3, names, rngs, padding=1, **_dtypes(config))
        self.conv2 = layers.conv1d(d, d, 3, names, rngs, stride=2, padding=1, **_dtypes(config))
        positions = sinusoids(config.max_source_positions, d).astype(config.param_dtype)
        self.embed_positions = nnx.Param(jnp.asarray(positions), out_sharding=("audio_pos", "audio_embed"))
        self.layers = nnx.List([WhisperEncoderLayer(config, rngs=rngs) for _ in range(config.num_layers)])
        self.layer_norm = _layer_norm(config, rngs)

    def embed(self, input_features: jax.Array) -> jax.Array:
        """float[B, n_mels, T] -> float[B, T // 2, D]: conv1, GELU, conv2 (stride 2), GELU, + positions."""
        cfg = self.config
        if input_features.ndim != 3 or input_features.shape[1:] != (cfg.num_mel_bins, cfg.mel_frames):
            seconds = cfg.mel_frames / FRAMES_PER_SECOND
            raise ValueError(
                f"Whisper expects input_features float[B, {cfg.num_mel_bins}, {cfg.mel_frames}] (n_mels x "
                f"frames of one {seconds:g} s window), got {tuple(input_features.shape)}; pad or cut the "
                "sound into windows with data_pipeline.audio.log_mel_windows")
        gelu = layers.activation("gelu")
        x = jnp.swapaxes(input_features, 1, 2).astype(self.conv1.dtype)
        x = gelu(self.conv2(gelu(self.conv1(x))))
        return x + jax.lax.stop_gradient(self.embed_positions[...]).astype(x.dtype)[None]

    def hidden_states(self, input_features: jax.Array) -> tuple[jax.Array, ...]:
        """`num_layers + 1` arrays float[B, T // 2, D] as HF's `output_hidden_states`: the input of each
        layer, then the last layer's output after the final LayerNorm (= `__call__`'s result)."""
        x = self.embed(input_features)
        run = nnx.remat(_run_layer) if self.config.remat else _run_layer
        hidden = []
        for layer in self.layers:
            hidden.append(x)
            x = run(layer, x)
        hidden.append(self.layer_norm(x))
        return tuple(hidden)

    def __call__(self, input_features: jax.Array) -> jax.Array:
        return self.hidden_states(input_features)[-1]

"""CLIP vision transformer (HF `CLIPVisionModel`) in Flax NNX: pre-LN encoder, quick_gelu, class token.

Pixels are NHWC. Attribute names mirror HF (`embeddings.patch_embedding`,
`encoder.layers[i].self_attn.q_proj`, `layer_norm1`, `mlp.fc1`, `post_layernorm`, and HF's own spelling
`pre_layrnorm`) so the key map in `emollm_jax.convert.clip` reads as a table. All hidden states are
returned because LLaVA-style models read the penultimate layer and the MVP projector reads several.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from emollm_jax.models import dots
from emollm_jax.models.llama import dot_product_attention

_INIT = nnx.initializers.normal(stddev=0.02)
_ACTS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
}


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """CLIP vision tower hyper-parameters (HF `CLIPVisionConfig` names; `num_layers` = num_hidden_layers)."""

    image_size: int = 224
    patch_size: int = 16
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_layers: int = 12
    num_heads: int = 12
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"
    num_channels: int = 3
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat: bool = False

    def __post_init__(self):
        if self.hidden_act not in _ACTS:
            raise ValueError(f"VisionConfig.hidden_act={self.hidden_act!r}; supported: {sorted(_ACTS)}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size={self.hidden_size} not divisible by num_heads={self.num_heads}")

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any], **overrides: Any) -> VisionConfig:
        """Accepts a CLIPVisionConfig dict or a CLIPConfig dict (its `vision_config` is used)."""
        if "vision_config" in hf:
            hf = hf["vision_config"]
        if hf.get("model_type", "clip_vision_model") not in ("clip_vision_model", "clip"):
            raise ValueError(f"config model_type={hf.get('model_type')!r} is not a CLIP vision config")
        kwargs = dict(
            image_size=int(hf.get("image_size", 224)),
            patch_size=int(hf.get("patch_size", 32)),
            hidden_size=int(hf.get("hidden_size", 768)),
            intermediate_size=int(hf.get("intermediate_size", 3072)),
            num_layers=int(hf.get("num_hidden_layers", 12)),
            num_heads=int(hf.get("num_attention_heads", 12)),
            layer_norm_eps=float(hf.get("layer_norm_eps", 1e-5)),
            hidden_act=hf.get("hidden_act", "quick_gelu"),
            num_channels=int(hf.get("num_channels", 3)),
        )
        kwargs.update(overrides)
        return cls(**kwargs)

    def to_hf(self) -> dict[str, Any]:
        """A CLIPVisionConfig dict (config.json of a `CLIPVisionModel`)."""
        return dict(
            architectures=["CLIPVisionModel"],
            model_type="clip_vision_model",
            image_size=self.image_size,
            patch_size=self.patch_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            layer_norm_eps=self.layer_norm_eps,
            hidden_act=self.hidden_act,
            num_channels=self.num_channels,
            dtype=self.param_dtype,
        )


class VisionOutput(NamedTuple):
    """hidden_states: L+1 arrays float[N, 1+P, D] (0 = embeddings after pre_layrnorm, i = after layer i);
    last_hidden_state float[N, 1+P, D] (no final norm, as HF); pooler_output float[N, D]."""

    hidden_states: tuple[jax.Array, ...]
    last_hidden_state: jax.Array
    pooler_output: jax.Array


def resample_posemb(posemb: jax.Array, new_grid: int) -> jax.Array:
    """float[1+G*G, D] -> float[1+new_grid**2, D]: bilinear resize of the patch grid; class position kept.

    Used when running the tower at another resolution than its checkpoint (e.g. CLIP-L/14 224 -> 336).
    """
    cls_pos, grid = posemb[:1], posemb[1:]
    old = int(round(grid.shape[0] ** 0.5))
    if old * old != grid.shape[0]:
        raise ValueError(f"position embedding has {grid.shape[0]} patch rows, not a square grid")
    if old == new_grid:
        return posemb
    grid = grid.reshape(old, old, -1).astype(jnp.float32)
    grid = jax.image.resize(grid, (new_grid, new_grid, grid.shape[-1]), method="bilinear", antialias=False)
    return jnp.concatenate([cls_pos, grid.reshape(new_grid * new_grid, -1).astype(posemb.dtype)], axis=0)


def _dtypes(cfg: VisionConfig) -> dict[str, Any]:
    return dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))


def _linear(cfg: VisionConfig, n_in: int, n_out: int, names: tuple[str, str], rngs: nnx.Rngs) -> nnx.Linear:
    return nnx.Linear(
        n_in, n_out, **_dtypes(cfg), rngs=rngs,
        kernel_init=nnx.with_partitioning(_INIT, names),
        bias_init=nnx.with_partitioning(nnx.initializers.zeros, names[1:]),
        dot_general=dots.dot_general,
    )


def _layer_norm(cfg: VisionConfig, rngs: nnx.Rngs) -> nnx.LayerNorm:
    return nnx.LayerNorm(
        cfg.hidden_size, epsilon=cfg.layer_norm_eps, use_fast_variance=False, **_dtypes(cfg), rngs=rngs,
        scale_init=nnx.with_partitioning(nnx.initializers.ones, ("norm",)),
        bias_init=nnx.with_partitioning(nnx.initializers.zeros, ("norm",)),
    )


class CLIPVisionEmbeddings(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, rngs: nnx.Rngs):
        p, d = cfg.patch_size, cfg.hidden_size
        self.patch_embedding = nnx.Conv(
            cfg.num_channels, d, (p, p), strides=(p, p), padding="VALID", use_bias=False, **_dtypes(cfg),
            kernel_init=nnx.with_partitioning(_INIT, (None, None, None, "vit_embed")), rngs=rngs,
        )
        self.class_embedding = nnx.Param(
            _INIT(rngs.params(), (d,), jnp.dtype(cfg.param_dtype)), out_sharding=("vit_embed",)
        )
        self.position_embedding = nnx.Embed(
            cfg.num_patches + 1, d, **_dtypes(cfg), rngs=rngs,
            embedding_init=nnx.with_partitioning(_INIT, ("vit_pos", "vit_embed")),
        )

    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        """float[N, H, W, C] -> float[N, 1+P, D]."""
        x = self.patch_embedding(pixel_values.astype(self.patch_embedding.dtype))
        n, gh, gw, d = x.shape
        x = x.reshape(n, gh * gw, d)
        cls = jnp.broadcast_to(self.class_embedding[...].astype(x.dtype), (n, 1, d))
        x = jnp.concatenate([cls, x], axis=1)
        if x.shape[1] != self.position_embedding.num_embeddings:
            raise ValueError(
                f"{x.shape[1] - 1} patches from pixels {pixel_values.shape[1:3]}, but the position embedding "
                f"has {self.position_embedding.num_embeddings - 1}; resample it with resample_posemb"
            )
        return x + self.position_embedding.embedding[...].astype(x.dtype)[None]


class CLIPAttention(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, rngs: nnx.Rngs):
        d = cfg.hidden_size
        self.num_heads = cfg.num_heads
        self.q_proj = _linear(cfg, d, d, ("vit_embed", "vit_heads"), rngs)
        self.k_proj = _linear(cfg, d, d, ("vit_embed", "vit_heads"), rngs)
        self.v_proj = _linear(cfg, d, d, ("vit_embed", "vit_heads"), rngs)
        self.out_proj = _linear(cfg, d, d, ("vit_heads", "vit_embed"), rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        n, t, d = x.shape
        heads = lambda y: y.reshape(n, t, self.num_heads, d // self.num_heads)
        out = dot_product_attention(heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x)), 0.0)
        return self.out_proj(out.reshape(n, t, d))


class CLIPMLP(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, rngs: nnx.Rngs):
        self.act = cfg.hidden_act
        self.fc1 = _linear(cfg, cfg.hidden_size, cfg.intermediate_size, ("vit_embed", "vit_mlp"), rngs)
        self.fc2 = _linear(cfg, cfg.intermediate_size, cfg.hidden_size, ("vit_mlp", "vit_embed"), rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(_ACTS[self.act](self.fc1(x)))


class CLIPEncoderLayer(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, rngs: nnx.Rngs):
        self.layer_norm1 = _layer_norm(cfg, rngs)
        self.self_attn = CLIPAttention(cfg, rngs=rngs)
        self.layer_norm2 = _layer_norm(cfg, rngs)
        self.mlp = CLIPMLP(cfg, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, rngs: nnx.Rngs):
        self.layers = nnx.List([CLIPEncoderLayer(cfg, rngs=rngs) for _ in range(cfg.num_layers)])


def _run_layer(layer: CLIPEncoderLayer, x: jax.Array) -> jax.Array:
    return layer(x)


class CLIPVisionTransformer(nnx.Module):
    """HF `CLIPVisionModel.vision_model`: pixels float[N, H, W, C] -> `VisionOutput`."""

    def __init__(self, config: VisionConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.embeddings = CLIPVisionEmbeddings(config, rngs=rngs)
        self.pre_layrnorm = _layer_norm(config, rngs)
        self.encoder = CLIPEncoder(config, rngs=rngs)
        self.post_layernorm = _layer_norm(config, rngs)

    def __call__(self, pixel_values: jax.Array) -> VisionOutput:
        x = self.pre_layrnorm(self.embeddings(pixel_values))
        run = nnx.remat(_run_layer) if self.config.remat else _run_layer
        hidden = [x]
        for layer in self.encoder.layers:
            x = run(layer, x)
            hidden.append(x)
        return VisionOutput(tuple(hidden), x, self.post_layernorm(x[:, 0]))

"""CLIP vision tower (HF `CLIPVisionModel`) in Flax NNX: pre-LN encoder, quick_gelu, class token.

Pixels are NHWC. Attribute names mirror HF (`embeddings.patch_embedding`,
`encoder.layers[i].self_attn.q_proj`, `layer_norm1`, `mlp.fc1`, `post_layernorm`, and HF's own spelling
`pre_layrnorm`) so the HF key table below reads row by row. All hidden states are returned because
LLaVA-style models read the penultimate layer and the MVP projector reads several.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from emollm_jax import sharding
from emollm_jax.models import attention, layers, stack
from emollm_jax.models.parts import KeyRow, Preprocessing, TowerOutput, VisionTowerConfig, vision_tower

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@vision_tower("clip")
@dataclasses.dataclass(frozen=True)
class CLIPConfig(VisionTowerConfig):
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
    image_mode: str = "pad"  # pixels: "pad" (LLaVA-1.5's pad-to-square) or "crop" (CLIPImageProcessor)
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat: bool = False  # rematerialise each layer in the backward pass
    remat_policy: str = "full"  # with remat: what a layer keeps (models.stack.REMAT_POLICIES)
    scan_layers: bool = False  # one scanned layer over stacked params (models.stack) instead of a loop
    attention: str = "auto"  # auto | plain | blockwise | cudnn (models.attention)

    logical_axes = ("vit_embed", "vit_mlp", "vit_heads", "vit_pos", "norm", "layers")
    hf_model_types = ("clip_vision_model", "clip")
    hf_prefixes = ("", "vision_model.", "vision_tower.vision_model.", "vision_tower.")
    hf_probe_key = "embeddings.patch_embedding.weight"

    def check(self) -> None:
        if self.hidden_act not in layers.ACTIVATIONS:
            self.fail("hidden_act", f"supported: {sorted(layers.ACTIVATIONS)}")
        if self.hidden_size % self.num_heads:
            self.fail("hidden_size", f"not divisible by num_heads={self.num_heads}")
        if self.image_size % self.patch_size:
            self.fail("image_size", f"not a multiple of patch_size={self.patch_size}")
        if self.image_mode not in ("pad", "crop"):
            self.fail("image_mode", "expected 'pad' or 'crop'")
        if self.remat_policy not in stack.REMAT_POLICIES:
            self.fail("remat_policy", f"expected one of {tuple(stack.REMAT_POLICIES)}")
        if self.attention not in attention.IMPLEMENTATIONS:
            self.fail("attention", f"expected one of {attention.IMPLEMENTATIONS}")

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2

    @property
    def width(self) -> int:
        return self.hidden_size

    @property
    def num_prefix_tokens(self) -> int:
        return 1

    @property
    def num_hidden_states(self) -> int:
        return self.num_layers + 1

    def build(self, *, rngs: nnx.Rngs) -> CLIPVisionTransformer:
        return CLIPVisionTransformer(self, rngs=rngs)

    def preprocessing(self) -> Preprocessing:
        return Preprocessing(self.image_size, self.image_mode, CLIP_MEAN, CLIP_STD)

    def forward_flops(self, frames: int) -> float:
        """Patch embedding + encoder layers (full attention over P+1 tokens) for `frames` frames."""
        d = self.hidden_size
        tokens = self.num_patches + 1
        patch = 2.0 * (self.patch_size**2 * self.num_channels) * d * self.num_patches
        per_layer = 2.0 * tokens * (4 * d * d + 2 * d * self.intermediate_size) + 4.0 * tokens * tokens * d
        return frames * (patch + self.num_layers * per_layer)

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any], **overrides: Any) -> CLIPConfig:
        """Accepts a CLIPVisionConfig dict or a CLIPConfig dict (its `vision_config` is used)."""
        if "vision_config" in hf:
            hf = hf["vision_config"]
        if hf.get("model_type", "clip_vision_model") not in cls.hf_model_types:
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

    def hf_key_table(self) -> list[KeyRow]:
        return list(HF_KEYS)

    def hf_ignore(self, hf: Mapping[str, Any]) -> list[str]:
        """A CLIPModel directory also holds the text half: skipped on purpose (only the tower is built)."""
        whole = "CLIPModel" in (hf.get("architectures") or []) or hf.get("model_type") == "clip"
        return _CLIP_TEXT_HALF if whole else []


L = "encoder.layers.{i}."
# HF key (after the checkpoint's layout prefix, one of `hf_prefixes`) -> our nnx.State path, hook. Linear
# weights are transposed, the patch conv goes [O, I, kh, kw] -> [kh, kw, I, O], LayerNorm `weight` is our
# `scale`, and the position embedding is bilinearly resampled when the config's image_size differs from the
# file's. `embeddings.position_ids` (a buffer older transformers saved) is ignored.
HF_KEYS: list[KeyRow] = [
    ("embeddings.class_embedding",           "embeddings.class_embedding",               "none"),
    ("embeddings.patch_embedding.weight",    "embeddings.patch_embedding.kernel",        "conv"),
    ("embeddings.position_embedding.weight", "embeddings.position_embedding.embedding",  "posemb"),
    ("pre_layrnorm.weight",                  "pre_layrnorm.scale",                       "none"),
    ("pre_layrnorm.bias",                    "pre_layrnorm.bias",                        "none"),
    (L + "layer_norm1.weight",               L + "layer_norm1.scale",                    "none"),
    (L + "layer_norm1.bias",                 L + "layer_norm1.bias",                     "none"),
    (L + "self_attn.q_proj.weight",          L + "self_attn.q_proj.kernel",              "transpose"),
    (L + "self_attn.q_proj.bias",            L + "self_attn.q_proj.bias",                "none"),
    (L + "self_attn.k_proj.weight",          L + "self_attn.k_proj.kernel",              "transpose"),
    (L + "self_attn.k_proj.bias",            L + "self_attn.k_proj.bias",                "none"),
    (L + "self_attn.v_proj.weight",          L + "self_attn.v_proj.kernel",              "transpose"),
    (L + "self_attn.v_proj.bias",            L + "self_attn.v_proj.bias",                "none"),
    (L + "self_attn.out_proj.weight",        L + "self_attn.out_proj.kernel",            "transpose"),
    (L + "self_attn.out_proj.bias",          L + "self_attn.out_proj.bias",              "none"),
    (L + "layer_norm2.weight",               L + "layer_norm2.scale",                    "none"),
    (L + "layer_norm2.bias",                 L + "layer_norm2.bias",                     "none"),
    (L + "mlp.fc1.weight",                   L + "mlp.fc1.kernel",                       "transpose"),
    (L + "mlp.fc1.bias",                     L + "mlp.fc1.bias",                         "none"),
    (L + "mlp.fc2.weight",                   L + "mlp.fc2.kernel",                       "transpose"),
    (L + "mlp.fc2.bias",                     L + "mlp.fc2.bias",                         "none"),
    ("post_layernorm.weight",                "post_layernorm.scale",                     "none"),
    ("post_layernorm.bias",                  "post_layernorm.bias",                      "none"),
    ("embeddings.position_ids",              "",                                         "ignore"),
]  # fmt: skip
_CLIP_TEXT_HALF = [r"text_model\..*", r"text_projection\.weight", r"visual_projection\.weight", "logit_scale"]


def _dtypes(cfg: CLIPConfig) -> dict[str, Any]:
    return dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))


def _linear(cfg: CLIPConfig, n_in: int, n_out: int, names: tuple[str, str], rngs: nnx.Rngs) -> nnx.Linear:
    return layers.linear(n_in, n_out, names, rngs, **_dtypes(cfg))


def _layer_norm(cfg: CLIPConfig, rngs: nnx.Rngs) -> nnx.LayerNorm:
    return layers.layer_norm(cfg.hidden_size, cfg.layer_norm_eps, rngs, **_dtypes(cfg))


class CLIPVisionEmbeddings(nnx.Module):
    def __init__(self, cfg: CLIPConfig, *, rngs: nnx.Rngs):
        p, d = cfg.patch_size, cfg.hidden_size
        self.patch_embedding = nnx.Conv(
            cfg.num_channels, d, (p, p), strides=(p, p), padding="VALID", use_bias=False, **_dtypes(cfg),
            kernel_init=nnx.with_partitioning(layers.NORMAL_002, (None, None, None, "vit_embed")), rngs=rngs,
        )
        self.class_embedding = nnx.Param(
            layers.NORMAL_002(rngs.params(), (d,), jnp.dtype(cfg.param_dtype)), out_sharding=("vit_embed",)
        )
        self.position_embedding = nnx.Embed(
            cfg.num_patches + 1, d, **_dtypes(cfg), rngs=rngs,
            embedding_init=nnx.with_partitioning(layers.NORMAL_002, ("vit_pos", "vit_embed")),
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
                f"has {self.position_embedding.num_embeddings - 1}; resample it with layers.resample_posemb"
            )
        return x + self.position_embedding.embedding[...].astype(x.dtype)[None]


class CLIPAttention(nnx.Module):
    def __init__(self, cfg: CLIPConfig, *, rngs: nnx.Rngs):
        d = cfg.hidden_size
        self.num_heads = cfg.num_heads
        self.q_proj = _linear(cfg, d, d, ("vit_embed", "vit_heads"), rngs)
        self.k_proj = _linear(cfg, d, d, ("vit_embed", "vit_heads"), rngs)
        self.v_proj = _linear(cfg, d, d, ("vit_embed", "vit_heads"), rngs)
        self.out_proj = _linear(cfg, d, d, ("vit_heads", "vit_embed"), rngs)

    def __call__(self, x: jax.Array, mask: attention.AttentionMask) -> jax.Array:
        """x float[N, T, D]; `mask` prepared by the tower (full attention, the configured implementation)."""
        n, t, d = x.shape
        names = ("batch", "length", "vit_heads", None)

        def heads(y):
            return sharding.constrain(y.reshape(n, t, self.num_heads, d // self.num_heads), names)

        q, k, v = heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x))
        out = sharding.constrain(attention.attention(q, k.swapaxes(1, 2), v.swapaxes(1, 2), mask), names)
        return sharding.constrain(self.out_proj(out.reshape(n, t, d)), ("batch", "length", "vit_embed"))


class CLIPMLP(nnx.Module):
    def __init__(self, cfg: CLIPConfig, *, rngs: nnx.Rngs):
        self.act = cfg.hidden_act
        self.fc1 = _linear(cfg, cfg.hidden_size, cfg.intermediate_size, ("vit_embed", "vit_mlp"), rngs)
        self.fc2 = _linear(cfg, cfg.intermediate_size, cfg.hidden_size, ("vit_mlp", "vit_embed"), rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = sharding.constrain(layers.activation(self.act)(self.fc1(x)), ("batch", "length", "vit_mlp"))
        return sharding.constrain(self.fc2(h), ("batch", "length", "vit_embed"))


class CLIPEncoderLayer(nnx.Module):
    def __init__(self, cfg: CLIPConfig, *, rngs: nnx.Rngs):
        self.layer_norm1 = _layer_norm(cfg, rngs)
        self.self_attn = CLIPAttention(cfg, rngs=rngs)
        self.layer_norm2 = _layer_norm(cfg, rngs)
        self.mlp = CLIPMLP(cfg, rngs=rngs)

    def __call__(self, x: jax.Array, mask: attention.AttentionMask) -> jax.Array:
        x = x + self.self_attn(self.layer_norm1(x), mask)
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nnx.Module):
    def __init__(self, cfg: CLIPConfig, *, rngs: nnx.Rngs):
        # an nnx.List of layers, or one layer whose params are stacked [L, ...] (cfg.scan_layers)
        self.layers = stack.build(lambda: CLIPEncoderLayer(cfg, rngs=rngs), cfg.num_layers, cfg.scan_layers)


class CLIPVisionTransformer(nnx.Module):
    """HF `CLIPVisionModel.vision_model`: pixels float[N, H, W, C] -> `TowerOutput` (pooled = the class
    token after `post_layernorm`)."""

    def __init__(self, config: CLIPConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.embeddings = CLIPVisionEmbeddings(config, rngs=rngs)
        self.pre_layrnorm = _layer_norm(config, rngs)
        self.encoder = CLIPEncoder(config, rngs=rngs)
        self.post_layernorm = _layer_norm(config, rngs)

    def __call__(self, pixel_values: jax.Array) -> TowerOutput:
        cfg = self.config
        x = self.pre_layrnorm(self.embeddings(pixel_values))
        x = sharding.constrain(x, ("batch", "length", "vit_embed"))
        t = x.shape[1]
        mask = attention.prepare(attention.AttentionMask(), cfg.attention, dtype=cfg.dtype,
                                 head_dim=cfg.hidden_size // cfg.num_heads, t=t, s=t)

        def body(layer, x, i):
            x = layer(x, mask)
            return x, x

        out, per_layer = stack.run(self.encoder.layers, body, x, remat=cfg.remat, policy=cfg.remat_policy,
                                   collect=True)
        return TowerOutput((x, *per_layer), self.post_layernorm(out[:, 0]))

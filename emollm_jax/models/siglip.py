"""SigLIP vision tower (HF `SiglipVisionModel`) in Flax NNX: no class token, no pre-layernorm, gelu (tanh).

The encoder is CLIP's pre-LN block with other choices: the patch convolution has a bias, the position table
has one row per patch and no class row, there is no layer norm before the first block, the activation is
`gelu_pytorch_tanh`, LayerNorm eps is 1e-6, and the optional attention-pooling head (`use_head`, HF's
`vision_use_head`) pools the post-layernormed tokens with one learned probe. LLaVA-style models read a hidden
state (LLaVA-Interleave / OneVision: the last of 26 layers, every token) and never the head.

Pixels are NHWC, scaled to [-1, 1] (`Preprocessing`: plain resize to a square, mean = std = 0.5, as
`SiglipImageProcessor`). Attribute names mirror HF, so the key table below reads row by row.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from emollm_jax import sharding
from emollm_jax.models import attention, clip, layers, stack
from emollm_jax.models.parts import KeyRow, Preprocessing, TowerOutput, VisionTowerConfig, vision_tower

SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)
IMAGE_MODES = ("resize", "pad", "crop")


@vision_tower("siglip")
@dataclasses.dataclass(frozen=True)
class SiglipConfig(VisionTowerConfig):
    """SigLIP vision tower hyper-parameters (HF `SiglipVisionConfig` names; `num_layers` =
    num_hidden_layers, `use_head` = vision_use_head)."""

    image_size: int = 224
    patch_size: int = 16
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_layers: int = 12
    num_heads: int = 12
    layer_norm_eps: float = 1e-6
    hidden_act: str = "gelu_pytorch_tanh"
    num_channels: int = 3
    use_head: bool = True  # the attention-pooling head (pooled output); LLaVA checkpoints drop it
    image_mode: str = "resize"  # pixels: "resize" (SiglipImageProcessor), "pad" or "crop" (see media.py)
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat: bool = False  # rematerialise each layer in the backward pass
    remat_policy: str = "full"  # with remat: what a layer keeps (models.stack.REMAT_POLICIES)
    scan_layers: bool = False  # one scanned layer over stacked params (models.stack) instead of a loop
    attention: str = "auto"  # auto | plain | blockwise | cudnn (models.attention)

    logical_axes = ("vit_embed", "vit_mlp", "vit_heads", "vit_pos", "norm", "layers")
    hf_model_types = ("siglip_vision_model", "siglip")
    hf_prefixes = ("", "vision_model.", "vision_tower.vision_model.", "vision_tower.")
    hf_probe_key = "embeddings.patch_embedding.weight"

    def check(self) -> None:
        if self.hidden_act not in layers.ACTIVATIONS:
            self.fail("hidden_act", f"supported: {sorted(layers.ACTIVATIONS)}")
        if self.hidden_size % self.num_heads:
            self.fail("hidden_size", f"not divisible by num_heads={self.num_heads}")
        if self.image_size < self.patch_size:  # not a multiple is fine: so400m/14 at 384 px has 27x27 patches
            self.fail("image_size", f"smaller than one patch ({self.patch_size})")
        if self.image_mode not in IMAGE_MODES:
            self.fail("image_mode", f"expected one of {IMAGE_MODES}")
        if self.remat_policy not in stack.REMAT_POLICIES:
            self.fail("remat_policy", f"expected one of {tuple(stack.REMAT_POLICIES)}")
        if self.attention not in attention.IMPLEMENTATIONS:
            self.fail("attention", f"expected one of {attention.IMPLEMENTATIONS}")

    @property
    def grid_size(self) -> int:
        """Patches per side: the convolution drops a remainder (HF's `image_size // patch_size`)."""
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2

    @property
    def width(self) -> int:
        return self.hidden_size

    @property
    def num_prefix_tokens(self) -> int:
        return 0

    @property
    def num_hidden_states(self) -> int:
        return self.num_layers + 1

    def build(self, *, rngs: nnx.Rngs) -> SiglipVisionTransformer:
        return SiglipVisionTransformer(self, rngs=rngs)

    def preprocessing(self) -> Preprocessing:
        return Preprocessing(self.image_size, self.image_mode, SIGLIP_MEAN, SIGLIP_STD)

    def forward_flops(self, frames: int) -> float:
        """Patch embedding + encoder layers (full attention over P tokens) + the pooling head, if any."""
        d, f, p = self.hidden_size, self.intermediate_size, self.num_patches
        patch = 2.0 * (self.patch_size**2 * self.num_channels) * d * p
        per_layer = 2.0 * p * (4 * d * d + 2 * d * f) + 4.0 * p * p * d
        # head: k/v over P tokens, q/out/MLP on the one probe, probe-to-patch attention
        head = 2.0 * p * 2 * d * d + 2.0 * (2 * d * d + 2 * d * f) + 4.0 * p * d if self.use_head else 0.0
        return frames * (patch + self.num_layers * per_layer + head)

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any], **overrides: Any) -> SiglipConfig:
        """Accepts a SiglipVisionConfig dict or a SiglipConfig dict (its `vision_config` is used)."""
        if "vision_config" in hf:
            hf = hf["vision_config"]
        if hf.get("model_type", "siglip_vision_model") not in cls.hf_model_types:
            raise ValueError(f"config model_type={hf.get('model_type')!r} is not a SigLIP vision config")
        for key in ("image_size", "patch_size"):
            if isinstance(hf.get(key), list | tuple):
                sizes = set(hf[key])
                if len(sizes) != 1:
                    raise ValueError(f"config {key}={hf[key]}: only square images and patches are supported")
                hf = {**hf, key: sizes.pop()}
        kwargs = dict(
            image_size=int(hf.get("image_size", 224)),
            patch_size=int(hf.get("patch_size", 16)),
            hidden_size=int(hf.get("hidden_size", 768)),
            intermediate_size=int(hf.get("intermediate_size", 3072)),
            num_layers=int(hf.get("num_hidden_layers", 12)),
            num_heads=int(hf.get("num_attention_heads", 12)),
            layer_norm_eps=float(hf.get("layer_norm_eps", 1e-6)),
            hidden_act=hf.get("hidden_act", "gelu_pytorch_tanh"),
            num_channels=int(hf.get("num_channels", 3)),
            use_head=bool(hf.get("vision_use_head", True)),
        )
        kwargs.update(overrides)
        return cls(**kwargs)

    def to_hf(self) -> dict[str, Any]:
        """A SiglipVisionConfig dict (config.json of a `SiglipVisionModel`)."""
        return dict(
            architectures=["SiglipVisionModel"],
            model_type="siglip_vision_model",
            image_size=self.image_size,
            patch_size=self.patch_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            layer_norm_eps=self.layer_norm_eps,
            hidden_act=self.hidden_act,
            num_channels=self.num_channels,
            vision_use_head=self.use_head,
            dtype=self.param_dtype,
        )

    def hf_key_table(self) -> list[KeyRow]:
        """The encoder's rows, plus the head's (or, without a head, rows skipping a checkpoint's head)."""
        if self.use_head:
            return HF_KEYS + HF_HEAD_KEYS
        return HF_KEYS + [(hf, "", "ignore") for hf, _, _ in HF_HEAD_KEYS]

    def hf_ignore(self, hf: Mapping[str, Any]) -> list[str]:
        """A SiglipModel directory also holds the text half: skipped on purpose (only the tower is built)."""
        whole = "SiglipModel" in (hf.get("architectures") or []) or hf.get("model_type") == "siglip"
        return _SIGLIP_TEXT_HALF if whole else []


L = "encoder.layers.{i}."
# HF key (after the checkpoint's layout prefix, one of `hf_prefixes`) -> our nnx.State path, hook. Linear
# weights are transposed, the patch conv goes [O, I, kh, kw] -> [kh, kw, I, O], LayerNorm `weight` is our
# `scale`; the position table (no class row) is bilinearly resampled when image_size differs from the file's.
HF_KEYS: list[KeyRow] = [
    ("embeddings.patch_embedding.weight",    "embeddings.patch_embedding.kernel",        "conv"),
    ("embeddings.patch_embedding.bias",      "embeddings.patch_embedding.bias",          "none"),
    ("embeddings.position_embedding.weight", "embeddings.position_embedding.embedding",  "posemb"),
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
# The attention-pooling head (torch.nn.MultiheadAttention keeps q|k|v fused as in_proj [3D, D]: ours too).
HF_HEAD_KEYS: list[KeyRow] = [
    ("head.probe",                           "head.probe",                               "none"),
    ("head.attention.in_proj_weight",        "head.attention.in_proj.kernel",            "transpose"),
    ("head.attention.in_proj_bias",          "head.attention.in_proj.bias",              "none"),
    ("head.attention.out_proj.weight",       "head.attention.out_proj.kernel",           "transpose"),
    ("head.attention.out_proj.bias",         "head.attention.out_proj.bias",             "none"),
    ("head.layernorm.weight",                "head.layernorm.scale",                     "none"),
    ("head.layernorm.bias",                  "head.layernorm.bias",                      "none"),
    ("head.mlp.fc1.weight",                  "head.mlp.fc1.kernel",                      "transpose"),
    ("head.mlp.fc1.bias",                    "head.mlp.fc1.bias",                        "none"),
    ("head.mlp.fc2.weight",                  "head.mlp.fc2.kernel",                      "transpose"),
    ("head.mlp.fc2.bias",                    "head.mlp.fc2.bias",                        "none"),
]  # fmt: skip
_SIGLIP_TEXT_HALF = [r"text_model\..*", "logit_scale", "logit_bias"]


def _dtypes(cfg: SiglipConfig) -> dict[str, Any]:
    return dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))


def _linear(cfg: SiglipConfig, n_in: int, n_out: int, names: tuple[str, str], rngs: nnx.Rngs) -> nnx.Linear:
    return layers.linear(n_in, n_out, names, rngs, **_dtypes(cfg))


def _layer_norm(cfg: SiglipConfig, rngs: nnx.Rngs) -> nnx.LayerNorm:
    return layers.layer_norm(cfg.hidden_size, cfg.layer_norm_eps, rngs, **_dtypes(cfg))


class SiglipVisionEmbeddings(nnx.Module):
    def __init__(self, cfg: SiglipConfig, *, rngs: nnx.Rngs):
        p, d = cfg.patch_size, cfg.hidden_size
        self.patch_embedding = nnx.Conv(
            cfg.num_channels, d, (p, p), strides=(p, p), padding="VALID", use_bias=True, **_dtypes(cfg),
            kernel_init=nnx.with_partitioning(layers.NORMAL_002, (None, None, None, "vit_embed")),
            bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), ("vit_embed",)), rngs=rngs,
        )
        self.position_embedding = nnx.Embed(
            cfg.num_patches, d, **_dtypes(cfg), rngs=rngs,
            embedding_init=nnx.with_partitioning(layers.NORMAL_002, ("vit_pos", "vit_embed")),
        )

    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        """float[N, H, W, C] -> float[N, P, D]."""
        x = self.patch_embedding(pixel_values.astype(self.patch_embedding.dtype))
        n, gh, gw, d = x.shape
        x = x.reshape(n, gh * gw, d)
        if x.shape[1] != self.position_embedding.num_embeddings:
            raise ValueError(
                f"{x.shape[1]} patches from pixels {pixel_values.shape[1:3]}, but the position embedding has "
                f"{self.position_embedding.num_embeddings}; resample it with layers.resample_posemb"
            )
        return x + self.position_embedding.embedding[...].astype(x.dtype)[None]


class SiglipPoolingAttention(nnx.Module):
    """torch.nn.MultiheadAttention of one probe query over the tokens, q|k|v projections fused."""

    def __init__(self, cfg: SiglipConfig, *, rngs: nnx.Rngs):
        d = cfg.hidden_size
        self.num_heads = cfg.num_heads
        self.in_proj = _linear(cfg, d, 3 * d, ("vit_embed", "vit_heads"), rngs)
        self.out_proj = _linear(cfg, d, d, ("vit_heads", "vit_embed"), rngs)

    def __call__(self, probe: jax.Array, x: jax.Array) -> jax.Array:
        """probe float[N, 1, D], tokens float[N, P, D] -> float[N, 1, D]."""
        n, t, d = x.shape
        kernel, bias = self.in_proj.kernel[...], self.in_proj.bias[...]
        dh = d // self.num_heads

        def project(y: jax.Array, i: int) -> jax.Array:
            w, b = kernel[:, i * d:(i + 1) * d].astype(y.dtype), bias[i * d:(i + 1) * d].astype(y.dtype)
            return (y @ w + b).reshape(n, y.shape[1], self.num_heads, dh)

        out = layers.dot_product_attention(project(probe, 0), project(x, 1), project(x, 2), 0.0)
        return self.out_proj(out.reshape(n, 1, d))


class SiglipPoolingHead(nnx.Module):
    """HF `SiglipMultiheadAttentionPoolingHead`: probe attention, then a residual LayerNorm + MLP."""

    def __init__(self, cfg: SiglipConfig, *, rngs: nnx.Rngs):
        init = nnx.initializers.normal(stddev=1.0 / math.sqrt(cfg.hidden_size))
        self.probe = nnx.Param(init(rngs.params(), (1, 1, cfg.hidden_size), jnp.dtype(cfg.param_dtype)),
                               out_sharding=(None, None, "vit_embed"))
        self.attention = SiglipPoolingAttention(cfg, rngs=rngs)
        self.layernorm = _layer_norm(cfg, rngs)
        self.mlp = clip.CLIPMLP(cfg, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """float[N, P, D] (post-layernormed tokens) -> float[N, D]."""
        probe = jnp.broadcast_to(self.probe[...].astype(x.dtype), (x.shape[0], 1, x.shape[-1]))
        h = self.attention(probe, x)
        h = h + self.mlp(self.layernorm(h))
        return h[:, 0]


class SiglipVisionTransformer(nnx.Module):
    """HF `SiglipVisionModel`: pixels float[N, H, W, C] -> `TowerOutput` (hidden states before
    `post_layernorm`, as HF returns them; pooled = the head's output, None without a head)."""

    def __init__(self, config: SiglipConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.embeddings = SiglipVisionEmbeddings(config, rngs=rngs)
        # The encoder blocks are CLIP's (pre-LN, the configured activation): same parameter paths, scan,
        # remat policy, attention implementation and activation sharding.
        self.encoder = clip.CLIPEncoder(config, rngs=rngs)
        self.post_layernorm = _layer_norm(config, rngs)
        self.head = SiglipPoolingHead(config, rngs=rngs) if config.use_head else None

    def __call__(self, pixel_values: jax.Array) -> TowerOutput:
        cfg = self.config
        x = sharding.constrain(self.embeddings(pixel_values), ("batch", "length", "vit_embed"))
        t = x.shape[1]
        mask = attention.prepare(attention.AttentionMask(), cfg.attention, dtype=cfg.dtype,
                                 head_dim=cfg.hidden_size // cfg.num_heads, t=t, s=t)

        def body(layer, x, i):
            x = layer(x, mask)
            return x, x

        out, per_layer = stack.run(self.encoder.layers, body, x, remat=cfg.remat, policy=cfg.remat_policy,
                                   collect=True)
        pooled = self.head(self.post_layernorm(out)) if self.head is not None else None
        return TowerOutput((x, *per_layer), pooled)

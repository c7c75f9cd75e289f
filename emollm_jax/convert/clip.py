"""HF CLIPVisionModel (or the vision half of CLIPModel) <-> `emollm_jax.models.vit.CLIPVisionTransformer`.

Keys below are relative to a layout prefix P, detected from the file's key names (first that matches):
  ""                          CLIPVisionModel saved by transformers >= 5
  "vision_model."             CLIPVisionModel saved by transformers 4.x, and CLIPModel (vision half)
  "vision_tower.vision_model." LLaVA-era checkpoints that stored the tower under `vision_tower`
  "vision_tower."             transformers-5 Llava files (the tower without `vision_model.`)

The key map is the `_ROWS` table below (HF key after P, our nnx.State path, hook); `{i}` is the layer index.
Linear weights are transposed, the patch conv goes [O, I, kh, kw] -> [kh, kw, I, O], LayerNorm `weight` is
our `scale`, and the position embedding is bilinearly resampled when the config's image_size differs from
the file's (`resample_posemb`).

Ignored on load: `P + embeddings.position_ids` (a buffer older transformers saved). Only when the directory is
a CLIPModel (architectures CLIPModel / model_type "clip"): the text half `text_model.*`, `text_projection`,
`visual_projection` and `logit_scale` are skipped, since only the vision tower is built. In any other layout
they are unexpected keys and fail the load.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from flax import nnx

from emollm_jax.convert.core import CONV, NONE, TRANSPOSE, Family, Hook, KeyMap, find_prefix, register_family
from emollm_jax.convert.safetensors_io import CheckpointError
from emollm_jax.models.vit import CLIPVisionTransformer, VisionConfig, resample_posemb


def _resample(x: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    if x.shape == shape or x.ndim != 2 or x.shape[1] != shape[1]:
        return x  # equal, or a mismatch fill_model reports
    grid = int(round((shape[0] - 1) ** 0.5))
    return np.asarray(resample_posemb(x, grid))


POSEMB = Hook("resample_posemb", _resample, lambda x: x)

L = "encoder.layers.{i}."
_ROWS = [
    # HF key (after the layout prefix)       our state path                              hook
    ("embeddings.class_embedding",           "embeddings.class_embedding",               NONE),
    ("embeddings.patch_embedding.weight",    "embeddings.patch_embedding.kernel",        CONV),
    ("embeddings.position_embedding.weight", "embeddings.position_embedding.embedding",  POSEMB),
    ("pre_layrnorm.weight",                  "pre_layrnorm.scale",                       NONE),
    ("pre_layrnorm.bias",                    "pre_layrnorm.bias",                        NONE),
    (L + "layer_norm1.weight",               L + "layer_norm1.scale",                    NONE),
    (L + "layer_norm1.bias",                 L + "layer_norm1.bias",                     NONE),
    (L + "self_attn.q_proj.weight",          L + "self_attn.q_proj.kernel",              TRANSPOSE),
    (L + "self_attn.q_proj.bias",            L + "self_attn.q_proj.bias",                NONE),
    (L + "self_attn.k_proj.weight",          L + "self_attn.k_proj.kernel",              TRANSPOSE),
    (L + "self_attn.k_proj.bias",            L + "self_attn.k_proj.bias",                NONE),
    (L + "self_attn.v_proj.weight",          L + "self_attn.v_proj.kernel",              TRANSPOSE),
    (L + "self_attn.v_proj.bias",            L + "self_attn.v_proj.bias",                NONE),
    (L + "self_attn.out_proj.weight",        L + "self_attn.out_proj.kernel",            TRANSPOSE),
    (L + "self_attn.out_proj.bias",          L + "self_attn.out_proj.bias",              NONE),
    (L + "layer_norm2.weight",               L + "layer_norm2.scale",                    NONE),
    (L + "layer_norm2.bias",                 L + "layer_norm2.bias",                     NONE),
    (L + "mlp.fc1.weight",                   L + "mlp.fc1.kernel",                       TRANSPOSE),
    (L + "mlp.fc1.bias",                     L + "mlp.fc1.bias",                         NONE),
    (L + "mlp.fc2.weight",                   L + "mlp.fc2.kernel",                       TRANSPOSE),
    (L + "mlp.fc2.bias",                     L + "mlp.fc2.bias",                         NONE),
    ("post_layernorm.weight",                "post_layernorm.scale",                     NONE),
    ("post_layernorm.bias",                  "post_layernorm.bias",                      NONE),
]  # fmt: skip
PREFIXES = ("", "vision_model.", "vision_tower.vision_model.", "vision_tower.")
_CLIP_TEXT_HALF = [r"text_model\..*", r"text_projection\.weight", r"visual_projection\.weight", "logit_scale"]


def clip_key_map() -> KeyMap:
    """The table above at prefix "" (transformers-5 CLIPVisionModel); use `.with_prefix` for other layouts."""
    return KeyMap.table(_ROWS, [r"embeddings\.position_ids"])


def is_clip_model(hf: Mapping[str, Any]) -> bool:
    return "CLIPModel" in (hf.get("architectures") or []) or hf.get("model_type") == "clip"


def _key_map(config: VisionConfig, hf: Mapping[str, Any], keys: set[str]) -> KeyMap:
    prefix = find_prefix(keys, "embeddings.patch_embedding.weight", PREFIXES)
    if prefix is None:
        probes = [p + "embeddings.patch_embedding.weight" for p in PREFIXES]
        raise CheckpointError(f"no CLIP vision tower found: none of {probes} is in the checkpoint")
    km = clip_key_map().with_prefix(prefix)
    if is_clip_model(hf):
        km = km + KeyMap((), tuple(_CLIP_TEXT_HALF))
    return km


def _matches(hf: Mapping[str, Any], keys: set[str]) -> bool:
    archs = hf.get("architectures") or []
    is_clip = "CLIPVisionModel" in archs or hf.get("model_type") == "clip_vision_model" or is_clip_model(hf)
    return is_clip and find_prefix(keys, "embeddings.patch_embedding.weight", PREFIXES) is not None


def _build(config: VisionConfig, rngs: nnx.Rngs) -> CLIPVisionTransformer:
    return CLIPVisionTransformer(config, rngs=rngs)


CLIP_VISION = register_family(
    Family(
        name="clip_vision",
        matches=_matches,
        config_from_hf=VisionConfig.from_hf,
        build=_build,
        key_map=_key_map,
        to_hf_config=lambda model: model.config.to_hf(),
        export_map=lambda model: clip_key_map(),
        model_type=CLIPVisionTransformer,
    )
)

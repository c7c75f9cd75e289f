"""HF Llava (``LlavaForConditionalGeneration``) and original LLaVA checkpoints <-> `EmoLLM`.

An EmoLLM whose projector has an HF counterpart (``mlp2x_gelu``) is a LLaVA; its three parts map as the
parts' own key tables nested under layout prefixes detected from the file's key names. The tower and the
decoder are whichever registered parts the checkpoint's ``vision_config`` / ``text_config`` describe:

| part      | ours          | transformers 5 (`save_pretrained`) | llava-hf hub files (transformers 4.x)  |
|-----------|---------------|------------------------------------|----------------------------------------|
| decoder   | ``llm.``      | ``language_model.model.*``, ``language_model.lm_head.weight`` (both layouts)  |
| tower     | ``vision.``   | ``vision_tower.*``                 | ``vision_tower.vision_model.*``        |
| projector | ``projector.``| ``multi_modal_projector.linear_{1,2}.{weight,bias}`` (both layouts)          |

Also read: the in-memory naming some 4.5x versions wrote (``model.language_model.*`` + ``lm_head.weight``,
``model.vision_tower.*``, ``model.multi_modal_projector.*``). `save_hf` writes the transformers-5 layout.

Original LLaVA (haotian-liu/LLaVA: ``LlavaLlamaForCausalLM``) keeps a decoder checkpoint plus
``model.mm_projector.{0,2}.*`` (``model.mm_projector.*`` for the linear projector) and names its CLIP tower
in ``mm_vision_tower`` (a hub id); pass that tower's local directory to `load_llava_original`. Its prompts
mark images with the placeholder id -200 (LLaVA's IMAGE_TOKEN_INDEX), the default ``image_token_id`` here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flax import nnx

from emollm_jax.convert.core import Family, abstract_model, fill_model, read_hf_config
from emollm_jax.convert.keymap import KeyMap, find_prefix
from emollm_jax.convert.safetensors_io import CheckpointError, open_checkpoint
from emollm_jax.models import catalog  # noqa: F401  (registers the parts a checkpoint may name)
from emollm_jax.models.emollm import EmoLLM, EmoLLMConfig
from emollm_jax.models.parts import DECODERS, PROJECTORS, VISION_TOWERS, DecoderConfig, hf_part

LLAVA_IMAGE_TOKEN_INDEX = -200  # original LLaVA's placeholder id for an image in input_ids

# (decoder body prefix, lm_head key) pairs; the body prefix replaces the decoder table's leading "model.".
_LM_LAYOUTS = (
    ("language_model.model.", "language_model.lm_head.weight"),
    ("model.language_model.", "lm_head.weight"),
)
_VISION_PREFIXES = ("vision_tower.", "vision_tower.vision_model.", "model.vision_tower.",
                    "model.vision_tower.vision_model.")  # fmt: skip
_PROJECTOR_PREFIXES = ("multi_modal_projector.", "model.multi_modal_projector.")
# overrides that apply to both the tower and the decoder
_SHARED = ("dtype", "param_dtype", "remat", "remat_policy", "scan_layers", "attention")
# HF Llava's projector: LLaVA-1.5's two-layer MLP with GELU and biases.
_HF_PROJECTOR = "mlp2x_gelu"


# ----------------------------------------------------------------------------------------------- configs
def _split_overrides(overrides: Mapping[str, Any]) -> tuple[dict, dict, dict]:
    """(vision, text, EmoLLMConfig) overrides: dtype/param_dtype/remat go to both towers."""
    fields = {f.name for f in dataclasses.fields(EmoLLMConfig)}
    vision, text, top = {}, {}, {}
    for k, v in overrides.items():
        if k in _SHARED:
            if v is not None:
                vision[k] = text[k] = v
        elif k in fields:
            top[k] = v
        elif k == "image_size":
            vision[k] = v
        else:
            raise TypeError(f"unknown EmoLLM config override {k!r}; known: {sorted(fields | set(_SHARED))}")
    return vision, text, top


def _part(registry, hf: Mapping[str, Any], where: str):
    cls = hf_part(registry, hf)
    if cls is None:
        raise CheckpointError(f"config.json {where}.model_type={hf.get('model_type')!r}: no registered "
                              f"{registry.what} reads it (registered: {', '.join(registry.names())})")
    return cls


def _decoder_hf(text_config: Mapping[str, Any]) -> dict[str, Any]:
    return {"model_type": "llama", **text_config}  # old Llava configs leave the LLaMA text model_type out


def config_from_llava_hf(hf: Mapping[str, Any], **overrides: Any) -> EmoLLMConfig:
    """EmoLLMConfig of an HF ``LlavaForConditionalGeneration`` config dict (mlp2x_gelu projector).

    overrides: EmoLLMConfig fields, plus dtype / param_dtype / remat (both towers) and image_size (tower).
    """
    if hf.get("model_type", "llava") != "llava":
        raise CheckpointError(f"config.json model_type={hf.get('model_type')!r}; expected 'llava'")
    layer = hf.get("vision_feature_layer", -2)
    is_index = lambda i: isinstance(i, int) and not isinstance(i, bool)
    if not (is_index(layer) or isinstance(layer, list | tuple) and layer and all(map(is_index, layer))):
        raise CheckpointError(
            f"config.json vision_feature_layer={layer!r}: expected a layer index or a non-empty list of them"
        )
    strategy = hf.get("vision_feature_select_strategy", "default")
    if strategy not in ("default", "full"):
        raise CheckpointError(
            f"config.json vision_feature_select_strategy={strategy!r}: expected default|full"
        )
    if hf.get("projector_hidden_act", "gelu") != "gelu":
        raise CheckpointError(f"config.json projector_hidden_act={hf['projector_hidden_act']!r}: only 'gelu'")
    if not hf.get("multimodal_projector_bias", True):
        raise CheckpointError("config.json multimodal_projector_bias=false is not supported")
    vision_o, text_o, top = _split_overrides(overrides)
    text = _decoder_hf(hf["text_config"])
    if hf.get("tie_word_embeddings"):  # transformers ties a Llava's head when either config says so
        text["tie_word_embeddings"] = True
    kwargs: dict[str, Any] = dict(
        vision=_part(VISION_TOWERS, hf["vision_config"], "vision_config").from_hf(hf["vision_config"],
                                                                                 **vision_o),
        projector=PROJECTORS.get(_HF_PROJECTOR)(),
        text=_part(DECODERS, text, "text_config").from_hf(text, **text_o),
        image_token_id=int(hf.get("image_token_index", hf.get("image_token_id", 32000))),
        vision_feature_layer=layer if is_index(layer) else tuple(layer),
        vision_feature_select="patch" if strategy == "default" else "full",
    )
    kwargs.update(top)
    return EmoLLMConfig(**kwargs)


def config_to_llava_hf(cfg: EmoLLMConfig, *, image_token_in_vocab: bool = True) -> dict[str, Any]:
    """The HF Llava config.json dict of an EmoLLM with the mlp2x_gelu projector.

    image_token_in_vocab=False keeps an out-of-vocab placeholder (original LLaVA's -200): fine for our own
    params checkpoints, which `config_from_llava_hf` reads back, but not loadable by transformers.
    """
    if cfg.projector.kind != _HF_PROJECTOR:
        raise ValueError(
            f"projector kind {cfg.projector.kind!r} has no HF Llava counterpart ({_HF_PROJECTOR} only)"
        )
    if cfg.audio is not None:
        raise ValueError(f"HF Llava has no audio tower: export the {cfg.audio.kind} tower alone "
                         "(save_hf(model.audio, dir)), or keep this project's checkpoints, which hold every "
                         "part")
    if image_token_in_vocab and not 0 <= cfg.image_token_id < cfg.text.vocab_size:
        raise ValueError(f"image_token_id={cfg.image_token_id} must lie inside the vocab for HF Llava "
                         f"(vocab_size {cfg.text.vocab_size})")  # fmt: skip
    text, vision = cfg.text.to_hf(), cfg.vision.to_hf()
    text.pop("architectures", None)
    vision.pop("architectures", None)
    return dict(
        architectures=["LlavaForConditionalGeneration"],
        model_type="llava",
        text_config=text,
        vision_config=vision,
        image_token_index=cfg.image_token_id,
        vision_feature_layer=(cfg.vision_feature_layer if isinstance(cfg.vision_feature_layer, int)
                              else list(cfg.vision_feature_layer)),
        vision_feature_select_strategy="default" if cfg.vision_feature_select == "patch" else "full",
        projector_hidden_act="gelu",
        multimodal_projector_bias=True,
        image_seq_length=cfg.tokens_per_frame,
        tie_word_embeddings=cfg.text.tie_word_embeddings,
        dtype=cfg.text.param_dtype,
    )


# ----------------------------------------------------------------------------------------------- key maps
def decoder_map(text: DecoderConfig, body: str = "model.", head: str = "lm_head.weight",
                ours: str = "llm.") -> KeyMap:
    """The decoder's own table with its leading ``model.`` replaced by ``body`` and ``lm_head.weight`` by
    ``head``; our paths under ``ours``."""

    def rename(key: str) -> str:
        return head if key == "lm_head.weight" else body + key.removeprefix("model.")

    return KeyMap.table(text.hf_key_table()).rename_hf(rename).with_prefix("", ours)


def _detect(keys: set[str], probe: str, prefixes: tuple[str, ...], what: str) -> str:
    prefix = find_prefix(keys, probe, prefixes)
    if prefix is None:
        raise CheckpointError(
            f"no Llava {what} found: none of {[p + probe for p in prefixes]} in the checkpoint"
        )
    return prefix


def llava_key_map(
    config: EmoLLMConfig, hf: Mapping[str, Any] | None = None, keys: set[str] | None = None
) -> KeyMap:
    """The table for this checkpoint's layout (detected from ``keys``); transformers-5 layout without keys."""
    if keys is None:
        body, head = _LM_LAYOUTS[0]
        vision, proj = _VISION_PREFIXES[0], _PROJECTOR_PREFIXES[0]
    else:
        body = _detect(keys, "embed_tokens.weight", tuple(b for b, _ in _LM_LAYOUTS), "decoder")
        head = dict(_LM_LAYOUTS)[body]
        vision = _detect(keys, config.vision.hf_probe_key, _VISION_PREFIXES, "vision tower")
        proj = _detect(keys, "linear_1.weight", _PROJECTOR_PREFIXES, "projector")
    return (
        decoder_map(config.text, body, head)
        + KeyMap.table(config.vision.hf_key_table()).with_prefix(vision, "vision.")
        + KeyMap.table(config.projector.hf_key_table()).with_prefix(proj, "projector.")
    )


def llava_module_map(config: EmoLLMConfig) -> KeyMap:
    """Our paths -> the parameter names of transformers' ``LlavaForConditionalGeneration`` in memory
    (``model.language_model.*``, ``lm_head.weight``, ``model.vision_tower.*``,
    ``model.multi_modal_projector.*``): what PEFT adapter files are keyed by, while ``save_pretrained``
    writes the layout `llava_key_map` gives without keys."""
    body, head = _LM_LAYOUTS[1]
    return (
        decoder_map(config.text, body, head)
        + KeyMap.table(config.vision.hf_key_table()).with_prefix(_VISION_PREFIXES[2], "vision.")
        + KeyMap.table(config.projector.hf_key_table()).with_prefix(_PROJECTOR_PREFIXES[1], "projector.")
    )


def _matches(hf: Mapping[str, Any], keys: set[str]) -> bool:
    return (
        hf.get("model_type") == "llava"
        and find_prefix(keys, "linear_1.weight", _PROJECTOR_PREFIXES) is not None
    )


def _build(config: EmoLLMConfig, rngs: nnx.Rngs) -> EmoLLM:
    return EmoLLM(config, rngs=rngs)


LLAVA = Family(
    name="llava",
    matches=_matches,
    config_from_hf=config_from_llava_hf,
    build=_build,
    key_map=llava_key_map,
    to_hf_config=lambda model: config_to_llava_hf(model.config),
    export_map=lambda model: llava_key_map(model.config),
    handles=lambda model: isinstance(model, EmoLLM),
    is_lm=True,
)


# ------------------------------------------------------------------------------------------- original LLaVA
def _is_original(hf: Mapping[str, Any], keys: set[str]) -> bool:
    return any(k.startswith("model.mm_projector.") for k in keys)


def _needs_clip_dir(hf: Mapping[str, Any], **_: Any) -> Any:
    raise CheckpointError(
        f"original LLaVA checkpoint (mm_vision_tower={hf.get('mm_vision_tower')!r}): its CLIP tower lives in "
        "another directory; load it with emollm_jax.convert.llava.load_llava_original(path, clip_dir)"
    )


# Listed so `load_hf` on such a directory says what to do instead of "no converter".
LLAVA_ORIGINAL = Family(name="llava_original", matches=_is_original, config_from_hf=_needs_clip_dir,
                        build=_build, key_map=lambda *a: KeyMap(()))

_ORIGINAL_TEXT_TYPES = {
    "llava": "llama",
    "llava_llama": "llama",
    "llava_mistral": "mistral",
    "llava_qwen": "qwen2",
}


def config_from_llava_original(
    hf: Mapping[str, Any],
    clip_hf: Mapping[str, Any],
    *,
    image_token_id: int = LLAVA_IMAGE_TOKEN_INDEX,
    **overrides,
) -> EmoLLMConfig:
    """EmoLLMConfig from an original LLaVA config.json (decoder fields + ``mm_*``) and its tower's
    config.json."""
    kind = hf.get("mm_projector_type", "linear")
    if kind not in PROJECTORS or not hasattr(PROJECTORS.get(kind), "original_llava_key_table"):
        raise CheckpointError(f"config.json mm_projector_type={kind!r}: supported mlp2x_gelu, linear")
    select = hf.get("mm_vision_select_feature", "patch")
    if select not in ("patch", "cls_patch"):
        raise CheckpointError(f"config.json mm_vision_select_feature={select!r}: expected patch or cls_patch")
    model_type = hf.get("model_type", "llava_llama")
    if model_type not in _ORIGINAL_TEXT_TYPES:
        raise CheckpointError(
            f"config.json model_type={model_type!r}: expected one of {sorted(_ORIGINAL_TEXT_TYPES)}"
        )
    vision_o, text_o, top = _split_overrides(overrides)
    tower_hf = clip_hf.get("vision_config", clip_hf)
    vision = _part(VISION_TOWERS, tower_hf, "vision_config").from_hf(clip_hf, **vision_o)
    if hf.get("mm_hidden_size", vision.width) != vision.width:
        raise CheckpointError(f"config.json mm_hidden_size={hf['mm_hidden_size']} but the tower's "
                              f"hidden_size is {vision.width}: wrong clip_dir?")  # fmt: skip
    text = {**hf, "model_type": _ORIGINAL_TEXT_TYPES[model_type]}
    kwargs: dict[str, Any] = dict(
        vision=vision,
        projector=PROJECTORS.get(kind)(),
        text=_part(DECODERS, text, "model_type").from_hf(text, **text_o),
        image_token_id=image_token_id,
        vision_feature_layer=int(hf.get("mm_vision_select_layer", -2)),
        vision_feature_select="patch" if select == "patch" else "full",
    )
    kwargs.update(top)
    return EmoLLMConfig(**kwargs)


def load_llava_original(
    path: str | Path,
    clip_dir: str | Path,
    dtype: str | None = None,
    *,
    shardings: Any = None,
    image_token_id: int = LLAVA_IMAGE_TOKEN_INDEX,
    **overrides: Any,
) -> EmoLLM:
    """An original-LLaVA directory (decoder + ``model.mm_projector``) plus a local tower directory -> EmoLLM.

    Both sources are streamed into one abstract model with strict accounting: every key of either directory
    is used (or deliberately ignored) and every parameter is filled.
    """
    path, clip_dir = Path(path), Path(clip_dir)
    hf, clip_hf = read_hf_config(path), read_hf_config(clip_dir)
    if dtype is not None:
        overrides = {"dtype": dtype, "param_dtype": dtype, **overrides}
    config = config_from_llava_original(hf, clip_hf, image_token_id=image_token_id, **overrides)
    source, clip_source = open_checkpoint(path), open_checkpoint(clip_dir)
    projector_rows = config.projector.original_llava_key_table()
    lm_map = decoder_map(config.text) + KeyMap.table(projector_rows).with_prefix("model.mm_projector.",
                                                                                 "projector.")
    model = fill_model(abstract_model(LLAVA, config), source, lm_map, dtype=dtype, shardings=shardings,
                       where=str(path), partial=True)  # fmt: skip
    keys = set(clip_source.keys())
    prefix = _detect(keys, config.vision.hf_probe_key, config.vision.hf_prefixes, "tower")
    tower_map = (KeyMap.table(config.vision.hf_key_table()).with_prefix(prefix, "vision.")
                 + KeyMap((), tuple(config.vision.hf_ignore(clip_hf))))
    return fill_model(model, clip_source, tower_map, dtype=dtype, shardings=shardings, where=str(clip_dir))

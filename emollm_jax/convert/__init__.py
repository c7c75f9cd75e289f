"""Hugging Face <-> emollm_jax conversion.

    from emollm_jax.convert import load_hf, save_hf
    model = load_hf("path/to/hf_dir", dtype="float32")   # LlamaForCausalLM | CLIPVisionTransformer | ...
    save_hf(model, "path/to/out")                          # transformers.from_pretrained loads it

Checkpoints are streamed tensor by tensor with numpy (`safetensors_io`), mapped through a per-family key table
(`core.KeyMap`: rows of (HF key, our nnx.State path, hook)), and written into a model built abstractly with
`nnx.eval_shape` (no random init of big weights). Every checkpoint key must be consumed (or explicitly ignored
by the table) and every parameter filled, else `CheckpointError` names the keys; shape mismatches name the key
and both shapes. `shardings=` places each tensor on a mesh as it is read.

Registering another family (how `convert/llava.py` plugs in)
-----------------------------------------------------------
A family is a `core.Family`, registered with `core.register_family(...)` at import time of its module; later
registrations are tried first by `load_hf`, and `save_hf` dispatches on `Family.model_type` (isinstance).

    from emollm_jax.convert.core import Family, KeyMap, find_prefix, register_family, NONE, TRANSPOSE
    from emollm_jax.convert.llama import llama_key_map      # table at the checkpoint's top level
    from emollm_jax.convert.clip import clip_key_map, PREFIXES

    def key_map(config, hf_config, keys) -> KeyMap:        # choose the layout from the file's key names
        llm = llama_key_map(config.text).with_prefix("language_model.", "llm.")
        vit = clip_key_map().with_prefix("vision_tower.", "vision.")   # our path prefix = attribute name
        proj = KeyMap.table([("multi_modal_projector.linear_1.weight", "projector.<path>.kernel", TRANSPOSE),
                             ...])
        return llm + vit + proj

    register_family(Family(
        name="llava", matches=lambda hf, keys: hf.get("model_type") == "llava",
        config_from_hf=EmoLLMConfig_from_hf, build=lambda cfg, rngs: EmoLLM(cfg, rngs=rngs),
        key_map=key_map, to_hf_config=..., export_map=..., model_type=EmoLLM, is_lm=True))

Helpers: `KeyMap.with_prefix(hf_prefix, ours_prefix)` nests a table; `KeyMap + KeyMap` concatenates;
`KeyMap((), ignore=(regex, ...))` skips keys on purpose; `find_prefix(keys, probe, candidates)` detects a
layout; `Hook(name, load=(hf_array, target_shape) -> ours, save=ours -> hf_array)` for odd tensors (`NONE`,
`TRANSPOSE`, `CONV`, `clip.POSEMB` exist). For a layout spread over two directories (original LLaVA: the LM +
`model.mm_projector.{0,2}.*` in one dir, CLIP in another), build the abstract model with
`core.abstract_model(family, config)` and call `core.fill_model` once per source with a key map covering only
that source's parameters, via `fill_model(..., partial=True)` on all but the last call.

CLI: `python -m emollm_jax.convert --hf_dir DIR --out DIR [--dtype bfloat16]` writes an orbax checkpoint
(see `__main__`); add `--to_hf` to write an HF directory instead.
"""

from emollm_jax.convert import clip as _clip  # noqa: F401  (registers the CLIP vision family)
from emollm_jax.convert import llama as _llama  # noqa: F401  (registers the LLaMA family)
from emollm_jax.convert import llava as _llava  # noqa: F401  (registers the Llava / EmoLLM family)
from emollm_jax.convert.core import Family, KeyMap, load_hf, register_family
from emollm_jax.convert.export import save_hf
from emollm_jax.convert.safetensors_io import CheckpointError, open_checkpoint

__all__ = ["CheckpointError", "Family", "KeyMap", "load_hf", "open_checkpoint", "register_family", "save_hf"]

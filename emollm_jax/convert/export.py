"""Export our NNX models back to Hugging Face directories that `transformers.from_pretrained` loads, with
LoRA adapters merged into their kernels (`save_hf`) or alone in PEFT's layout (`save_peft`)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx
from safetensors.numpy import save_file

from data_pipeline import storage
from emollm_jax import lora
from emollm_jax.convert.core import path_str
from emollm_jax.convert.hf import family_of
from emollm_jax.convert.keymap import KeyMap
from emollm_jax.convert.llava import config_to_llava_hf, llava_module_map
from emollm_jax.convert.safetensors_io import AtomicDir, write_safetensors
from emollm_jax.models.emollm import EmoLLM

_GENERATION_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")


def hf_tensors(model: nnx.Module, dtype: str | None = None) -> Iterator[tuple[str, np.ndarray]]:
    """Yields (HF key, numpy array) for every parameter, one at a time (gathered to host if sharded); a
    scanned layer stack's parameter float[L, ...] gives its L HF tensors, one layer at a time. LoRA adapters
    are merged into the kernel they adapt (W + alpha / r * A B) and not written themselves."""
    fam = family_of(model)
    key_map = fam.export_map(model)
    updates = {path + ("kernel",): update for path, update in lora.adapters(model).items()}

    def host(x: jax.Array) -> np.ndarray:
        arr = np.asarray(jax.device_get(x))
        if dtype is not None and np.issubdtype(arr.dtype, np.floating):
            arr = arr.astype(np.dtype(dtype))
        return arr

    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        if isinstance(var, nnx.LoRAParam):
            continue
        ours, value = path_str(path), var.get_value()
        if path in updates:
            value = lora.merged_kernel(value, updates[path])
        try:
            hf_key, hook = key_map.to_hf(ours)
        except KeyError:
            pattern, hook = key_map.to_hf_stacked(ours)
            for i in range(value.shape[0]):
                yield pattern.replace("{i}", str(i)), hook.save(host(value[i]))
            continue
        yield hf_key, hook.save(host(value))


def save_hf(
    model: nnx.Module,
    path: str | Path,
    *,
    dtype: str | None = None,
    max_shard_bytes: int = 5 * 2**30,
    extra_config: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Writes config.json (+ generation_config.json for language models) and model.safetensors (sharded with
    an index above `max_shard_bytes`) into `path`, atomically: a temp dir renamed into place when complete.
    An existing non-empty `path` is replaced only with `overwrite` and only if this project wrote it
    (`emollm_jax.outdir`).

    dtype: tensor dtype on disk (default: the parameters' own). extra_config: keys merged into config.json
    (e.g. bos/eos/pad token ids, which our configs do not carry; they also go to generation_config.json).
    """
    fam = family_of(model)
    config = dict(fam.to_hf_config(model))
    if dtype is not None:
        config["dtype"] = dtype
    config.update(extra_config or {})
    with AtomicDir(path, writer="emollm_jax.convert.save_hf", overwrite=overwrite) as tmp:
        write_safetensors(hf_tensors(model, dtype), tmp, max_shard_bytes=max_shard_bytes)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        if fam.is_lm:
            gen = {"_from_model_config": True, **{k: config[k] for k in _GENERATION_KEYS if k in config}}
            (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    return storage.path(path)


# ------------------------------------------------------------------------------------------------- PEFT
PEFT_WEIGHTS, PEFT_CONFIG = "adapter_model.safetensors", "adapter_config.json"


def _peft_target(model: nnx.Module) -> tuple[nnx.Module, KeyMap, str | None]:
    """(the module whose adapters are written, our path -> HF parameter name, PEFT task type): a whole
    `LlavaForConditionalGeneration` when `save_hf(model)` can write one, else the decoder alone."""
    if not isinstance(model, EmoLLM):
        return model, family_of(model).export_map(model), "CAUSAL_LM"
    try:
        config_to_llava_hf(model.config)
        return model, llava_module_map(model.config), None
    except ValueError as why:
        tower = [p for p in lora.adapters(model) if p[0] == "vision"]
        if tower:
            raise ValueError(f"this EmoLLM has no HF Llava form ({why}); its decoder's adapters can be "
                             f"written for the decoder alone, but not the vision tower's "
                             f"({'/'.join(map(str, tower[0]))}, ...)") from None
        return model.llm, family_of(model.llm).export_map(model.llm), "CAUSAL_LM"


def _module_pattern(modules: list[str]) -> str:
    """A regex PEFT matches (re.fullmatch) against exactly these module names, layer indices generalised:
    "model.layers.0.self_attn.q_proj" -> model\\.layers\\.\\d+\\.self_attn\\.q_proj."""
    patterns = dict.fromkeys(r"\.".join(r"\d+" if part.isdigit() else re.escape(part)
                                          for part in name.split(".")) for name in modules)
    return "(?:" + "|".join(patterns) + ")"


def save_peft(model: nnx.Module, path: str | Path, *, dtype: str | None = None,
              base_model: str | None = None, overwrite: bool = False) -> Path:
    """Writes `model`'s LoRA adapters alone in PEFT's layout, atomically: `adapter_config.json` and
    `adapter_model.safetensors` (`base_model.model.<module>.lora_A.weight` float[r, in], `lora_B.weight`
    float[out, r]), which `peft.PeftModel.from_pretrained` loads onto the HF model `save_hf` writes of the
    same model without adapters: a `LlavaForConditionalGeneration` when the projector has an HF form
    (mlp2x_gelu), else the decoder alone (a `...ForCausalLM`; tower adapters then have no place). Only the
    adapters are written: parameters a stage trained beside them (a projector) need `save_hf`. An existing
    non-empty `path` is only replaced with `overwrite` and when this project wrote it (`outdir`)."""
    target, module_map, task_type = _peft_target(model)
    updates = lora.adapters(target)
    if not updates:
        raise ValueError(f"{type(model).__name__} has no LoRA adapters to export (config.lora.rank is 0)")
    tensors: dict[str, np.ndarray] = {}
    modules = []
    for module_path, update in updates.items():
        hf_key, _ = module_map.to_hf(path_str(module_path + ("kernel",)))
        module = hf_key.removesuffix(".weight")
        modules.append(module)
        for name, value in (("lora_A", update.a), ("lora_B", update.b)):
            arr = np.asarray(jax.device_get(value[...])).T
            tensors[f"base_model.model.{module}.{name}.weight"] = arr.astype(np.dtype(dtype or arr.dtype))
    first = next(iter(updates.values()))
    rank = int(first.a[...].shape[1])
    config = {
        "peft_type": "LORA", "task_type": task_type, "base_model_name_or_path": base_model,
        "r": rank, "lora_alpha": first.scale * rank, "lora_dropout": first.dropout,
        "target_modules": _module_pattern(modules), "bias": "none", "fan_in_fan_out": False,
        "inference_mode": True, "init_lora_weights": True, "modules_to_save": None, "use_rslora": False,
        "use_dora": False,
    }
    with AtomicDir(path, writer="emollm_jax.convert.save_peft", overwrite=overwrite) as tmp:
        save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(tmp / PEFT_WEIGHTS),
                  metadata={"format": "pt"})
        (tmp / PEFT_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return storage.path(path)

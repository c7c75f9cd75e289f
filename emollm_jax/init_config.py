"""`config.init.*` -> the model config their checkpoints imply.

A pretrained decoder or tower brings its architecture in its own config (an HF `config.json`, or the
`hf_config.json` the conversion CLI writes): `resolve(config, init_from)` fills `config.model.text` (its
`kind` included: llama, mistral, qwen2, or any registered decoder) and `config.model.vision` from it, so
`--config.init.llm=/ckpt/Qwen2-7B` is the whole change to train another LLaMA-family decoder. Sources:
`init.hf` / `--init_from` (a Llava: both parts; a decoder or tower alone: that part), then `init.llm` and
`init.vision` (a later source wins, as when the weights are loaded). A path without such a config (an orbax
params checkpoint) fills nothing.

Which fields come from the checkpoint: those its part's HF config carries, i.e. that survive
`from_hf(to_hf(...))` (sizes, layer / head counts, head_dim, vocab_size, rope, norm eps, biases, tied
embeddings, sliding window, activation, image and patch size). Run choices HF configs do not carry (dtype,
param_dtype, remat, image_mode, ...) stay as configured.

"Given on the command line" means: the keys `configuration.apply_overrides` set, which it records in
`config.overrides` (every `--config.a.b=value` flag, `load_config(spec, overrides)`). Values the config file
sets, or code assigns, are defaults the checkpoint replaces. A given key the checkpoint also sets:
- the same value: nothing to do;
- another value with which the checkpoint's parameters keep their names and shapes (rope_scaling,
  max_position_embeddings, rms_norm_eps, sliding_window, ...): the given value wins, and the log says so;
- another value that changes them (hidden_size, num_layers, vocab_size, attention_bias, kind=qwen2 for a
  LLaMA checkpoint, ...): refused with a `ConfigError` naming both values.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
from collections.abc import Mapping
from typing import Any

import ml_collections
from flax import nnx

from data_pipeline import storage
from emollm_jax.configuration import OVERRIDES_KEY, ConfigError, FieldError
from emollm_jax.models import catalog  # noqa: F401  (the parts a checkpoint may name)
from emollm_jax.models.parts import DECODERS, VISION_TOWERS, PartConfig, hf_part
from emollm_jax.pytree import flat_leaves
from emollm_jax.registry import Registry

log = logging.getLogger(__name__)

_REGISTRIES: dict[str, Registry] = {"text": DECODERS, "vision": VISION_TOWERS}
_CONFIG_FILES = ("config.json", "hf_config.json")  # an HF dir; the conversion CLI's output


def read_checkpoint_config(path: str | os.PathLike) -> tuple[dict[str, Any], str] | None:
    """(HF config dict, file it was read from) of a checkpoint directory, or None when it has none."""
    for name in _CONFIG_FILES:
        file = storage.path(path) / name
        if file.is_file():
            try:
                return json.loads(file.read_text()), str(file)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{file}:{e.lineno}: not valid JSON: {e.msg}") from None
    return None


def part_configs(hf: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    """The HF configs of the parts a checkpoint config describes: {"text": ..., "vision": ...} for a Llava,
    one of them for a decoder or tower alone, {} for anything no registered part reads."""
    if hf.get("model_type") == "llava":
        return {"text": {"model_type": "llama", **hf.get("text_config", {})},
                "vision": hf.get("vision_config", {})}
    return {name: hf for name, registry in _REGISTRIES.items() if hf_part(registry, hf) is not None}


def checkpoint_parts(config: ml_collections.ConfigDict,
                     init_from: str | None = None) -> dict[str, tuple[Mapping[str, Any], str]]:
    """block name ("text" / "vision") -> (its HF config, the file it was read from) over the run's sources."""
    sources = [init_from or config.init.hf, config.init.llm, config.init.vision]
    wanted = [("text", "vision"), ("text",), ("vision",)]
    out: dict[str, tuple[Mapping[str, Any], str]] = {}
    for path, blocks in zip(sources, wanted, strict=True):
        found = read_checkpoint_config(path) if path else None
        if found is None:
            continue
        hf, where = found
        for name, part_hf in part_configs(hf).items():
            if name in blocks:
                out[name] = (part_hf, where)
    return out


def resolve(config: ml_collections.ConfigDict, init_from: str | None = None) -> ml_collections.ConfigDict:
    """A copy of `config` whose `model.text` / `model.vision` blocks hold what the run's pretrained
    checkpoints say (see the module docstring); `config` itself when there is nothing to fill."""
    parts = checkpoint_parts(config, init_from)
    if not parts:
        return config
    out = copy.deepcopy(config)
    given = set(config.get(OVERRIDES_KEY, ()))
    for name, (hf, where) in parts.items():
        _fill_block(out.model[name], name, hf, where, given)
    return out


def _typed(block: ml_collections.ConfigDict, cls: type[PartConfig], where: str) -> PartConfig | None:
    """`block` read as a `cls` part (keys of other kinds left out; a "from the tokenizer" vocabulary gets a
    stand-in), or None when its values do not make one."""
    fields = {k: v for k, v in dict(block).items() if k in cls.field_names()}
    if "vocab_size" in fields and not int(fields["vocab_size"] or 0) > 0:
        fields["vocab_size"] = 1
    try:
        return cls.from_config(fields, where)
    except ConfigError:
        return None


def _carried(current: PartConfig | None, checkpoint: PartConfig) -> list[str]:
    """Fields of `checkpoint` that its HF config carries: those a `from_hf(to_hf(...))` round trip of the
    configured part keeps, or that it spells out where the configured value is None ("derived", e.g.
    head_dim). A run choice such as dtype comes back as its default, so it is not carried, unless it already
    is the default, where taking the checkpoint's value changes nothing."""
    names = [f.name for f in dataclasses.fields(checkpoint)]
    if current is None:
        return names
    try:
        back = type(current).from_hf(current.to_hf())
    except (NotImplementedError, ValueError, FieldError):
        return names
    return [n for n in names if not hasattr(current, n) or getattr(current, n) is None
            or getattr(back, n) == getattr(current, n)]


def param_shapes(part: PartConfig) -> dict[str, tuple[int, ...]]:
    """Parameter path -> shape of the module `part` builds (abstractly: no weights allocated)."""
    module = nnx.eval_shape(lambda: part.build(rngs=nnx.Rngs(0)))
    return {k: tuple(v.shape) for k, v in flat_leaves(nnx.state(module, nnx.Param)).items()}


def _with_given(checkpoint: PartConfig, registry: Registry, key: str, field: str, value: Any, hf: Mapping,
                where: str) -> PartConfig:
    """`checkpoint` with a given value for `field`, when the checkpoint's weights still fit it."""
    try:
        if field == "kind":
            other = registry.get(value).from_hf(hf)
        else:
            other = dataclasses.replace(checkpoint, **{field: value})
    except (FieldError, ValueError, KeyError) as e:
        raise ConfigError(f"config.{key}={value!r} (given) conflicts with {getattr(checkpoint, field)!r} in "
                          f"{where}: {e}") from None
    if other == checkpoint:
        return checkpoint
    if param_shapes(other) != param_shapes(checkpoint):
        mine = checkpoint.kind if field == "kind" else getattr(checkpoint, field)
        raise ConfigError(f"config.{key}={value!r} (given) conflicts with {field}={mine!r} in {where}: the "
                          "checkpoint's weights have other shapes with it")
    log.warning("config.%s=%r (given) replaces %r of %s", key, value,
                checkpoint.kind if field == "kind" else getattr(checkpoint, field), where)
    return other


def _fill_block(block: ml_collections.ConfigDict, name: str, hf: Mapping[str, Any], where: str,
                given: set[str]) -> None:
    """Writes the checkpoint's part config into `config.model.<name>`, given keys winning or refused."""
    registry = _REGISTRIES[name]
    cls = hf_part(registry, hf)
    try:
        checkpoint = cls.from_hf(hf)
    except (ValueError, FieldError) as e:
        raise ConfigError(f"{where}: its {registry.what} config is not supported: {e}") from None
    where_block = f"model.{name}"
    current = _typed(block, cls, where_block)
    if current is None and block.get("kind") in registry:
        current = _typed(block, registry.get(block.kind), where_block)
    carried = _carried(current, checkpoint)
    prefix = f"model.{name}."
    if prefix + "kind" in given and block.kind != checkpoint.kind:
        checkpoint = _with_given(checkpoint, registry, prefix + "kind", "kind", block.kind, hf, where)
    for field in carried:
        if prefix + field in given:
            value = block[field]
            value = value.to_dict() if isinstance(value, ml_collections.ConfigDict) else value
            checkpoint = _with_given(checkpoint, registry, prefix + field, field, value, hf, where)
    before = block.to_dict()
    block.kind = checkpoint.kind
    for field in carried:
        block[field] = getattr(checkpoint, field)
    if block.to_dict() != before:
        log.info("config.model.%s: the %s %s of %s", name, checkpoint.kind, registry.what, where)

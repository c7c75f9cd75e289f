"""Which family an HF directory is, and `load_hf`: every registered part alone, plus Llava composites.

A registered vision tower, audio tower or decoder (`emollm_jax.models.parts`) is loadable alone from its own
HF directory with no code here: its config class brings `from_hf`, its key table and the prefixes its keys
sit under. Composite layouts (Llava, original LLaVA) are `Family` objects in `convert.llava`;
`register_family` adds more. Matching tries composites first (newest registration first), then decoders,
then vision towers, then audio towers.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flax import nnx

from emollm_jax.convert.core import Family, abstract_model, fill_model, read_hf_config
from emollm_jax.convert.keymap import KeyMap, find_prefix
from emollm_jax.convert.llava import LLAVA, LLAVA_ORIGINAL
from emollm_jax.convert.safetensors_io import CheckpointError, open_checkpoint
from emollm_jax.models import catalog  # noqa: F401  (registers the shipped parts)
from emollm_jax.models.parts import AUDIO_TOWERS, DECODERS, VISION_TOWERS, PartConfig

log = logging.getLogger(__name__)
_COMPOSITES: list[Family] = [LLAVA_ORIGINAL, LLAVA]


def register_family(family: Family) -> Family:
    """Adds (or replaces, by name) a composite family; later registrations are tried first."""
    _COMPOSITES[:] = [f for f in _COMPOSITES if f.name != family.name]
    _COMPOSITES.insert(0, family)
    return family


def part_family(cls: type[PartConfig], *, is_lm: bool) -> Family:
    """The family of one registered part loaded alone (e.g. a CLIPVisionModel or a Qwen2ForCausalLM dir)."""

    def prefix(keys: set[str]) -> str | None:
        return find_prefix(keys, cls.hf_probe_key, cls.hf_prefixes)

    def key_map(config: PartConfig, hf: Mapping[str, Any], keys: set[str]) -> KeyMap:
        found = prefix(keys)
        if found is None:
            probes = [p + cls.hf_probe_key for p in cls.hf_prefixes]
            raise CheckpointError(f"no {cls.kind} weights found: none of {probes} is in the checkpoint")
        # hf_ignore names keys beside the part's (a CLIPModel's text half, a Whisper decoder), not under its
        # prefix
        beside = KeyMap((), tuple(config.hf_ignore(hf)))
        skipped = sorted(k for k in keys if any(re.fullmatch(p, k) for p in beside.ignore))
        if skipped:
            log.info("%s: loading the %s part alone; %d checkpoint keys beside it are skipped on purpose "
                     "(e.g. %s)", cls.kind, cls.kind, len(skipped), skipped[0])
        return KeyMap.table(config.hf_key_table()).with_prefix(found) + beside

    return Family(
        name=cls.kind,
        matches=lambda hf, keys: cls.hf_match(hf) and prefix(keys) is not None,
        config_from_hf=cls.from_hf,
        build=lambda config, rngs: config.build(rngs=rngs),
        key_map=key_map,
        to_hf_config=lambda model: model.config.to_hf(),
        export_map=lambda model: KeyMap.table(model.config.hf_key_table()),
        handles=lambda model: type(getattr(model, "config", None)) is cls,
        is_lm=is_lm,
    )


def families() -> list[Family]:
    """Every family `load_hf` and `save_hf` know, in matching order."""
    decoders = [part_family(cls, is_lm=True) for _, cls in reversed(tuple(DECODERS.items()))]
    towers = [part_family(cls, is_lm=False) for _, cls in reversed(tuple(VISION_TOWERS.items()))]
    audio = [part_family(cls, is_lm=False) for _, cls in reversed(tuple(AUDIO_TOWERS.items()))]
    return [*_COMPOSITES, *decoders, *towers, *audio]


def detect_family(hf_config: Mapping[str, Any], keys: set[str], where: str = "") -> Family:
    fams = families()
    for fam in fams:
        if fam.matches(hf_config, keys):
            return fam
    arch = hf_config.get("architectures"), hf_config.get("model_type")
    raise CheckpointError(f"{where}: no converter for architectures/model_type {arch}; known: "
                          f"{[f.name for f in fams]}")


def family_of(model: nnx.Module) -> Family:
    """The family `save_hf` writes `model` with."""
    for fam in families():
        if fam.export_map is not None and fam.handles(model):
            return fam
    raise TypeError(f"no HF exporter registered for {type(model).__name__}")


def load_hf(
    path: str | Path,
    dtype: str | None = None,
    *,
    shardings: Any = None,
    allow_pickle: bool = False,
    **config_overrides: Any,
) -> nnx.Module:
    """Loads an HF model directory into our NNX model (family detected from config.json and key names).

    dtype: parameter dtype (and compute dtype) for floating tensors, e.g. "bfloat16"; default float32.
    shardings: see `fill_model`. config_overrides: fields of our config (e.g. image_size=336 for a CLIP
    tower, which resamples the position embedding; remat=True).
    """
    path = Path(path)
    hf_config = read_hf_config(path)
    source = open_checkpoint(path, allow_pickle=allow_pickle)
    keys = set(source.keys())
    family = detect_family(hf_config, keys, str(path))
    if dtype is not None:
        config_overrides = {"dtype": dtype, "param_dtype": dtype, **config_overrides}
    config = family.config_from_hf(hf_config, **config_overrides)
    key_map = family.key_map(config, hf_config, keys)
    return fill_model(abstract_model(family, config), source, key_map, dtype=dtype, shardings=shardings,
                      where=str(path))

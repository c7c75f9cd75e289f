"""A run's whole config: each block parsed by the section of the module that reads it (field checks live
there), then the rules between blocks, before any work is done.

`validate_config(config, num_devices)` is what `main` and the tests call: it refuses the first problem with a
`ConfigError` naming the key (`config.stages.emotional.batch_size: ...`) and returns the resolved mesh shape.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, NoReturn

import ml_collections

from emollm_jax import sharding
from emollm_jax.configuration import ConfigError, Section
from emollm_jax.data import DataConfig
from emollm_jax.emoprompt import EmoPromptConfig
from emollm_jax.evaluate import EvalConfig
from emollm_jax.experiment import AUDIO_TOKEN_ID, InitConfig
from emollm_jax.lora import LoRAConfig
from emollm_jax.models.emollm import EmoLLMConfig
from emollm_jax.optim import StageConfig
from emollm_jax.plan import PlanConfig
from emollm_jax.train import TrainConfig

SECTIONS: dict[str, type[Section]] = {
    "data": DataConfig, "train": TrainConfig, "eval": EvalConfig, "plan": PlanConfig,
    "mesh": sharding.MeshConfig, "lora": LoRAConfig, "emoprompt": EmoPromptConfig, "init": InitConfig,
}


@dataclasses.dataclass(frozen=True)
class RunSections:
    """The typed blocks of a config; `model`'s decoder vocabulary is a stand-in when the config leaves it to
    the tokenizer (vocab_size 0)."""

    model: EmoLLMConfig
    data: DataConfig
    train: TrainConfig
    eval: EvalConfig
    plan: PlanConfig
    mesh: sharding.MeshConfig
    lora: LoRAConfig
    emoprompt: EmoPromptConfig
    init: InitConfig
    stages: Mapping[str, StageConfig]


def _fail(key: str, message: str) -> NoReturn:
    raise ConfigError(f"config.{key}: {message}")


def parse_sections(config: ml_collections.ConfigDict) -> RunSections:
    """Every block of `config` as its typed section: unknown keys and out-of-range values are refused."""
    blocks: dict[str, Any] = {}
    for key, cls in SECTIONS.items():
        if key not in config:
            _fail(key, f"missing block; {cls.__name__}.defaults() gives one")
        blocks[key] = cls.from_config(config[key], key)
    stages = {name: StageConfig.from_config(block, f"stages.{name}") for name, block in config.stages.items()}
    return RunSections(model=_model(config.model), **blocks, stages=stages)


def _model(m: ml_collections.ConfigDict) -> EmoLLMConfig:
    """The model block parsed by its parts' registered configs; "from the tokenizer" values (vocab 0, image
    token -1) get stand-ins, since no tokenizer is read before validation."""
    vocab = int(m.text.get("vocab_size", 0))
    image_id = int(m.get("image_token_id", -1))
    return EmoLLMConfig.from_config(m, vocab_size=vocab if vocab > 0 else 1,
                                    image_token_id=image_id if image_id != -1 else 0,
                                    audio_token_id=int(m.get("audio_token_id", AUDIO_TOKEN_ID)))


def validate_config(config: ml_collections.ConfigDict, num_devices: int) -> dict[str, int]:
    """Refuses nonsense before any work; returns the mesh shape resolved for `num_devices` devices."""
    sections = parse_sections(config)
    try:
        mesh = sharding.resolve_mesh_shape(dataclasses.asdict(sections.mesh), num_devices)
    except sharding.MeshShapeError as e:
        _fail(f"mesh.{e.axis}" if e.axis else "mesh", str(e))
    _check_stages(config, sections, mesh)
    _check_required_paths(config.variant, sections)
    return mesh


def _check_stages(config: ml_collections.ConfigDict, sections: RunSections, mesh: Mapping[str, int]) -> None:
    """The stages to run exist, their batches split over the data-parallel devices and accumulation steps,
    and the groups they train exist in the model."""
    if not config.stage_order:
        _fail("stage_order", "no stages to run")
    axes = sharding.batch_axes()
    dp = math.prod(mesh[a] for a in axes)
    for name in config.stage_order:
        if name not in sections.stages:
            _fail("stage_order", f"stage {name!r} is not in config.stages {sorted(sections.stages)}")
        s, key = sections.stages[name], f"stages.{name}"
        if s.batch_size % dp:
            _fail(f"{key}.batch_size", f"global batch {s.batch_size} is not divisible by the data-parallel "
                  f"size {dp} (mesh {' x '.join(axes)})")
        if s.batch_size % (dp * s.grad_accum):
            _fail(f"{key}.grad_accum", f"{s.grad_accum} does not split the per-shard batch of "
                  f"{s.batch_size // dp}")
        if "lora" in s.trainable and sections.lora.rank <= 0:
            _fail(f"{key}.trainable", "'lora' is trainable but config.lora.rank is 0")
        if "audio" in s.trainable and sections.model.audio is None:
            _fail(f"{key}.trainable", "'audio' is trainable but the model has no audio tower "
                  "(config.model.audio.kind='none')")


# configs/emobench.py variants that fine-tune pretrained checkpoints (the others start from random weights)
PRETRAINED_VARIANTS = ("vicuna7b", "qwen05b", "llama3_8b")


def _check_required_paths(variant: str, sections: RunSections) -> None:
    """The pretrained variants train real checkpoints on real data: they need the data, the tokenizer and
    weights."""
    if variant not in PRETRAINED_VARIANTS:
        return
    data, init = sections.data, sections.init
    if not data.root:
        _fail("data.root", f"{variant} trains on a real EmoBench copy: pass --config.data.root=<dir>")
    if not data.tokenizer and not (init.hf or init.llm):
        _fail("data.tokenizer", f"{variant} needs its decoder's tokenizer: pass --config.data.tokenizer or "
              "--config.init.llm")
    if not (init.hf or init.params or (init.llm and init.vision)):
        _fail("init.llm", f"{variant} needs weights: --config.init.llm and --config.init.vision (HF dirs), "
              "or --config.init.hf / --config.init.params")

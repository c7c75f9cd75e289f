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
from emollm_jax.experiment import InitConfig
from emollm_jax.lora import LoRAConfig
from emollm_jax.models.projectors import KINDS as PROJECTOR_KINDS
from emollm_jax.optim import StageConfig
from emollm_jax.plan import PlanConfig
from emollm_jax.train import TrainConfig

SECTIONS: dict[str, type[Section]] = {
    "data": DataConfig, "train": TrainConfig, "eval": EvalConfig, "plan": PlanConfig,
    "mesh": sharding.MeshConfig, "lora": LoRAConfig, "emoprompt": EmoPromptConfig, "init": InitConfig,
}


@dataclasses.dataclass(frozen=True)
class RunSections:
    """The typed blocks of a config (`config.model` is not among them yet)."""

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
    return RunSections(**blocks, stages=stages)


def validate_config(config: ml_collections.ConfigDict, num_devices: int) -> dict[str, int]:
    """Refuses nonsense before any work; returns the mesh shape resolved for `num_devices` devices."""
    sections = parse_sections(config)
    _check_model(config.model)
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


def _check_required_paths(variant: str, sections: RunSections) -> None:
    """vicuna7b trains a pretrained 7B model on real data: it needs the data, the tokenizer and weights."""
    if variant != "vicuna7b":
        return
    data, init = sections.data, sections.init
    if not data.root:
        _fail("data.root", "vicuna7b trains on a real EmoBench copy: pass --config.data.root=<dir>")
    if not data.tokenizer and not (init.hf or init.llm):
        _fail("data.tokenizer", "vicuna7b needs the Vicuna tokenizer: pass --config.data.tokenizer or "
              "--config.init.llm")
    if not (init.hf or init.params or (init.llm and init.vision)):
        _fail("init.llm", "vicuna7b needs weights: --config.init.llm and --config.init.vision (HF dirs), "
              "or --config.init.hf / --config.init.params")


_DTYPES = ("float32", "bfloat16", "float16")


def _check_model(m: ml_collections.ConfigDict) -> None:
    """Checks of `config.model.*`, kept here until the model's part configs (vision tower, projector,
    decoder) parse and check their own blocks; then this function becomes that parse."""
    if m.projector.kind not in PROJECTOR_KINDS:
        _fail("model.projector.kind", f"unknown projector {m.projector.kind!r}; expected {PROJECTOR_KINDS}")
    if m.projector.kind == "mvp":
        if not m.projector.perspectives:
            _fail("model.projector.perspectives", "MVP needs at least one perspective")
        if not 0.0 <= m.projector.tau <= 1.0 and "relation" in m.projector.perspectives:
            _fail("model.projector.tau", f"cosine threshold {m.projector.tau} is outside [0, 1]")
        for lvl in m.projector.levels:
            if not -m.vision.num_layers - 1 <= lvl <= m.vision.num_layers:
                _fail("model.projector.levels", f"level {lvl} is outside the {m.vision.num_layers}-layer ViT")
    if not -m.vision.num_layers - 1 <= m.vision_feature_layer <= m.vision.num_layers:
        _fail("model.vision_feature_layer",
              f"{m.vision_feature_layer} is outside the {m.vision.num_layers}-layer tower")
    if m.vision.image_size % m.vision.patch_size:
        _fail("model.vision.image_size", f"{m.vision.image_size} is not a multiple of patch_size "
              f"{m.vision.patch_size}")
    for tower in ("vision", "text"):
        for key in ("dtype", "param_dtype"):
            if m[tower][key] not in _DTYPES:
                _fail(f"model.{tower}.{key}", f"unknown dtype {m[tower][key]!r}; expected {_DTYPES}")
    if m.text.num_heads % m.text.num_kv_heads:
        _fail("model.text.num_kv_heads", f"{m.text.num_kv_heads} must divide num_heads={m.text.num_heads}")
    if m.text.hidden_size % m.text.num_heads:
        _fail("model.text.num_heads", f"{m.text.num_heads} does not divide hidden_size {m.text.hidden_size}")
    if m.video_pooling not in ("concat", "mean"):
        _fail("model.video_pooling", f"unknown pooling {m.video_pooling!r}; expected concat or mean")
    if m.vision_feature_select not in ("patch", "full"):
        _fail("model.vision_feature_select", f"unknown {m.vision_feature_select!r}; expected patch or full")

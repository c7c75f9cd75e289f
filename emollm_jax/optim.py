"""Per-stage optimizer: AdamW, warmup + cosine/constant schedule, clipping, accumulation, frozen groups.

Parameters fall into groups by where they live in EmoLLM (`vision`, `audio`, `projector` (both projectors),
`llm`; LoRA adapters anywhere form `lora`). A stage trains some groups and freezes the rest. Frozen groups
go through `optax.set_to_zero()` inside `optax.multi_transform`, so they get no Adam moments (`optax.masked`
would still allocate them) and are left out of the clipping norm. A tower's fixed parameters (`fixed_params`
of its config: Whisper's stored positions) are frozen in every stage: no update, no weight decay.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

from data_pipeline.records import TASKS
from emollm_jax.configuration import Section
from emollm_jax.models import catalog  # noqa: F401  (the shipped towers' fixed parameters)
from emollm_jax.models.parts import AUDIO_TOWERS
from emollm_jax.pytree import path_keys

GROUPS: tuple[str, ...] = ("vision", "audio", "projector", "llm", "lora")
SCHEDULES: tuple[str, ...] = ("cosine", "constant")
FIXED = "fixed"  # the group of parameters no stage trains
# EmoLLM attribute -> group: the audio projector trains with the vision projector (stage 1 aligns both).
_TOP_LEVEL = {"vision": "vision", "audio": "audio", "projector": "projector", "audio_projector": "projector",
              "llm": "llm"}


@dataclasses.dataclass(frozen=True, kw_only=True)
class StageConfig(Section):
    """`config.stages.<name>`: one training stage's data mixture, trainable groups, optimizer and length."""

    name: str
    tasks: tuple[str, ...]       # data mixture: records whose task is listed
    # a share of the stage's samples per task of `tasks` (replay earlier tasks at a chosen rate); empty: the
    # tasks' natural proportions in the training sources
    task_weights: tuple[float, ...] = ()
    trainable: tuple[str, ...]   # parameter groups updated in this stage; the others are frozen
    lr: float
    schedule: str = "cosine"     # cosine | constant
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    grad_clip: float = 1.0       # global norm over the trainable params; 0 = off
    grad_accum: int = 1          # micro-batches per optimizer update
    steps: int = 0               # > 0 wins over epochs
    epochs: float = 0.0
    batch_size: int              # global batch (all processes)

    def check(self) -> None:
        for field, names, known in (("trainable", self.trainable, GROUPS), ("tasks", self.tasks, TASKS)):
            unknown = [n for n in names if n not in known]
            if unknown or not names:
                what = f"unknown {unknown[0]!r}" if unknown else "empty"
                self.fail(field, f"{what}; expected a non-empty subset of {known}")
        if self.task_weights and (len(self.task_weights) != len(self.tasks)
                                  or not all(w > 0 for w in self.task_weights)):
            self.fail("task_weights", f"expected () or one positive weight per task of {self.tasks}")
        if not self.lr > 0:
            self.fail("lr", "must be positive")
        if self.schedule not in SCHEDULES:
            self.fail("schedule", f"unknown schedule; expected one of {SCHEDULES}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            self.fail("warmup_ratio", "must be in [0, 1)")
        if self.weight_decay < 0 or self.grad_clip < 0:
            self.fail("weight_decay" if self.weight_decay < 0 else "grad_clip", "must be >= 0")
        for field in ("b1", "b2"):
            if not 0.0 <= getattr(self, field) < 1.0:
                self.fail(field, "must be in [0, 1)")
        if self.steps < 0 or self.epochs < 0 or (self.steps == 0 and self.epochs == 0):
            self.fail("steps", "set steps > 0 or epochs > 0")
        if self.batch_size <= 0:
            self.fail("batch_size", "must be positive")
        if self.grad_accum < 1:
            self.fail("grad_accum", "must be >= 1")


def _fixed_audio_params() -> set[str]:
    """Dotted paths inside an audio tower that never train, over every registered audio tower kind."""
    return {name for _, cls in AUDIO_TOWERS.items() for name in cls.fixed_params}


def param_group(path: Sequence[Any]) -> str:
    """Group of the parameter at `path` (strings/ints or jax key-path entries).

    `('vision', ...)` -> vision, `('audio', ...)` -> audio, `('projector', ...)` and
    `('audio_projector', ...)` -> projector, any path through a `lora` adapter -> lora, an audio tower's
    fixed parameter (`('audio', 'embed_positions')` for Whisper) -> "fixed", everything else -> llm (so a
    bare LlamaForCausalLM, rooted at `model`/`lm_head`, is all "llm").
    """
    keys = path_keys(path)
    if "lora" in keys:
        return "lora"
    group = _TOP_LEVEL.get(keys[0], "llm") if keys else "llm"
    if group == "audio" and ".".join(str(k) for k in keys[1:]) in _fixed_audio_params():
        return FIXED
    return group


def trains_vision(trainable: Sequence[str], lora: Any = None) -> bool:
    """Whether a stage training the groups `trainable` updates a parameter inside the vision tower: the
    tower itself, or its LoRA adapters (`lora`: the model's `LoRAConfig` or None)."""
    return "vision" in trainable or ("lora" in trainable and bool(lora is not None and lora.vision_targets))


def group_labels(tree: Any) -> Any:
    """The same tree with every leaf replaced by its `param_group` name."""
    return jax.tree_util.tree_map_with_path(lambda p, _: param_group(p), tree)


def decay_mask(tree: Any) -> Any:
    """True for leaves that get weight decay: kernels and embedding tables (ndim >= 2), not norms, biases
    or fixed parameters."""
    return jax.tree_util.tree_map_with_path(
        lambda p, x: jnp.ndim(x) >= 2 and param_group(p) != FIXED, tree)


def lr_schedule(
    peak: float, total_steps: int, warmup_steps: int = 0, kind: str = "cosine", end_value: float = 0.0
) -> Callable[[jax.Array | int], jax.Array]:
    """lr(step): linear warmup 0 -> peak over `warmup_steps`, then cosine to `end_value` at `total_steps`
    (or constant). Steps count optimizer updates (after gradient accumulation)."""
    if kind not in SCHEDULES:
        raise ValueError(f"schedule={kind!r}: expected one of {SCHEDULES}")
    if total_steps <= 0 or not 0 <= warmup_steps <= total_steps:
        raise ValueError(
            f"schedule: need 0 <= warmup_steps ({warmup_steps}) <= total_steps ({total_steps}), "
            "total_steps > 0"
        )

    def lr(step):
        step = jnp.asarray(step, jnp.float32)
        warm = peak * step / max(warmup_steps, 1)
        if kind == "constant":
            after = jnp.asarray(peak, jnp.float32)
        else:
            progress = jnp.clip((step - warmup_steps) / max(total_steps - warmup_steps, 1), 0.0, 1.0)
            after = end_value + (peak - end_value) * 0.5 * (1.0 + jnp.cos(math.pi * progress))
        return jnp.where(step < warmup_steps, warm, after)

    return lr


@dataclasses.dataclass(frozen=True)
class Optimizer:
    """What the training loop needs: `tx` for init/update, `lr_fn(step)` for logging, the group split.

    With `grad_accum` > 1, `tx` holds an `optax.MultiSteps` in the trainable branch: call `tx.update` once per
    micro-batch; it applies the mean update every `grad_accum` calls and returns zeros in between.
    """

    tx: optax.GradientTransformation
    lr_fn: Callable[[jax.Array | int], jax.Array]
    trainable_groups: tuple[str, ...]
    grad_accum: int

    def labels(self, params: Any) -> Any:
        """Tree of "trainable" / "frozen" matching `params`."""
        return jax.tree.map(
            lambda g: "trainable" if g in self.trainable_groups else "frozen", group_labels(params)
        )

    def trainable_mask(self, params: Any) -> Any:
        return jax.tree.map(lambda g: g in self.trainable_groups, group_labels(params))


def _get(stage: Any, key: str, default: Any = None) -> Any:
    return stage.get(key, default)  # dict and ml_collections.ConfigDict alike


def make_optimizer(stage: Any, params: Any, total_steps: int) -> Optimizer:
    """Optimizer for one stage (ml_collections.ConfigDict or dict) over `params` (nnx.State or pytree).

    Stage keys: `trainable` (groups), `lr`, `schedule` ("cosine" | "constant"), `warmup_steps` or
    `warmup_ratio`, `weight_decay`, `b1`, `b2`, `eps`, `grad_clip` (global norm; 0 = off), `grad_accum`.
    `total_steps` counts optimizer updates of this stage.
    """
    trainable = tuple(_get(stage, "trainable", ()))
    unknown = [g for g in trainable if g not in GROUPS]
    if unknown or not trainable:
        what = f"unknown group {unknown[0]!r}" if unknown else "empty"
        raise ValueError(
            f"stage.trainable={list(trainable)}: {what}; expected a non-empty subset of {GROUPS}"
        )
    present = set(jax.tree.leaves(group_labels(params)))
    missing = [g for g in trainable if g not in present]
    if missing:
        raise ValueError(
            f"stage.trainable names group {missing[0]!r}, but no parameter belongs to it "
            f"(groups present: {sorted(present)})"
        )
    warmup = _get(stage, "warmup_steps", None)
    if warmup is None:
        warmup = int(round(float(_get(stage, "warmup_ratio", 0.0)) * total_steps))
    kind = str(_get(stage, "schedule", "cosine"))
    lr_fn = lr_schedule(float(_get(stage, "lr")), total_steps, int(warmup), kind)
    grad_accum = int(_get(stage, "grad_accum", 1))
    if grad_accum < 1:
        raise ValueError(f"stage.grad_accum={grad_accum}: must be >= 1")

    parts = []
    clip = float(_get(stage, "grad_clip", 0.0) or 0.0)
    if clip > 0:
        parts.append(optax.clip_by_global_norm(clip))
    parts.append(
        optax.adamw(
            lr_fn,
            b1=float(_get(stage, "b1", 0.9)),
            b2=float(_get(stage, "b2", 0.999)),
            eps=float(_get(stage, "eps", 1e-8)),
            weight_decay=float(_get(stage, "weight_decay", 0.0)),
            mask=decay_mask,
        )
    )
    inner = optax.chain(*parts)
    if grad_accum > 1:
        inner = optax.MultiSteps(inner, every_k_schedule=grad_accum)
    opt = Optimizer(tx=optax.identity(), lr_fn=lr_fn, trainable_groups=trainable, grad_accum=grad_accum)
    tx = optax.multi_transform({"trainable": inner, "frozen": optax.set_to_zero()}, opt.labels)
    return dataclasses.replace(opt, tx=tx)


def state_bytes(opt_state: Any) -> int:
    """Bytes held by an optimizer state (what freezing saves)."""
    leaves = [x for x in jax.tree.leaves(opt_state) if hasattr(x, "dtype")]
    return sum(x.size * jnp.dtype(x.dtype).itemsize for x in leaves)

"""LoRA adapters on an EmoLLM's projections (in place), their dropout, and merging them back for export.

`apply_lora` swaps each targeted `nnx.Linear` (matched by attribute name, e.g. `q_proj`) for a `LoRALinear`
that keeps the very same `kernel`/`bias` Params (so their state paths and checkpoints are unchanged) and adds
`lora.a: [in, r]`, `lora.b: [r, out]`: y = x W + b + (alpha / r) * dropout(x) A B. B starts at zero, so the
model's output is unchanged until training moves it. The adapters sit under a `lora` attribute, which is how
`emollm_jax.optim.param_group` puts them in the "lora" group.

`config.lora` (`LoRAConfig`) is applied by `apply_config` when a model is built (`experiment.new_model`,
which training, evaluation, prediction and the memory plan all use): the decoder's projections named in
`targets` (empty: the decoder's own `lora_targets`, q_proj and v_proj for the LLaMA family) and, when
`vision_targets` names some, the vision tower's. Dropout acts on the adapter's input during training only:
the train step gives every adapter its key (`set_dropout_key`); a model without keys (evaluation,
prediction, generation) applies none. In a scanned layer stack (`scan_layers`) a
targeted projection is one Linear whose kernel is stacked [L, in, out]; its adapters are stacked the same
way ([L, in, r], [L, r, out], leading logical axis `layers`), so each scanned layer reads its own row (and its
own dropout key).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from emollm_jax.configuration import Section


@dataclasses.dataclass(frozen=True)
class LoRAConfig(Section):
    """`config.lora`: adapters of rank `rank` (0 = none) scaled by alpha / rank, on the decoder projections
    named in `targets` (empty: the decoder's `lora_targets`) and the tower's named in `vision_targets`."""

    rank: int = 0
    alpha: float = 16.0
    targets: tuple[str, ...] = ()         # decoder projections, e.g. ("q_proj", "k_proj", "v_proj", "o_proj")
    vision_targets: tuple[str, ...] = ()  # vision tower projections, e.g. ("q_proj", "v_proj"); empty: none
    dropout: float = 0.0                  # on the adapters' input, training steps only

    def check(self) -> None:
        if self.rank < 0:
            self.fail("rank", "must be >= 0 (0: no adapters)")
        if not self.alpha > 0:
            self.fail("alpha", "must be positive")
        if not 0.0 <= self.dropout < 1.0:
            self.fail("dropout", "must be in [0, 1)")

    @property
    def enabled(self) -> bool:
        return self.rank > 0


class DropoutKey(nnx.Variable):
    """The PRNG key an adapter draws its dropout mask from in one training step."""


class LoRA(nnx.Module):
    """The low-rank update alone: float[..., in] -> float[..., out]."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        alpha: float,
        *,
        names: tuple[str | None, str | None] = (None, None),
        stack: tuple[tuple[int, str | None], ...] = (),
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        dropout: float = 0.0,
        rngs: nnx.Rngs,
    ):
        if rank <= 0:
            raise ValueError(f"LoRA rank={rank}: must be positive")
        self.scale = float(alpha) / rank
        self.dtype = dtype
        self.dropout = float(dropout)
        self.dropout_key: DropoutKey | None = None  # set by `set_dropout_key` inside a training step
        # A like a fresh nn.Linear (Kaiming-uniform, as peft does), B zero: the update starts at exactly zero.
        # `stack`: (size, logical name) of leading axes (a scanned layer stack), each row its own adapter.
        sizes, lead = tuple(n for n, _ in stack), tuple(name for _, name in stack)
        a_init = nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform",
                                                   batch_axis=tuple(range(len(sizes))))
        self.a = nnx.LoRAParam(
            a_init(rngs.params(), (*sizes, in_features, rank), param_dtype),
            out_sharding=(*lead, names[0], "lora_rank"),
        )
        self.b = nnx.LoRAParam(
            jnp.zeros((*sizes, rank, out_features), param_dtype), out_sharding=(*lead, "lora_rank", names[1])
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        dtype = self.dtype or jnp.result_type(x, self.a[...])
        a, b = self.a[...].astype(dtype), self.b[...].astype(dtype)
        x = x.astype(dtype)
        if self.dropout > 0 and self.dropout_key is not None:
            keep = jax.random.bernoulli(self.dropout_key[...], 1.0 - self.dropout, x.shape)
            x = jnp.where(keep, x / (1.0 - self.dropout), 0).astype(dtype)
        return (x @ a) @ b * jnp.asarray(self.scale, dtype)

    def delta(self) -> jax.Array:
        """float32[..., in, out]: the update folded into a kernel (stacked like the adapters)."""
        return (self.a[...].astype(jnp.float32) @ self.b[...].astype(jnp.float32)) * self.scale


def _copy_linear_fields(dst: nnx.Linear, src: nnx.Linear) -> None:
    """Take over `src`'s configuration and Params (public attributes; nnx's own bookkeeping is private)."""
    for name, value in vars(src).items():
        if not name.startswith("_") and name != "lora":
            setattr(dst, name, value)


class LoRALinear(nnx.Linear):
    """An `nnx.Linear` (same kernel/bias Params, same call) plus a `LoRA` update."""

    def __init__(self, base: nnx.Linear, rank: int, alpha: float, *, dropout: float = 0.0, rngs: nnx.Rngs):
        # Not calling nnx.Linear.__init__: that would allocate a new kernel; the base's is reused as is.
        _copy_linear_fields(self, base)
        shape = self.kernel[...].shape
        if len(shape) < 2:
            raise ValueError(f"LoRA needs a kernel [..., in, out], got {shape}")
        names = tuple(base.kernel.get_metadata().get("out_sharding") or (None,) * len(shape))
        self.lora = LoRA(
            shape[-2],
            shape[-1],
            rank,
            alpha,
            names=names[-2:],
            stack=tuple(zip(shape[:-2], names[:-2], strict=True)),
            dtype=self.dtype,
            param_dtype=jnp.float32,  # trained master weights, whatever the frozen kernel is stored in
            dropout=dropout,
            rngs=rngs,
        )

    def __call__(self, x: jax.Array, out_sharding: Any = None) -> jax.Array:
        y = super().__call__(x, out_sharding=out_sharding)
        return y + self.lora(x).astype(y.dtype)


def _targets(model: nnx.Module, targets: Sequence[str], kind: type) -> list[tuple]:
    return [
        path
        for path, node in nnx.iter_graph(model)
        if isinstance(node, kind) and path and path[-1] in targets
    ]


def _node(model: nnx.Module, path: tuple) -> Any:
    for key in path:
        model = model[key] if isinstance(key, int) else getattr(model, key)
    return model


def _swap(model: nnx.Module, path: tuple, new: nnx.Module) -> None:
    setattr(_node(model, path[:-1]), path[-1], new)


def apply_lora(
    model: nnx.Module, rank: int, alpha: float, targets: Sequence[str], rngs: nnx.Rngs, dropout: float = 0.0
) -> list[str]:
    """Wrap each `nnx.Linear` named in `targets` (e.g. ("q_proj", "v_proj")) in place; returns their paths."""
    targets = tuple(targets)
    already = _targets(model, targets, LoRALinear)
    if already:
        raise ValueError(f"apply_lora: {'/'.join(map(str, already[0]))} already has LoRA")
    paths = _targets(model, targets, nnx.Linear)
    if not paths:
        raise ValueError(f"apply_lora: no nnx.Linear named any of {targets} in {type(model).__name__}")
    for path in paths:
        _swap(model, path, LoRALinear(_node(model, path), rank, alpha, dropout=dropout, rngs=rngs))
    return ["/".join(map(str, p)) for p in paths]


def apply_config(model: Any, config: LoRAConfig, seed: int) -> list[str]:
    """Adds `config`'s adapters to an EmoLLM in place (nothing when rank is 0); returns their paths.

    The A matrices come from their own stream (seed folded with 1), so the base weights of a model built
    with adapters equal those of the same seed without them.
    """
    if not config.enabled:
        return []
    key = jax.random.fold_in(jax.random.key(seed), 1)
    kw = dict(rank=config.rank, alpha=config.alpha, dropout=config.dropout)
    targets = config.targets or model.config.text.lora_targets
    if not targets:
        raise ValueError(f"config.lora.targets is empty and the {model.config.text.kind} decoder declares "
                         "no lora_targets: name the projections to adapt")
    paths = ["llm/" + p for p in apply_lora(model.llm, targets=targets, rngs=nnx.Rngs(params=key), **kw)]
    if config.vision_targets:
        rngs = nnx.Rngs(params=jax.random.fold_in(key, 1))
        paths += ["vision/" + p for p in apply_lora(model.vision, targets=config.vision_targets, rngs=rngs,
                                                      **kw)]
    return paths


def adapters(model: nnx.Module) -> dict[tuple, LoRA]:
    """Path of each adapted `LoRALinear` (as in `nnx.iter_graph`) -> its `LoRA` update."""
    return {path: node.lora for path, node in nnx.iter_graph(model) if isinstance(node, LoRALinear)}


def has_adapters(model: nnx.Module) -> bool:
    return any(isinstance(node, LoRALinear) for _, node in nnx.iter_graph(model))


def set_dropout_key(model: nnx.Module, key: jax.Array) -> int:
    """Gives every adapter with dropout its own key folded from `key` (call inside a training step, on the
    model merged there); returns how many got one. Without a key an adapter applies no dropout."""
    mods = [node for _, node in nnx.iter_graph(model) if isinstance(node, LoRA) and node.dropout > 0]
    for i, mod in enumerate(mods):
        own = jax.random.fold_in(key, i)
        lead = mod.a[...].shape[:-2]  # a scanned stack's adapter: one key per layer, scanned with it
        if lead:
            own = jax.random.split(own, math.prod(lead)).reshape(lead)
        mod.dropout_key = nnx.data(DropoutKey(own))
    return len(mods)


def batch_key(seed: int, input_ids: jax.Array) -> jax.Array:
    """A step's dropout key: the run's seed folded with a hash of the batch's token ids int[B, T], so masks
    are deterministic under the seed, differ between batches and micro-batches, and are the same again when
    a resumed run replays a batch (no random state to checkpoint)."""
    ids = input_ids.astype(jnp.uint32)
    weights = jnp.arange(ids.size, dtype=jnp.uint32).reshape(ids.shape) * jnp.uint32(2654435761) + 1
    return jax.random.fold_in(jax.random.key(seed), jnp.sum(ids * weights, dtype=jnp.uint32))


def merged_kernel(kernel: jax.Array, update: LoRA) -> jax.Array:
    """kernel float[..., in, out] + alpha / r * A B, computed in float32, in the kernel's dtype."""
    return (kernel.astype(jnp.float32) + update.delta()).astype(kernel.dtype)


def merge_lora(model: nnx.Module) -> int:
    """Fold every adapter into its kernel (W + alpha/r * A B) and restore a plain `nnx.Linear`, in place.

    After this the model's state has exactly the paths it had before `apply_lora` (ready for `save_hf`).
    Returns the number of merged layers.
    """
    paths = [path for path, node in nnx.iter_graph(model) if isinstance(node, LoRALinear)]
    for path in paths:
        lora_linear = _node(model, path)
        kernel = lora_linear.kernel
        kernel[...] = merged_kernel(kernel[...], lora_linear.lora)
        plain = nnx.eval_shape(lambda: nnx.Linear(1, 1, rngs=nnx.Rngs(0)))  # shell; fields replaced below
        _copy_linear_fields(plain, lora_linear)
        _swap(model, path, plain)
    return len(paths)

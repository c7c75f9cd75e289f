"""The parts an EmoLLM is composed of: vision and audio towers, projectors and decoders, registered by name.

A part is its config class. Registered once (`@vision_tower("clip")` on the class), it declares in one place
everything the rest of the project needs to know about it:

- its config and the range checks of its fields (a frozen dataclass, `check()`);
- its HF config: `from_hf(hf)` / `to_hf()`, and `hf_model_types` (which config.json describes it);
- its module: `build(...)`; a vision tower maps pixels to a `TowerOutput`, an audio tower maps log-mel
  features to frame embeddings, a projector maps `VisualFeatures` to visual tokens, a decoder is a causal LM
  with `embed`, `logits` and the KV-cache call;
- what it offers or needs: a vision tower's `width`, `num_patches`, `num_prefix_tokens`,
  `num_hidden_states`; an audio tower's `width`, `n_mels`, `mel_frames`, `frames_per_window`,
  `num_hidden_states`; a projector's `feature_levels()` and `needs_class_token`; a decoder's
  `chat_template` and `lora_targets`;
- a tower's preprocessing (`preprocessing()`: size, pad/crop/resize, mean, std for pixels; mel bins and
  window length for sound);
- its FLOPs (`forward_flops`; a projector's come from its parameter count and `num_output_tokens`);
- its HF key table (`hf_key_table()`: rows of HF key, our parameter path, hook name);
- the logical axis names its parameters carry (`logical_axes`), which the sharding rules map to the mesh.

The config blocks `config.model.vision`, `config.model.projector`, `config.model.text` carry a `kind` that
picks the class (`part_config(VISION_TOWERS, config.model.vision, "model.vision")`); `EmoLLM` composes the
three and names no class. Conversion (`emollm_jax.convert`) reads the HF key tables and `from_hf`/`to_hf`, so
adding a part is: one model file with its config class (fields, checks, module, key table) and its
registration line.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, NamedTuple, TypeVar

import jax
import ml_collections

from emollm_jax.configuration import ConfigError, FieldError, Section
from emollm_jax.registry import Registry

P = TypeVar("P", bound="PartConfig")

# Rows of an HF key table: (HF key, our nnx.State path, hook name); "{i}" stands for a layer index on both
# sides. Hook names are `emollm_jax.convert.keymap.HOOKS` keys ("none", "transpose", "conv", "posemb").
KeyRow = tuple[str, str, str]


@dataclasses.dataclass(frozen=True)
class PartConfig(Section):
    """Base of every part's config; `kind` is the name it is registered under."""

    kind: ClassVar[str] = ""
    config_only: ClassVar[tuple[str, ...]] = ("kind",)
    dtypes: ClassVar[tuple[str, ...]] = ("float32", "bfloat16", "float16")  # what `dtype` fields may say
    logical_axes: ClassVar[tuple[str, ...]] = ()  # the logical names its parameters carry
    hf_model_types: ClassVar[tuple[str, ...]] = ()  # HF `model_type`s whose config.json describes this part
    hf_prefixes: ClassVar[tuple[str, ...]] = ("",)  # where its keys sit in the checkpoints it comes alone in
    hf_probe_key: ClassVar[str] = ""  # a key (after the prefix) every checkpoint of it has

    def __post_init__(self) -> None:
        super().__post_init__()
        for field in ("dtype", "param_dtype"):
            if getattr(self, field, "float32") not in self.dtypes:
                self.fail(field, f"unknown dtype; expected one of {self.dtypes}")

    @classmethod
    def block(cls, **fields: Any) -> ml_collections.ConfigDict:
        """The `config.model.<part>` block of this kind: `kind` plus the defaults, `fields` changed."""
        block = ml_collections.ConfigDict({"kind": cls.kind})
        block.update(cls.defaults(**fields))
        return block

    @classmethod
    def hf_match(cls, hf: Mapping[str, Any]) -> bool:
        """Whether an HF config dict describes this part (subclasses refine, e.g. LLaMA-3 vs LLaMA)."""
        return hf.get("model_type") in cls.hf_model_types

    @classmethod
    def from_hf(cls: type[P], hf: Mapping[str, Any], **overrides: Any) -> P:
        raise NotImplementedError(f"{cls.__name__} has no HF config")

    def to_hf(self) -> dict[str, Any]:
        raise NotImplementedError(f"{type(self).__name__} has no HF counterpart")

    def hf_key_table(self) -> list[KeyRow]:
        raise NotImplementedError(f"{type(self).__name__} has no HF key table")

    def hf_ignore(self, hf: Mapping[str, Any]) -> list[str]:
        """Regexes of checkpoint keys to skip on purpose when loading this part alone from `hf`'s dir."""
        return []


class TowerOutput(NamedTuple):
    """hidden_states: one float[N, T, Dv] per depth (0 = embeddings, i = after layer i; T includes the
    `num_prefix_tokens` class token(s)); pooled: float[N, Dv] the tower's own pooled output, or None."""

    hidden_states: tuple[jax.Array, ...]
    pooled: jax.Array | None


@dataclasses.dataclass(frozen=True)
class Preprocessing:
    """How pixels are made for a tower (`data_pipeline.media.preprocess_image`'s arguments)."""

    image_size: int
    mode: str  # "pad" (LLaVA's pad-to-square) | "crop" (resize shorter side + centre crop) | "resize"
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


@dataclasses.dataclass(frozen=True)
class VisionTowerConfig(PartConfig):
    """Interface of a vision tower. `build(rngs)(pixels float[N, H, W, C]) -> TowerOutput`."""

    @property
    def width(self) -> int:
        raise NotImplementedError

    @property
    def num_patches(self) -> int:
        raise NotImplementedError

    @property
    def num_prefix_tokens(self) -> int:
        """Tokens before the patches in each hidden state (1 for a class token)."""
        raise NotImplementedError

    @property
    def num_hidden_states(self) -> int:
        raise NotImplementedError

    def build(self, *, rngs: Any) -> Any:
        raise NotImplementedError

    def preprocessing(self) -> Preprocessing:
        raise NotImplementedError

    def forward_flops(self, frames: int) -> float:
        raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class AudioPreprocessing:
    """What an audio tower reads (`data_pipeline.audio.log_mel_windows`'s arguments): `n_mels` log-mel bins
    over windows of `window_seconds` (Whisper: 30 s = 3000 frames of 10 ms)."""

    n_mels: int
    window_seconds: float


@dataclasses.dataclass(frozen=True)
class AudioTowerConfig(PartConfig):
    """Interface of an audio tower. `build(rngs)` gives a module called on input_features
    float[B, n_mels, mel_frames] (one window each, transformers' layout) that returns its last hidden state
    float[B, frames_per_window, width]; its `hidden_states(input_features)` returns every depth
    (`num_hidden_states` arrays of that shape)."""

    @property
    def width(self) -> int:
        raise NotImplementedError

    @property
    def n_mels(self) -> int:
        raise NotImplementedError

    @property
    def mel_frames(self) -> int:
        """Log-mel frames of one input window."""
        raise NotImplementedError

    @property
    def frames_per_window(self) -> int:
        """Embeddings the tower emits per window (Whisper: 1500 per 30 s)."""
        raise NotImplementedError

    @property
    def num_hidden_states(self) -> int:
        raise NotImplementedError

    def build(self, *, rngs: Any) -> Any:
        raise NotImplementedError

    def preprocessing(self) -> AudioPreprocessing:
        raise NotImplementedError

    def forward_flops(self, windows: int) -> float:
        raise NotImplementedError


class VisualFeatures(NamedTuple):
    """What a projector gets for N frames: patches float[N, P, Dv] of the selected layer, levels
    float[L, N, P, Dv] of the extra layers it asked for (or None), cls float[N, Dv] the selected layer's
    class token (None when it did not ask or the tower has none)."""

    patches: jax.Array
    levels: jax.Array | None = None
    cls: jax.Array | None = None


@dataclasses.dataclass(frozen=True)
class ProjectorConfig(PartConfig):
    """Interface of a projector. `build(din, dout, rngs, ...)(VisualFeatures) -> float[N, P', dout]`."""

    def build(self, din: int, dout: int, *, rngs: Any, dtype: Any = None, param_dtype: Any = None) -> Any:
        raise NotImplementedError

    def feature_levels(self) -> tuple[int, ...]:
        """Hidden-state indices of the tower it reads besides the selected layer (MVP's multilevel)."""
        return ()

    @property
    def needs_class_token(self) -> bool:
        return False

    def num_output_tokens(self, num_patches: int) -> int:
        """Visual tokens it emits per frame for `num_patches` input tokens."""
        return num_patches


@dataclasses.dataclass(frozen=True)
class DecoderConfig(PartConfig):
    """Interface of a decoder: `build(rngs)` -> a causal LM with `embed`, `logits` and the KV-cache call."""

    chat_template: ClassVar[str] = "vicuna_v1"  # the template its chat checkpoints were trained with
    lora_targets: ClassVar[tuple[str, ...]] = ()  # projection names LoRA adapts by default

    def build(self, *, rngs: Any) -> Any:
        raise NotImplementedError

    def forward_flops(self, batch: int, seq_len: int) -> float:
        raise NotImplementedError


VISION_TOWERS: Registry[type[VisionTowerConfig]] = Registry("vision tower")
AUDIO_TOWERS: Registry[type[AudioTowerConfig]] = Registry("audio tower")
PROJECTORS: Registry[type[ProjectorConfig]] = Registry("projector")
DECODERS: Registry[type[DecoderConfig]] = Registry("decoder")


def _registrar(registry: Registry) -> Callable[[str], Callable[[type[P]], type[P]]]:
    def register(name: str) -> Callable[[type[P]], type[P]]:
        def add(cls: type[P]) -> type[P]:
            cls.kind = name
            return registry.register(name)(cls)

        return add

    return register


vision_tower = _registrar(VISION_TOWERS)
audio_tower = _registrar(AUDIO_TOWERS)
projector = _registrar(PROJECTORS)
decoder = _registrar(DECODERS)


def part_config(registry: Registry[type[P]], block: Mapping[str, Any] | ml_collections.ConfigDict, where: str,
                **given: Any) -> P:
    """The typed config of `config.<where>` (a block with a `kind`). Keys of another registered kind of the
    same part are left alone (switching `kind` on the command line keeps the other kinds' settings); a key
    no kind knows is an error naming it."""
    kind = block.get("kind", "")
    if kind not in registry:
        raise ConfigError(f"config.{where}.kind={kind!r}: unknown {registry.what}; registered: "
                          f"{', '.join(registry.names())}")
    cls = registry.get(kind)
    known_elsewhere = {name for _, other in registry.items() for name in other.field_names()}
    mine = set(cls.field_names()) | set(cls.config_only)
    unknown = sorted(set(block.keys()) - mine - known_elsewhere)
    if unknown:
        raise ConfigError(f"config.{where}.{unknown[0]}: no {registry.what} has this key; {kind} has "
                          f"{', '.join(sorted(cls.field_names()))}")
    return cls.from_config({k: v for k, v in dict(block).items() if k in mine}, where, **given)


def hf_part(registry: Registry[type[P]], hf: Mapping[str, Any]) -> type[P] | None:
    """The registered part whose HF config this is (latest registration wins a tie), or None."""
    for _, cls in reversed(tuple(registry.items())):
        if cls.hf_match(hf):
            return cls
    return None


def field_error(where: str, error: FieldError) -> ConfigError:
    return ConfigError(f"config.{where}.{error.field}={error.value!r}: {error.message}")

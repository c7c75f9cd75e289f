"""EmoLLM: vision tower -> projector -> visual tokens (and audio tower -> audio projector -> audio tokens)
spliced into a decoder, each part chosen by its `kind`.

This is the one place where an image or a sound becomes tokens. The parts are registered configs
(`emollm_jax.models.parts`): the config says which tower, projector and decoder (and, optionally, which audio
tower and audio projector), and this module composes them without naming any class. Phases (big_vision
style), each a method: ``embed_media`` (frames -> visual tokens per sample), ``embed_audio`` (log-mel windows
-> audio tokens per sample), ``embed_inputs`` (text embeddings with the visual tokens written at the
``image_token_id`` positions and the audio tokens at the ``audio_token_id`` positions) and ``__call__`` (the
decoder, optionally with a KV cache).

Splicing is a static-shape gather: the j-th image-token position of a sample (counted with a cumsum) takes
the j-th visual token of that sample, so the number of image-token positions must equal the sample's visual
tokens (``visual_tokens_per_media`` per media item; the data pipeline expands each marker to exactly that).
Audio works the same way with ``audio_tokens_per_item``: a sound of W windows takes W x tokens-per-window
audio tokens. Those counts are data, so under ``jax.jit`` they cannot be checked; with concrete
(non-traced) inputs ``embed_inputs`` checks them and raises, and ``check_media_tokens`` /
``check_audio_tokens`` do the same checks on host arrays.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from emollm_jax import sharding
from emollm_jax.configuration import ConfigError, FieldError
from emollm_jax.models import catalog  # noqa: F401  (the shipped parts a config may name)
from emollm_jax.models.parts import (
    AUDIO_PROJECTORS,
    AUDIO_TOWERS,
    DECODERS,
    PROJECTORS,
    VISION_TOWERS,
    AudioProjectorConfig,
    AudioTowerConfig,
    DecoderConfig,
    ProjectorConfig,
    VisionTowerConfig,
    VisualFeatures,
    part_config,
)

if TYPE_CHECKING:
    from emollm_jax.lora import LoRAConfig
    from emollm_jax.models.llama import KVCache

NO_AUDIO = "none"  # config.model.audio.kind of a model without an audio tower


@dataclasses.dataclass(frozen=True)
class EmoLLMConfig:
    """Tower, projector and decoder configs (any registered kind) plus how features become tokens."""

    vision: VisionTowerConfig
    projector: ProjectorConfig
    text: DecoderConfig
    image_token_id: int
    # LLaVA's penultimate layer; a tuple (HF's list form) concatenates those layers on the feature axis
    vision_feature_layer: int | tuple[int, ...] = -2
    vision_feature_select: str = "patch"  # "patch" (drop the first token, HF's "default") | "full"
    video_pooling: str = "concat"  # "concat": frames' tokens concatenated | "mean": averaged over frames
    freeze_vision: bool = True  # stop_gradient on the tower's output
    lora: LoRAConfig | None = None  # adapters `experiment.new_model` adds (`config.lora`); None: none
    audio: AudioTowerConfig | None = None  # None: no audio tower (a sample with audio tokens is refused)
    audio_projector: AudioProjectorConfig | None = None
    audio_token_id: int | None = None  # where audio tokens go in input_ids
    freeze_audio: bool = True  # stop_gradient on the audio tower's output

    def __post_init__(self):
        def fail(field: str, value: Any, why: str):
            raise FieldError("EmoLLMConfig", field, value, why)

        depth = self.vision.num_hidden_states  # hidden_states: embeddings + one per layer
        layer = self.vision_feature_layer
        layer = tuple(int(i) for i in layer) if isinstance(layer, list | tuple) else int(layer)
        object.__setattr__(self, "vision_feature_layer", layer)
        if layer == ():
            fail("vision_feature_layer", layer, "an empty list of layers")
        for i in self.feature_layers:
            if not -depth <= i < depth:
                fail("vision_feature_layer", self.vision_feature_layer,
                     f"the {self.vision.kind} tower has {depth} hidden states")
        if len(self.feature_layers) > 1 and self.projector.feature_levels():
            fail("vision_feature_layer", self.vision_feature_layer,
                 f"several layers make one feature of width {self.feature_width}, but the projector's "
                 f"levels {self.projector.feature_levels()} are single layers of width {self.vision.width}")
        for i in self.projector.feature_levels():
            if not -depth <= i < depth:
                fail("projector.levels", i, f"the {self.vision.kind} tower has {depth} hidden states")
        if self.vision_feature_select not in ("patch", "full"):
            fail("vision_feature_select", self.vision_feature_select, "expected 'patch' or 'full'")
        if self.video_pooling not in ("concat", "mean"):
            fail("video_pooling", self.video_pooling, "expected 'concat' or 'mean'")
        if self.projector.needs_class_token and not self.vision.num_prefix_tokens:
            fail("projector.kind", self.projector.kind, f"reads a class token and the {self.vision.kind} "
                 "tower has none (MVP: global_pool='mean')")
        self._check_audio(fail)

    def _check_audio(self, fail) -> None:
        """An audio tower comes with an audio projector that can pool its windows and a token id of its
        own."""
        if self.audio is None:
            if self.audio_projector is not None:
                fail("audio.kind", NO_AUDIO, "an audio projector is configured but no audio tower")
            return
        if self.audio_projector is None:
            fail("audio_projector.kind", None, f"the {self.audio.kind} audio tower needs an audio projector")
        why = self.audio_projector.check_frames(self.audio.frames_per_window)
        if why:
            fail("audio_projector.tokens_per_window",
                 getattr(self.audio_projector, "tokens_per_window", None), why)
        if self.audio_token_id is None or self.audio_token_id == self.image_token_id:
            fail("audio_token_id", self.audio_token_id, "an audio tower needs a token id of its own, not the "
                 f"image token id {self.image_token_id}")

    @classmethod
    def from_config(cls, model: Any, *, vocab_size: int, image_token_id: int,
                    audio_token_id: int | None = None, freeze_vision: bool = True) -> EmoLLMConfig:
        """The EmoLLMConfig of a `config.model` block: each part is the registered kind its block names
        (`model.vision.kind`, `model.projector.kind`, `model.text.kind`; `model.audio.kind` and
        `model.audio_projector.kind` unless the audio kind is "none"). Errors name the config key."""
        try:
            audio, audio_projector = audio_parts(model)
            return cls(
                vision=part_config(VISION_TOWERS, model.vision, "model.vision"),
                projector=part_config(PROJECTORS, model.projector, "model.projector"),
                text=part_config(DECODERS, model.text, "model.text", vocab_size=vocab_size),
                image_token_id=int(image_token_id),
                vision_feature_layer=model.vision_feature_layer,
                vision_feature_select=model.vision_feature_select,
                video_pooling=model.video_pooling,
                freeze_vision=freeze_vision,
                audio=audio,
                audio_projector=audio_projector,
                audio_token_id=None if audio is None else audio_token_id,
            )
        except FieldError as e:
            raise ConfigError(f"config.model.{e.field}={e.value!r}: {e.message}") from None

    @property
    def feature_layers(self) -> tuple[int, ...]:
        """The tower hidden states the projector reads, concatenated on the feature axis when several."""
        layer = self.vision_feature_layer
        return (layer,) if isinstance(layer, int) else layer

    @property
    def feature_width(self) -> int:
        """Width of the features the projector reads: the tower's width times the number of layers."""
        return self.vision.width * len(self.feature_layers)

    @property
    def first_patch(self) -> int:
        """Index of the first token a projector reads in each hidden state."""
        return 1 if self.vision_feature_select == "patch" else 0

    @property
    def tokens_per_frame(self) -> int:
        tokens = self.vision.num_patches + self.vision.num_prefix_tokens - self.first_patch
        return self.projector.num_output_tokens(tokens)

    @property
    def audio_tokens_per_window(self) -> int:
        """Audio tokens one window of sound takes (0 without an audio tower)."""
        if self.audio is None:
            return 0
        return self.audio_projector.num_output_tokens(self.audio.frames_per_window)


def audio_parts(model: Any) -> tuple[AudioTowerConfig | None, AudioProjectorConfig | None]:
    """The typed `config.model.audio` / `config.model.audio_projector` blocks, or (None, None) when the block
    is missing or its kind is "none"."""
    block = model.get("audio")
    if block is None or block.get("kind", NO_AUDIO) == NO_AUDIO:
        return None, None
    tower = part_config(AUDIO_TOWERS, block, "model.audio")
    projector_block = model.get("audio_projector")
    if projector_block is None:
        raise ConfigError("config.model.audio_projector: missing block; an audio tower needs an audio "
                          f"projector (registered: {', '.join(AUDIO_PROJECTORS.names())})")
    return tower, part_config(AUDIO_PROJECTORS, projector_block, "model.audio_projector")


def visual_tokens_per_media(cfg: EmoLLMConfig, num_frames: int) -> int:
    """Visual tokens one image (num_frames=1) or video takes in the text; the pipeline expands each marker
    to exactly this many ``image_token_id``s."""
    if num_frames < 1:
        raise ValueError(f"num_frames={num_frames}: a media item has at least one frame")
    return cfg.tokens_per_frame * (num_frames if cfg.video_pooling == "concat" else 1)


def audio_tokens_per_item(cfg: EmoLLMConfig, num_windows: int) -> int:
    """Audio tokens one sound of `num_windows` windows takes in the text; the pipeline expands each `<audio>`
    marker to exactly this many ``audio_token_id``s."""
    if cfg.audio is None:
        raise ValueError("the model has no audio tower (config.model.audio.kind='none'): it reads no sound")
    if num_windows < 1:
        raise ValueError(f"num_windows={num_windows}: a sound has at least one window")
    return cfg.audio_tokens_per_window * num_windows


def _slot_counts(slots: np.ndarray | None, b: int, name: str) -> np.ndarray:
    """Slots per media item of sample `b` (int[M]) from its slot -> item row (-1 = padding slot), refusing a
    row whose items are not 0, 1, ... in order with the padding last."""
    row = np.zeros((0,), np.int64) if slots is None else np.asarray(slots)[b].astype(np.int64)
    real = row[row >= 0]
    if (row[len(real) :] != -1).any() or (np.diff(real) < 0).any() or (real.size and real[0] != 0):
        raise ValueError(f"sample {b}: {name} {row.tolist()} must be non-decreasing media indices from 0 "
                         "with padding slots (-1) last")
    return np.bincount(real)


def check_media_tokens(cfg: EmoLLMConfig, input_ids: np.ndarray, frame_media: np.ndarray | None) -> None:
    """Raises ValueError naming the sample when its image-token count differs from its visual tokens.

    input_ids int[B, T]; frame_media int[B, K] (-1 = padding slot) or None (no media).
    """
    input_ids = np.asarray(input_ids)
    have = (input_ids == cfg.image_token_id).sum(axis=1)
    for b in range(input_ids.shape[0]):
        frames = _slot_counts(frame_media, b, "frame_media")
        want = sum(visual_tokens_per_media(cfg, int(n)) for n in frames if n > 0)
        if have[b] != want:
            raise ValueError(
                f"sample {b}: {have[b]} image tokens (id {cfg.image_token_id}) in input_ids, but its media "
                f"give {want} visual tokens ({len(frames)} media, frames per media {frames.tolist()})"
            )


def check_audio_tokens(cfg: EmoLLMConfig, input_ids: np.ndarray, audio_media: np.ndarray | None) -> None:
    """Raises ValueError naming the sample when its audio-token count differs from its sounds' audio tokens.

    input_ids int[B, T]; audio_media int[B, A] (-1 = padding window slot) or None (no sound).
    """
    input_ids = np.asarray(input_ids)
    if cfg.audio is None:
        if audio_media is not None and (np.asarray(audio_media) >= 0).any():
            raise ValueError("audio given, but the model has no audio tower (config.model.audio.kind='none')")
        return
    have = (input_ids == cfg.audio_token_id).sum(axis=1)
    for b in range(input_ids.shape[0]):
        windows = _slot_counts(audio_media, b, "audio_media")
        want = sum(audio_tokens_per_item(cfg, int(n)) for n in windows if n > 0)
        if have[b] != want:
            raise ValueError(
                f"sample {b}: {have[b]} audio tokens (id {cfg.audio_token_id}) in input_ids, but its sound "
                f"gives {want} audio tokens ({len(windows)} sounds, windows per sound {windows.tolist()})"
            )


def _is_concrete(*xs: Any) -> bool:
    return not any(isinstance(x, jax.core.Tracer) for x in xs if x is not None)


def _normalise_media(pixel_values: jax.Array, frame_media: jax.Array | None) -> tuple[jax.Array, jax.Array]:
    """float[B, H, W, C] or float[B, K, H, W, C] -> (float[B, K, H, W, C], int32[B, K]); without frame_media
    every slot is its own image."""
    if pixel_values.ndim == 4:
        pixel_values = pixel_values[:, None]
    if pixel_values.ndim != 5:
        raise ValueError(
            f"pixel_values has shape {pixel_values.shape}; expected [B, K, H, W, C] or [B, H, W, C]"
        )
    b, k = pixel_values.shape[:2]
    if frame_media is None:
        frame_media = jnp.broadcast_to(jnp.arange(k, dtype=jnp.int32), (b, k))
    if frame_media.shape != (b, k):
        raise ValueError(f"frame_media has shape {frame_media.shape}; pixel_values has {b} x {k} frame slots")
    return pixel_values, frame_media.astype(jnp.int32)


def _normalise_audio(audio_features: jax.Array, audio_media: jax.Array | None) -> tuple[jax.Array, jax.Array]:
    """float[B, n_mels, F] or float[B, A, n_mels, F] -> (float[B, A, n_mels, F], int32[B, A]); without
    audio_media every window slot is its own sound."""
    if audio_features.ndim == 3:
        audio_features = audio_features[:, None]
    if audio_features.ndim != 4:
        raise ValueError(f"audio_features has shape {audio_features.shape}; expected [B, A, n_mels, frames] "
                         "or [B, n_mels, frames]")
    b, a = audio_features.shape[:2]
    if audio_media is None:
        audio_media = jnp.broadcast_to(jnp.arange(a, dtype=jnp.int32), (b, a))
    if audio_media.shape != (b, a):
        raise ValueError(f"audio_media has shape {audio_media.shape}; audio_features has {b} x {a} window "
                         "slots")
    return audio_features, audio_media.astype(jnp.int32)


def _splice(text: jax.Array, is_token: jax.Array, tokens: jax.Array) -> jax.Array:
    """text float[B, T, D] with the j-th True position of `is_token` bool[B, T] in each row replaced by
    tokens[b, j] (tokens float[B, M, D])."""
    slot = jnp.clip(jnp.cumsum(is_token, axis=1) - 1, 0, tokens.shape[1] - 1)
    gathered = jnp.take_along_axis(tokens, slot[..., None], axis=1).astype(text.dtype)
    return jnp.where(is_token[..., None], gathered, text)


class EmoLLM(nnx.Module):
    """``.vision``, ``.projector`` and ``.llm``: the configured tower, projector and decoder; ``.audio`` and
    ``.audio_projector`` (None without an audio tower)."""

    def __init__(self, config: EmoLLMConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.vision = config.vision.build(rngs=rngs)
        self.projector = config.projector.build(
            config.feature_width,
            config.text.hidden_size,
            rngs=rngs,
            dtype=jnp.dtype(config.text.dtype),
            param_dtype=jnp.dtype(config.text.param_dtype),
        )
        self.llm = config.text.build(rngs=rngs)
        # Built after the others, so a model with sound draws the same initial vision and text weights.
        if config.audio is not None:
            self.audio = config.audio.build(rngs=rngs)
            self.audio_projector = config.audio_projector.build(
                config.audio.width, config.text.hidden_size, config.audio.frames_per_window, rngs=rngs,
                dtype=jnp.dtype(config.text.dtype), param_dtype=jnp.dtype(config.text.param_dtype))
        else:
            self.audio = self.audio_projector = None

    def vision_features(self, pixels: jax.Array) -> VisualFeatures:
        """float[N, H, W, C] -> what the projector asked the tower for: the selected layer's patches
        float[N, P, Dv], its `feature_levels()` float[L, N, P, Dv], the class token float[N, Dv]. With several
        selected layers (HF Llava's list form) patches and class token are those layers concatenated on the
        feature axis (Dv x layers)."""
        cfg = self.config
        hidden = self.vision(pixels).hidden_states
        if cfg.freeze_vision:
            hidden = tuple(jax.lax.stop_gradient(h) for h in hidden)
        start = cfg.first_patch
        selected = jnp.concatenate([hidden[i] for i in cfg.feature_layers], axis=-1)
        levels = cfg.projector.feature_levels()
        return VisualFeatures(
            patches=sharding.constrain(selected[:, start:], ("batch", "length", "vit_embed")),
            levels=jnp.stack([hidden[i][:, start:] for i in levels]) if levels else None,
            cls=selected[:, 0] if cfg.projector.needs_class_token else None,
        )

    def embed_media(self, pixel_values: jax.Array, frame_media: jax.Array | None = None) -> jax.Array:
        """Visual tokens of each sample in media order, padded at the end.

        pixel_values float[B, K, H, W, C] (NHWC frames; also [B, H, W, C] = one image each); frame_media
        int32[B, K]: media index of each frame slot, non-decreasing, -1 = padding slot (default: each slot its
        own image). Returns float[B, K * F, D] with F = tokens per frame: with ``video_pooling="concat"`` the
        frames' tokens in slot order; with "mean" media m's frame-averaged tokens at [m * F, (m + 1) * F).
        Padding slots come out as zeros (and are never referenced by image tokens).
        """
        pixel_values, frame_media = _normalise_media(pixel_values, frame_media)
        b, k = frame_media.shape
        tokens = self.projector(self.vision_features(pixel_values.reshape(b * k, *pixel_values.shape[2:])))
        tokens = sharding.constrain(tokens, ("batch", "length", "embed"))  # [B * K, F, D]
        tokens = tokens.reshape(b, k, *tokens.shape[1:])  # [B, K, F, D]
        real = (frame_media >= 0).astype(tokens.dtype)[:, :, None, None]
        tokens = tokens * real
        if self.config.video_pooling == "mean":
            onehot = (frame_media[:, None, :] == jnp.arange(k)[None, :, None]).astype(
                jnp.float32
            )  # [B, M, K]
            weights = onehot / jnp.maximum(onehot.sum(-1, keepdims=True), 1.0)
            tokens = jnp.einsum("bmk,bkfd->bmfd", weights.astype(tokens.dtype), tokens)
        return tokens.reshape(b, -1, tokens.shape[-1])

    def embed_audio(self, audio_features: jax.Array, audio_media: jax.Array | None = None) -> jax.Array:
        """Audio tokens of each sample in window order, padded at the end.

        audio_features float[B, A, n_mels, F] (log-mel windows, transformers' layout; also [B, n_mels, F] =
        one window each); audio_media int32[B, A]: sound index of each window slot, non-decreasing, -1 =
        padding slot (default: each slot its own sound). Returns float[B, A * K, D] with K = tokens per
        window: a sound of W windows owns the W x K tokens of its slots. Padding slots come out as zeros.
        """
        cfg = self.config
        if self.audio is None:
            raise ValueError("the model has no audio tower (config.model.audio.kind='none'): it reads no "
                             "sound")
        audio_features, audio_media = _normalise_audio(audio_features, audio_media)
        b, a = audio_media.shape
        frames = self.audio(audio_features.reshape(b * a, *audio_features.shape[2:]))  # [B*A, F', Da]
        if cfg.freeze_audio:
            frames = jax.lax.stop_gradient(frames)
        tokens = self.audio_projector(frames)  # [B*A, K, D]
        real = (audio_media >= 0).astype(tokens.dtype)[:, :, None, None]
        tokens = tokens.reshape(b, a, *tokens.shape[1:]) * real
        return tokens.reshape(b, -1, tokens.shape[-1])

    def embed_inputs(
        self,
        input_ids: jax.Array,
        pixel_values: jax.Array | None = None,
        frame_media: jax.Array | None = None,
        audio_features: jax.Array | None = None,
        audio_media: jax.Array | None = None,
    ) -> jax.Array:
        """Text embeddings float[B, T, D], the j-th ``image_token_id`` position of each row replaced by its
        j-th visual token and the j-th ``audio_token_id`` position by its j-th audio token. Rows without them
        are plain text. With ``pixel_values=None`` (``audio_features=None``) image (audio) ids are embedded as
        text (decode steps after a multimodal prefill, as HF Llava does)."""
        cfg = self.config
        if pixel_values is None and audio_features is None:
            return self.llm.embed(input_ids)
        is_image = input_ids == cfg.image_token_id
        is_audio = input_ids == cfg.audio_token_id if audio_features is not None else jnp.zeros_like(is_image)
        text = self.llm.embed(jnp.where(is_image | is_audio, 0, input_ids))  # ids may lie outside the vocab
        if pixel_values is not None:
            pixel_values, frame_media = _normalise_media(pixel_values, frame_media)
            if _is_concrete(input_ids, frame_media):
                check_media_tokens(cfg, np.asarray(input_ids), np.asarray(frame_media))
            text = _splice(text, is_image, self.embed_media(pixel_values, frame_media))
        if audio_features is not None:
            audio_features, audio_media = _normalise_audio(audio_features, audio_media)
            if _is_concrete(input_ids, audio_media):
                check_audio_tokens(cfg, np.asarray(input_ids), np.asarray(audio_media))
            text = _splice(text, is_audio, self.embed_audio(audio_features, audio_media))
        return sharding.constrain(text, ("batch", "length", "embed"))

    def __call__(
        self,
        input_ids: jax.Array,
        *,
        attention_mask: jax.Array | None = None,
        pixel_values: jax.Array | None = None,
        frame_media: jax.Array | None = None,
        audio_features: jax.Array | None = None,
        audio_media: jax.Array | None = None,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        cache: KVCache | None = None,
        return_hidden: bool = False,
    ):
        """int32[B, T] (+ media, + sound) -> logits float32[B, T, V] (or hidden float[B, T, D] with
        return_hidden), or ``(out, new_cache)`` when a cache is passed (media go in with the prefill chunk;
        decode steps pass ``pixel_values=None, audio_features=None``).

        Packed rows (several records per row, `data_pipeline.packing`): segment_ids int32[B, T] (1, 2, ...
        per record, 0 = padding) keep attention within each record and positions int32[B, T] restart at 0
        for each; frame_media / audio_media number a row's media across its records in token order, so the
        j-th image token of a row still takes the row's j-th visual token."""
        embeds = self.embed_inputs(input_ids, pixel_values, frame_media, audio_features, audio_media)
        return self.llm(
            inputs_embeds=embeds,
            attention_mask=attention_mask,
            positions=positions,
            segment_ids=segment_ids,
            cache=cache,
            return_hidden=return_hidden,
        )


"""EmoLLM: vision tower -> projector -> visual tokens spliced into a decoder, each part chosen by its `kind`.

This is the one place where an image becomes tokens. The three parts are registered configs
(`emollm_jax.models.parts`): the config says which tower, projector and decoder, and this module composes
them without naming any class. Phases (big_vision style), each a method:
``embed_media`` (frames -> visual tokens per sample), ``embed_inputs`` (text embeddings with the visual tokens
written at the ``image_token_id`` positions) and ``__call__`` (the decoder, optionally with a KV cache).

Splicing is a static-shape gather: the j-th image-token position of a sample (counted with a cumsum) takes
the j-th visual token of that sample, so the number of image-token positions must equal the sample's visual
tokens (``visual_tokens_per_media`` per media item; the data pipeline expands each marker to exactly that).
That count is data, so under ``jax.jit`` it cannot be checked; with concrete (non-traced) inputs
``embed_inputs`` checks it and raises, and ``check_media_tokens`` does the same check on host arrays.
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
    DECODERS,
    PROJECTORS,
    VISION_TOWERS,
    DecoderConfig,
    ProjectorConfig,
    VisionTowerConfig,
    VisualFeatures,
    part_config,
)

if TYPE_CHECKING:
    from emollm_jax.lora import LoRAConfig
    from emollm_jax.models.llama import KVCache


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

    @classmethod
    def from_config(cls, model: Any, *, vocab_size: int, image_token_id: int,
                    freeze_vision: bool = True) -> EmoLLMConfig:
        """The EmoLLMConfig of a `config.model` block: each part is the registered kind its block names
        (`model.vision.kind`, `model.projector.kind`, `model.text.kind`). Errors name the config key."""
        try:
            return cls(
                vision=part_config(VISION_TOWERS, model.vision, "model.vision"),
                projector=part_config(PROJECTORS, model.projector, "model.projector"),
                text=part_config(DECODERS, model.text, "model.text", vocab_size=vocab_size),
                image_token_id=int(image_token_id),
                vision_feature_layer=model.vision_feature_layer,
                vision_feature_select=model.vision_feature_select,
                video_pooling=model.video_pooling,
                freeze_vision=freeze_vision,
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


def visual_tokens_per_media(cfg: EmoLLMConfig, num_frames: int) -> int:
    """Visual tokens one image (num_frames=1) or video takes in the text; the pipeline expands each marker
    to exactly this many ``image_token_id``s."""
    if num_frames < 1:
        raise ValueError(f"num_frames={num_frames}: a media item has at least one frame")
    return cfg.tokens_per_frame * (num_frames if cfg.video_pooling == "concat" else 1)


def check_media_tokens(cfg: EmoLLMConfig, input_ids: np.ndarray, frame_media: np.ndarray | None) -> None:
    """Raises ValueError naming the sample when its image-token count differs from its visual tokens.

    input_ids int[B, T]; frame_media int[B, K] (-1 = padding slot) or None (no media).
    """
    input_ids = np.asarray(input_ids)
    have = (input_ids == cfg.image_token_id).sum(axis=1)
    for b in range(input_ids.shape[0]):
        media = (
            np.zeros((0,), np.int64) if frame_media is None else np.asarray(frame_media)[b].astype(np.int64)
        )
        real = media[media >= 0]
        if (media[len(real) :] != -1).any() or (np.diff(real) < 0).any() or (real.size and real[0] != 0):
            raise ValueError(
                f"sample {b}: frame_media {media.tolist()} must be non-decreasing media indices from 0 with "
                "padding slots (-1) last"
            )
        frames = np.bincount(real)
        want = sum(visual_tokens_per_media(cfg, int(n)) for n in frames if n > 0)
        if have[b] != want:
            raise ValueError(
                f"sample {b}: {have[b]} image tokens (id {cfg.image_token_id}) in input_ids, but its media "
                f"give {want} visual tokens ({len(frames)} media, frames per media {frames.tolist()})"
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


class EmoLLM(nnx.Module):
    """``.vision``, ``.projector`` and ``.llm``: the configured tower, projector and decoder."""

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

    def embed_inputs(
        self,
        input_ids: jax.Array,
        pixel_values: jax.Array | None = None,
        frame_media: jax.Array | None = None,
    ) -> jax.Array:
        """Text embeddings float[B, T, D], the j-th ``image_token_id`` position of each row replaced by its
        j-th visual token. Rows without image tokens are plain text. With ``pixel_values=None`` every id is
        embedded as text, image id included (decode steps after a multimodal prefill, as HF Llava does)."""
        cfg = self.config
        if pixel_values is None:
            return self.llm.embed(input_ids)
        is_image = input_ids == cfg.image_token_id
        pixel_values, frame_media = _normalise_media(pixel_values, frame_media)
        if _is_concrete(input_ids, frame_media):
            check_media_tokens(cfg, np.asarray(input_ids), np.asarray(frame_media))
        media = self.embed_media(pixel_values, frame_media)  # [B, M, D]
        text = self.llm.embed(jnp.where(is_image, 0, input_ids))  # image ids may lie outside the vocab
        slot = jnp.clip(jnp.cumsum(is_image, axis=1) - 1, 0, media.shape[1] - 1)
        gathered = jnp.take_along_axis(media, slot[..., None], axis=1).astype(text.dtype)
        spliced = jnp.where(is_image[..., None], gathered, text)
        return sharding.constrain(spliced, ("batch", "length", "embed"))

    def __call__(
        self,
        input_ids: jax.Array,
        *,
        attention_mask: jax.Array | None = None,
        pixel_values: jax.Array | None = None,
        frame_media: jax.Array | None = None,
        positions: jax.Array | None = None,
        cache: KVCache | None = None,
        return_hidden: bool = False,
    ):
        """int32[B, T] (+ media) -> logits float32[B, T, V] (or hidden float[B, T, D] with return_hidden),
        or ``(out, new_cache)`` when a cache is passed (media go in with the prefill chunk; decode steps pass
        ``pixel_values=None``)."""
        embeds = self.embed_inputs(input_ids, pixel_values, frame_media)
        return self.llm(
            inputs_embeds=embeds,
            attention_mask=attention_mask,
            positions=positions,
            cache=cache,
            return_hidden=return_hidden,
        )


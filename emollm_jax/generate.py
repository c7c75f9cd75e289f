"""Batched autoregressive generation with a KV cache: one prefill, then the whole decode loop in one jit.

Works for any model with the decoder's cache protocol (``LlamaForCausalLM`` and ``EmoLLM``):
``model(ids, attention_mask=..., cache=cache[, pixel_values=..., frame_media=..., audio_features=...,
audio_media=...]) -> (logits, cache)``.
The model goes in as ``nnx.split``'s (graphdef, state), so parameters are a jit argument (never baked in as
constants) and may be sharded on a mesh; the compiled function is cached per (graphdef, decoding options) and
jax.jit caches it per input shapes, so repeated calls with the same shapes do not recompile.

Prompts are left padded (``attention_mask`` 0 on the left): the last column is every row's last prompt token,
and the decoder derives unpadded positions from the mask.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from emollm_jax.models.emollm import EmoLLM, check_audio_tokens, check_media_tokens
from emollm_jax.models.llama import init_cache


def _decoder(model: nnx.Module):
    """The LlamaForCausalLM (an EmoLLM keeps its decoder in ``.llm``)."""
    return getattr(model, "llm", model)


def greedy_token(logits: jax.Array) -> jax.Array:
    """float[B, V] -> int32[B], the first index of each row's maximum (what `jnp.argmax` returns for finite
    logits). Two plain reductions: on CPU, XLA runs argmax's (value, index) reduction 3-4x slower over 32k."""
    vocab = logits.shape[-1]
    best = jnp.max(logits, axis=-1, keepdims=True)
    index = jnp.arange(vocab, dtype=jnp.int32)
    first = jnp.min(jnp.where(logits == best, index, vocab), axis=-1)
    return jnp.minimum(first, vocab - 1).astype(jnp.int32)  # a NaN row matches nothing: stay in the vocab


def sample_token(logits: jax.Array, rng: jax.Array, temperature: float, top_p: float) -> jax.Array:
    """float[B, V] -> int32[B]: argmax when temperature == 0, else nucleus sampling at the temperature.

    top_p keeps the smallest set of most likely tokens whose probability reaches top_p (the most likely one is
    always kept, so a tiny top_p is greedy).
    """
    logits = logits.astype(jnp.float32)
    if temperature == 0.0:
        return greedy_token(logits)
    logits = logits / temperature
    if top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass of strictly more likely tokens
        kept = jnp.where(before < top_p, sorted_logits, jnp.inf).min(axis=-1, keepdims=True)
        logits = jnp.where(logits >= kept, logits, -jnp.inf)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


@functools.lru_cache(maxsize=64)
def make_generate_fn(
    graphdef: nnx.GraphDef,
    *,
    max_new_tokens: int,
    eos_ids: tuple[int, ...],
    pad_id: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
) -> Callable[..., jax.Array]:
    """A jitted ``fn(state, input_ids, attention_mask, media, rng) -> int32[B, N]``.

    input_ids/attention_mask int32[B, T] (left padded); media a dict of the prefill's media keyword arguments
    as ``EmoLLM`` takes them (pixel_values/frame_media, audio_features/audio_media; empty for text-only
    models); rng a PRNG key (unused when greedy). Rows that produced an EOS get ``pad_id`` afterwards; the
    loop stops early once every row has finished.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens}: expected >= 1")
    eos = jnp.asarray(eos_ids, jnp.int32)

    def run(state, input_ids, attention_mask, media, rng):
        model = nnx.merge(graphdef, state)
        decoder = _decoder(model)
        b, t = input_ids.shape
        cache = init_cache(decoder.config, b, t + max_new_tokens)
        hidden, cache = model(input_ids, attention_mask=attention_mask, cache=cache, return_hidden=True,
                              **media)
        logits = decoder.logits(hidden[:, -1:])  # the prompt's last position only
        first = sample_token(logits[:, -1], jax.random.fold_in(rng, 0), temperature, top_p)
        tokens = jnp.full((b, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(first)
        done = jnp.isin(first, eos)

        def cond(carry):
            i, _, done, _ = carry
            return (i < max_new_tokens) & ~jnp.all(done)

        def body(carry):
            i, tokens, done, cache = carry
            prev = jax.lax.dynamic_slice_in_dim(tokens, i - 1, 1, axis=1)  # int32[B, 1]
            logits, cache = model(prev, attention_mask=jnp.ones_like(prev), cache=cache)
            nxt = sample_token(logits[:, -1], jax.random.fold_in(rng, i), temperature, top_p)
            nxt = jnp.where(done, pad_id, nxt)
            tokens = jax.lax.dynamic_update_slice_in_dim(tokens, nxt[:, None], i, axis=1)
            return i + 1, tokens, done | jnp.isin(nxt, eos), cache

        _, tokens, _, _ = jax.lax.while_loop(cond, body, (jnp.int32(1), tokens, done, cache))
        return tokens

    return jax.jit(run)


def generate(
    model: nnx.Module,
    input_ids: jax.Array,
    attention_mask: jax.Array,
    *,
    pixel_values: jax.Array | None = None,
    frame_media: jax.Array | None = None,
    audio_features: jax.Array | None = None,
    audio_media: jax.Array | None = None,
    max_new_tokens: int,
    eos_id: int | Sequence[int],
    pad_id: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
) -> jax.Array:
    """Generates up to ``max_new_tokens`` after left-padded prompts; returns int32[B, max_new_tokens]
    (``pad_id`` after each row's EOS). Greedy at temperature 0, else nucleus sampling seeded by ``seed``.

    For an EmoLLM with media (or sound), each row's image-token (audio-token) count is checked against its
    media on the host first (a ValueError names the row)."""
    eos_ids = tuple(int(e) for e in np.atleast_1d(np.asarray(eos_id)))
    graphdef, state = nnx.split(model)
    fn = make_generate_fn(
        graphdef,
        max_new_tokens=int(max_new_tokens),
        eos_ids=eos_ids,
        pad_id=int(pad_id),
        temperature=float(temperature),
        top_p=float(top_p),
    )
    args: tuple[Any, ...] = (jnp.asarray(input_ids, jnp.int32), jnp.asarray(attention_mask, jnp.int32))
    media: dict[str, jax.Array] = {}
    # Inside the jitted prefill the media-token counts can't be checked; here they still can.
    checkable = isinstance(model, EmoLLM) and all(getattr(x, "is_fully_addressable", True) for x in args)
    if pixel_values is not None:
        media["pixel_values"] = jnp.asarray(pixel_values)
        media["frame_media"] = _slots(media["pixel_values"], frame_media, 5)
        if checkable and getattr(media["frame_media"], "is_fully_addressable", True):
            check_media_tokens(model.config, np.asarray(args[0]), np.asarray(media["frame_media"]))
    if audio_features is not None:
        media["audio_features"] = jnp.asarray(audio_features)
        media["audio_media"] = _slots(media["audio_features"], audio_media, 4)
        if checkable and getattr(media["audio_media"], "is_fully_addressable", True):
            check_audio_tokens(model.config, np.asarray(args[0]), np.asarray(media["audio_media"]))
    return fn(state, *args, media, jax.random.key(seed))


def _slots(values: jax.Array, slots: jax.Array | None, slotted_ndim: int) -> jax.Array:
    """int32[B, K]: `slots`, or every slot its own media item when None (values without a slot axis: K=1)."""
    if slots is None:
        k = values.shape[1] if values.ndim == slotted_ndim else 1
        return jnp.broadcast_to(jnp.arange(k, dtype=jnp.int32), (values.shape[0], k))
    return jnp.asarray(slots, jnp.int32)

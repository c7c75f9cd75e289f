"""Attention as the parts call it: which keys each query sees (`AttentionMask`) and how it is computed.

Three implementations, chosen by a part's `attention` config key (`model.text.attention`,
`model.vision.attention`):

- ``plain``: scores and probabilities float32[B, KVH, G, T, S] in full (`layers.attend`); the reference.
- ``blockwise``: flash-style, pure JAX, every backend: an online softmax over key blocks inside query blocks,
  with a custom VJP that stores only q, k, v, the output and the row log-sum-exp and recomputes each block's
  probabilities in the backward pass, so no [T, S] array is ever kept. Blocks whose mask is empty are skipped
  (about half of a causal sequence; cache slots not yet written when decoding).
- ``cudnn``: `jax.nn.dot_product_attention(implementation="cudnn")`, cuDNN's fused kernel (GPU, bf16/fp16).
- ``auto`` (the default) resolves per call (`resolve`): ``cudnn`` on a GPU when the compute dtype is bf16 or
  fp16 and the head dim is a multiple of 8 up to 128; elsewhere ``blockwise`` from `BLOCKWISE_MIN_KEYS`
  keys on and ``plain`` below (short sequences gain nothing from blocking, and the CPU default job keeps
  exactly the numbers of the plain path).

A query row that sees no key at all (a left-padding position) gets uniform weights under ``plain`` and
``cudnn`` and zeros under ``blockwise``; such rows are padding, never read downstream.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp

from emollm_jax.models import layers

IMPLEMENTATIONS = ("auto", "plain", "blockwise", "cudnn")
BLOCKWISE_MIN_KEYS = 1024  # `auto` off GPU: blockwise from this many keys on, plain below
BLOCK_Q = 512
BLOCK_K = 512
_NEG = -1e30  # masked score inside a block (finite, so fully masked blocks never make NaN)


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=("query_slots", "key_mask", "q_segments", "k_segments", "bias"),
    meta_fields=("causal", "window", "implementation"),
)
@dataclasses.dataclass(frozen=True)
class AttentionMask:
    """Which keys each query sees, and how attention is computed (`prepare` fills `implementation`).

    Key s is visible from query t iff (not causal or s <= slot[t]) and (no window or slot[t] - s < window)
    and key_mask[b, s] and q_segments[b, t] == k_segments[b, s] (the parts left None do not restrict).
    query_slots int32[T]: slot of each query in the key sequence (None: 0..T-1, a forward pass without a
    cache); key_mask int[B, S] (1 = real key); q_segments int32[B, T], k_segments int32[B, S]: packed
    records, attention only within equal ids. bias float32[B, 1, 1, T, S]: the plain path's additive mask,
    built once per forward pass by `prepare` and shared by every layer.

    Example (causal, left padding key_mask [0, 1, 1], no cache): query 1 sees key 1, query 2 keys 1 and 2,
    query 0 nothing (a padding row).
    """

    query_slots: jax.Array | None = None
    key_mask: jax.Array | None = None
    q_segments: jax.Array | None = None
    k_segments: jax.Array | None = None
    bias: jax.Array | None = None
    causal: bool = False
    window: int | None = None
    implementation: str = "plain"

    def slots(self, t: int) -> jax.Array:
        return jnp.arange(t) if self.query_slots is None else self.query_slots

    def visible(self, q_index: jax.Array, k_index: jax.Array) -> jax.Array | None:
        """bool[B or 1, tq, tk] for queries `q_index` int32[tq] and keys `k_index` int32[tk] (indices into
        T and S); None when every key is visible."""
        vis = None

        def both(x):
            return x if vis is None else vis & x

        if self.causal or self.window is not None:
            q_slot = (q_index if self.query_slots is None else self.query_slots[q_index])[:, None]
            if self.causal:
                vis = both((k_index[None, :] <= q_slot)[None])
            if self.window is not None:
                vis = both((q_slot - k_index[None, :] < self.window)[None])
        if self.key_mask is not None:
            vis = both((self.key_mask[:, k_index] > 0)[:, None, :])
        if self.q_segments is not None:
            same = self.q_segments[:, q_index][:, :, None] == self.k_segments[:, k_index][:, None, :]
            vis = both(same)
        return vis

    def additive_bias(self, t: int, s: int) -> jax.Array | float:
        """float32[B or 1, 1, 1, T, S]: 0 where visible, float32's minimum elsewhere (0.0: no mask); for the
        decoder's causal mask the very values of `layers.attention_bias`."""
        vis = self.visible(jnp.arange(t), jnp.arange(s))
        if vis is None:
            return 0.0
        return jnp.where(vis, 0.0, jnp.finfo(jnp.float32).min)[:, None, None]


def resolve(implementation: str, *, dtype: Any, head_dim: int, num_keys: int) -> str:
    """The implementation `auto` stands for (see the module docstring); others are returned as they are."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"attention={implementation!r}: expected one of {IMPLEMENTATIONS}")
    if implementation != "auto":
        return implementation
    if jax.default_backend() == "gpu" and cudnn_supported(dtype, head_dim):
        return "cudnn"
    return "blockwise" if num_keys >= BLOCKWISE_MIN_KEYS else "plain"


def cudnn_supported(dtype: Any, head_dim: int) -> bool:
    """What cuDNN's fused attention takes: bf16/fp16 inputs and a head dim that is a multiple of 8, <= 128."""
    return jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16) and head_dim % 8 == 0 and head_dim <= 128


def prepare(mask: AttentionMask, implementation: str, *, dtype: Any, head_dim: int, t: int,
            s: int) -> AttentionMask:
    """`mask` with its implementation resolved for T queries over S keys (and the plain path's bias)."""
    impl = resolve(implementation, dtype=dtype, head_dim=head_dim, num_keys=s)
    if impl == "cudnn" and jax.default_backend() != "gpu":
        raise ValueError(f"attention='cudnn' needs a GPU; this backend is {jax.default_backend()!r} (use "
                         "'auto', 'plain' or 'blockwise')")
    bias = mask.additive_bias(t, s) if impl == "plain" else None
    return dataclasses.replace(mask, implementation=impl, bias=bias)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: AttentionMask) -> jax.Array:
    """Grouped-query attention: q float[B, T, H, Dh]; k, v head-major float[B, KVH, S, Dh] (the cache
    layout); `mask` from `prepare`. Query head h reads kv head h // (H / KVH), as HF's repeat_kv.
    Returns float[B, T, H, Dh]."""
    impl = mask.implementation
    if impl == "plain":
        bias = mask.bias if mask.bias is not None else mask.additive_bias(q.shape[1], k.shape[2])
        return layers.attend(q, k, v, bias)
    if impl == "blockwise":
        return blockwise_attention(q, k, v, mask)
    if impl == "cudnn":
        return fused_attention(q, k, v, mask, "cudnn")
    raise ValueError(f"attention implementation {impl!r} is not prepared (call attention.prepare)")


# ---------------------------------------------------------------------------------------- jax.nn / cuDNN


def fused_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: AttentionMask,
                    implementation: str = "cudnn") -> jax.Array:
    """`jax.nn.dot_product_attention` with our mask: index-causal (and its window) when the queries are the
    keys (no cache), a boolean [B, 1, T, S] mask for the rest (padding, segments, cache slots)."""
    t, s = q.shape[1], k.shape[2]
    k, v = k.swapaxes(1, 2), v.swapaxes(1, 2)  # [B, S, KVH, Dh]
    index_causal = mask.causal and mask.query_slots is None and t == s
    rest = dataclasses.replace(mask, causal=False, window=None) if index_causal else mask
    vis = rest.visible(jnp.arange(t), jnp.arange(s))
    window = (mask.window - 1, 0) if index_causal and mask.window is not None else None
    out = jax.nn.dot_product_attention(
        q, k.astype(q.dtype), v.astype(q.dtype), mask=None if vis is None else vis[:, None],
        is_causal=index_causal, local_window_size=window, implementation=implementation)
    return out.astype(q.dtype)


# -------------------------------------------------------------------------------------------- blockwise


def blockwise_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: AttentionMask, *,
                        block_q: int | None = None, block_k: int | None = None) -> jax.Array:
    """Flash-style attention (see the module docstring); same arguments and result as `attention`.

    Blocks of `block_q` queries and `block_k` keys (default `BLOCK_Q`, `BLOCK_K`). T and S need not be
    multiples of the blocks: queries are padded (and dropped), padded keys are masked.
    """
    b, t, h, d = q.shape
    kvh, s = k.shape[1], k.shape[2]
    bq, bk = min(block_q or BLOCK_Q, t), min(block_k or BLOCK_K, s)
    tp, sp = -(-t // bq) * bq, -(-s // bk) * bk
    qh = q.reshape(b, t, kvh, h // kvh, d).transpose(0, 2, 3, 1, 4)  # [B, KVH, G, T, Dh]
    qh = jnp.pad(qh, ((0, 0), (0, 0), (0, 0), (0, tp - t), (0, 0)))
    k = jnp.pad(k, ((0, 0), (0, 0), (0, sp - s), (0, 0))).astype(q.dtype)
    v = jnp.pad(v, ((0, 0), (0, 0), (0, sp - s), (0, 0))).astype(q.dtype)
    key_mask = mask.key_mask if mask.key_mask is not None else jnp.ones((1, s), jnp.int32)
    arrays = _BlockMask(
        query_slots=jnp.pad(mask.slots(t).astype(jnp.int32), (0, tp - t)),
        key_mask=jnp.pad(key_mask.astype(jnp.int32), ((0, 0), (0, sp - s))),
        q_segments=None if mask.q_segments is None else jnp.pad(mask.q_segments, ((0, 0), (0, tp - t))),
        k_segments=None if mask.k_segments is None else jnp.pad(mask.k_segments, ((0, 0), (0, sp - s))),
    )
    static = _Static(mask.causal, mask.window, bq, bk)
    out = _flash(static, qh, k, v, arrays)
    return out[:, :, :, :t].transpose(0, 3, 1, 2, 4).reshape(b, t, h, d)


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=("query_slots", "key_mask", "q_segments", "k_segments"), meta_fields=())
@dataclasses.dataclass(frozen=True)
class _BlockMask:
    """`AttentionMask`'s arrays padded to whole blocks (padded keys: key_mask 0)."""

    query_slots: jax.Array
    key_mask: jax.Array
    q_segments: jax.Array | None
    k_segments: jax.Array | None

    def block(self, static: _Static, i: jax.Array, j: jax.Array) -> jax.Array:
        """bool[B or 1, 1, 1, bq, bk]: visibility inside query block i and key block j."""
        q_index = i * static.bq + jnp.arange(static.bq)
        k_index = j * static.bk + jnp.arange(static.bk)
        mask = AttentionMask(self.query_slots, self.key_mask, self.q_segments, self.k_segments,
                             causal=static.causal, window=static.window)
        return mask.visible(q_index, k_index)[:, None, None]


@dataclasses.dataclass(frozen=True)
class _Static:
    causal: bool
    window: int | None
    bq: int
    bk: int


def _blocks(x: jax.Array, size: int, axis: int) -> jax.Array:
    """Split `axis` into blocks of `size` and move the block index to the front."""
    shape = x.shape[:axis] + (x.shape[axis] // size, size) + x.shape[axis + 1:]
    return jnp.moveaxis(x.reshape(shape), axis, 0)


def _unblocks(x: jax.Array, axis: int) -> jax.Array:
    """Inverse of `_blocks` (block index in front -> merged back into `axis`)."""
    x = jnp.moveaxis(x, 0, axis)
    return x.reshape(x.shape[:axis] + (x.shape[axis] * x.shape[axis + 1],) + x.shape[axis + 2:])


def _scores(qi: jax.Array, kj: jax.Array) -> jax.Array:
    """float32[B, KVH, G, bq, bk] scaled scores, as `layers.attend` computes them."""
    d = qi.shape[-1]
    return jnp.einsum("bkgqd,bksd->bkgqs", qi, kj, preferred_element_type=jnp.float32) / math.sqrt(d)


def _tied(q: jax.Array, arrays: _BlockMask) -> tuple[jax.Array, _BlockMask]:
    """q and the mask arrays through one optimization barrier, so the masks depend on q.

    Inside a scan over layers the masks are loop-invariant; without this, JAX's partial evaluation of that
    scan (for autodiff) computes every block's mask, and what follows from it alone, ahead of the loop,
    stacking them as residuals: [T/bq, S/bk, ...block] arrays, the very [T, S] memory blocking avoids.
    """
    return jax.lax.optimization_barrier((q, arrays))


def _forward(static: _Static, q, k, v, arrays: _BlockMask):
    """(out float[B, KVH, G, Tp, Dh], lse float32[B, KVH, G, Tp]): online softmax over key blocks."""
    q, arrays = _tied(q, arrays)
    kb, vb = _blocks(k, static.bk, 2), _blocks(v, static.bk, 2)
    nk = kb.shape[0]

    def query_block(args):
        qi, i = args
        stats = qi.shape[:-1]

        def key_step(carry, xs):
            kj, vj, j = xs
            vis = arrays.block(static, i, j)

            def visit():
                acc, top, total = carry
                s = jnp.where(vis, _scores(qi, kj), _NEG)
                new_top = jnp.maximum(top, s.max(-1))
                p = jnp.where(vis, jnp.exp(s - new_top[..., None]), 0.0)
                scale = jnp.exp(top - new_top)
                pv = jnp.einsum("bkgqs,bksd->bkgqd", p.astype(vj.dtype), vj,
                                preferred_element_type=jnp.float32)
                return acc * scale[..., None] + pv, new_top, total * scale + p.sum(-1)

            return jax.lax.cond(jnp.any(vis), visit, lambda: carry), None

        init = (jnp.zeros(qi.shape, jnp.float32), jnp.full(stats, _NEG, jnp.float32),
                jnp.zeros(stats, jnp.float32))
        (acc, top, total), _ = jax.lax.scan(key_step, init, (kb, vb, jnp.arange(nk)))
        seen = total > 0
        denom = jnp.where(seen, total, 1.0)
        return (acc / denom[..., None]).astype(qi.dtype), jnp.where(seen, top + jnp.log(denom), 0.0)

    qb = _blocks(q, static.bq, 3)
    out, lse = jax.lax.map(query_block, (qb, jnp.arange(qb.shape[0])))
    return _unblocks(out, 3), _unblocks(lse, 3)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(static: _Static, q, k, v, arrays: _BlockMask):
    return _forward(static, q, k, v, arrays)[0]


def _flash_fwd(static, q, k, v, arrays):
    out, lse = _forward(static, q, k, v, arrays)
    return out, (q, k, v, arrays, out, lse)


def _flash_bwd(static, residuals, d_out):
    """FlashAttention-2's backward: per key block, dK and dV summed over query blocks, dQ per query block."""
    q, k, v, arrays, out, lse = residuals
    q, arrays = _tied(q, arrays)
    delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)  # [B, KVH, G, Tp]
    qb, dob = _blocks(q, static.bq, 3), _blocks(d_out.astype(q.dtype), static.bq, 3)
    lseb, deltab = _blocks(lse, static.bq, 3), _blocks(delta, static.bq, 3)
    nq = qb.shape[0]
    scale = 1.0 / math.sqrt(q.shape[-1])

    def key_block(dq, xs):
        kj, vj, j = xs

        def query_step(carry, ys):
            qi, doi, lsei, deltai, i = ys
            vis = arrays.block(static, i, j)

            def visit():
                dk, dv = carry
                p = jnp.where(vis, jnp.exp(_scores(qi, kj) - lsei[..., None]), 0.0)
                dv = dv + jnp.einsum("bkgqs,bkgqd->bksd", p.astype(doi.dtype), doi,
                                     preferred_element_type=jnp.float32)
                dp = jnp.einsum("bkgqd,bksd->bkgqs", doi, vj, preferred_element_type=jnp.float32)
                ds = (p * (dp - deltai[..., None]) * scale).astype(qi.dtype)
                dqi = jnp.einsum("bkgqs,bksd->bkgqd", ds, kj, preferred_element_type=jnp.float32)
                dk = dk + jnp.einsum("bkgqs,bkgqd->bksd", ds, qi, preferred_element_type=jnp.float32)
                return (dk, dv), dqi

            skip = lambda: (carry, jnp.zeros(qi.shape, jnp.float32))  # noqa: E731
            return jax.lax.cond(jnp.any(vis), visit, skip)

        zeros = jnp.zeros(kj.shape, jnp.float32)
        (dk, dv), dq_parts = jax.lax.scan(query_step, (zeros, zeros), (qb, dob, lseb, deltab, jnp.arange(nq)))
        return dq + dq_parts, (dk, dv)

    kb, vb = _blocks(k, static.bk, 2), _blocks(v, static.bk, 2)
    dq0 = jnp.zeros(qb.shape, jnp.float32)
    dq, (dk, dv) = jax.lax.scan(key_block, dq0, (kb, vb, jnp.arange(kb.shape[0])))
    return (_unblocks(dq, 3).astype(q.dtype), _unblocks(dk, 2).astype(k.dtype),
            _unblocks(dv, 2).astype(v.dtype), None)


_flash.defvjp(_flash_fwd, _flash_bwd)

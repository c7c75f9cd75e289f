"""Audio projectors: one window's audio-tower embeddings -> a fixed number of audio tokens at the LLM width.

A Whisper window (30 s) gives 1500 frame embeddings; an LLM prompt cannot hold them all, and their count must
not depend on the sound, so `pool_mlp` first pools each window to `tokens_per_window` tokens, then applies
LLaVA-1.5's two-layer MLP per token (this project's choice; Qwen2-Audio pools by 2, LLaMA-Omni stacks 5
frames per token):

    X float[N, T, Da], T = tower frames per window -> K = tokens_per_window groups of T / K consecutive frames
    pooling "mean":  z_k = mean of group k                      float[N, K, Da]
            "max":   z_k = elementwise max of group k           float[N, K, Da]
            "stack": z_k = the group's frames concatenated      float[N, K, (T / K) * Da]
    Y = Linear(GELU(Linear(z)))                                 float[N, K, D]

"stack" keeps the order inside a group (how pitch moves within it) at the price of a wider first layer.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from emollm_jax.models.parts import AudioProjectorConfig, audio_projector
from emollm_jax.models.projectors import Mlp2xGelu

POOLINGS = ("mean", "max", "stack")


@audio_projector("pool_mlp")
@dataclasses.dataclass(frozen=True)
class PoolMLPConfig(AudioProjectorConfig):
    """Pool each window to `tokens_per_window` tokens (`pooling`: mean | max | stack), then an MLP."""

    tokens_per_window: int = 50  # Whisper: one token per 0.6 s of a 30 s window
    pooling: str = "mean"

    logical_axes = ("proj_in", "proj_hidden", "proj_out")

    def check(self) -> None:
        if self.tokens_per_window < 1:
            self.fail("tokens_per_window", "must be positive")
        if self.pooling not in POOLINGS:
            self.fail("pooling", f"expected one of {POOLINGS}")

    def check_frames(self, frames: int) -> str | None:
        if frames % self.tokens_per_window:
            return (f"tokens_per_window={self.tokens_per_window} does not divide the tower's {frames} frames "
                    "per window")
        return None

    def num_output_tokens(self, frames: int) -> int:
        return self.tokens_per_window

    def _din(self, din: int, frames: int) -> int:
        return din * (frames // self.tokens_per_window) if self.pooling == "stack" else din

    def build(self, din: int, dout: int, frames: int, *, rngs: nnx.Rngs, dtype: Any = None,
              param_dtype: Any = jnp.float32) -> PoolMLP:
        return PoolMLP(self, self._din(din, frames), dout, rngs=rngs, dtype=dtype, param_dtype=param_dtype)

    def forward_flops(self, din: int, dout: int, frames: int, windows: int) -> float:
        return 2.0 * windows * self.tokens_per_window * (self._din(din, frames) * dout + dout * dout)


class PoolMLP(Mlp2xGelu):
    """`pool_mlp`: group pooling, then ``linear_1`` -> GELU -> ``linear_2`` per token."""

    def __init__(self, cfg: PoolMLPConfig, din: int, dout: int, *, rngs: nnx.Rngs, **kw: Any):
        super().__init__(din, dout, rngs=rngs, **kw)
        self.tokens, self.pooling = cfg.tokens_per_window, cfg.pooling

    def __call__(self, x: jax.Array) -> jax.Array:
        """float[N, T, Da] -> float[N, tokens_per_window, D]."""
        n, t, d = x.shape
        groups = x.reshape(n, self.tokens, t // self.tokens, d)
        if self.pooling == "mean":
            pooled = groups.mean(axis=2)
        elif self.pooling == "max":
            pooled = groups.max(axis=2)
        else:
            pooled = groups.reshape(n, self.tokens, -1)
        return super().__call__(pooled)

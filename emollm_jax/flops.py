"""Analytic training FLOPs of an EmoLLM step and model FLOPs utilisation (MFU).

Definition follows MaxText (`calculate_tflops_training_per_device`): matmul FLOPs only, 2 per multiply-add,
training = forward + backward = 3x forward for trained parts, causal attention scores counted at half. A
frozen part is counted forward-only when no gradient flows through it (a tower under stop_gradient);
a frozen part that gradients pass through (the LLM in a projector-only stage) still costs backward-through-
activations, which we count as 2x forward (no weight gradients).
On CPU there is no published peak, so `device_peak_flops` measures one with a large fp32 matmul, once per
machine, and caches it.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import platform
import time
from pathlib import Path

import jax
import jax.numpy as jnp

# Dense bf16 peak per chip (vendor data sheets). Keys are substrings of `device.device_kind`.
_PEAK_BF16 = (
    ("H200", 989e12), ("H100", 989e12), ("A100", 312e12), ("L4", 121e12), ("A10", 125e12), ("V100", 125e12),
    ("TPU v6", 918e12), ("TPU v5p", 459e12), ("TPU v5 lite", 197e12), ("TPU v5e", 197e12), ("TPU v4", 275e12),
)


@dataclasses.dataclass(frozen=True)
class StepFlops:
    """FLOPs of one training step, split by tower (for the log and for checking the formula)."""

    decoder: float
    vision: float
    projector: float
    audio: float = 0.0  # the audio tower
    audio_projector: float = 0.0

    @property
    def total(self) -> float:
        return self.decoder + self.vision + self.projector + self.audio + self.audio_projector


def _mult(trained: bool, grad_flows: bool) -> float:
    """Forward=1; + activation gradients=1 when gradients pass through; + weight gradients=1 when trained."""
    return 1.0 + float(grad_flows or trained) + float(trained)


def projector_flops(num_params: int, frames: int, patches: int, *, trained: bool) -> float:
    """Approximation: every projector weight is used once per patch token (exact for MLPs; MVP's graph
    aggregation and gates are small next to its projections)."""
    return _mult(trained, True) * 2.0 * num_params * frames * patches


def step_flops(model_cfg, *, batch: int, seq_len: int, frames: int, projector_params: int,
               trainable: tuple[str, ...] | set[str], audio_windows: int = 0) -> StepFlops:
    """FLOPs of one step for an `EmoLLMConfig` and a batch of `batch` x `seq_len` tokens with `frames` real
    frames and `audio_windows` real windows of sound; `trainable` are the stage's groups (vision / audio /
    projector / llm / lora). Each part gives its own forward FLOPs (`forward_flops`); this adds the backward
    passes the stage runs."""
    trainable = set(trainable)
    llm_trained = "llm" in trainable or "lora" in trainable
    vision_grad = "vision" in trainable and not model_cfg.freeze_vision
    return StepFlops(
        decoder=_mult(llm_trained, True) * model_cfg.text.forward_flops(batch, seq_len),
        vision=_mult(vision_grad, vision_grad) * model_cfg.vision.forward_flops(frames),
        projector=projector_flops(projector_params, frames, model_cfg.vision.num_patches,
                                  trained="projector" in trainable),
        **audio_flops(model_cfg, audio_windows, trainable),
    )


def audio_flops(model_cfg, windows: int, trainable: set[str]) -> dict[str, float]:
    """The audio tower's and audio projector's FLOPs for `windows` windows (none without an audio tower)."""
    audio = getattr(model_cfg, "audio", None)
    if audio is None or windows <= 0:
        return {}
    grad = "audio" in trainable and not model_cfg.freeze_audio
    projector = model_cfg.audio_projector.forward_flops(audio.width, model_cfg.text.hidden_size,
                                                         audio.frames_per_window, windows)
    return {"audio": _mult(grad, grad) * audio.forward_flops(windows),
            "audio_projector": _mult("projector" in trainable, True) * projector}


def _cache_file() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "emollm_jax" / "peak_flops.json"


def measure_matmul_flops(n: int = 2048, repeats: int = 5) -> float:
    """Best-of-`repeats` fp32 FLOP/s of an n x n x n matmul on the default device (host peak on CPU)."""
    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda x, y: x @ y)
    f(a, a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        f(a, a).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n**3 / best


@functools.cache
def device_peak_flops() -> tuple[float, str]:
    """(peak FLOP/s of the whole local process, how it was obtained).

    Accelerators: data-sheet bf16 peak per chip x local chips. CPU: measured fp32 matmul peak of the host (all
    fake CPU devices share the same cores), cached per machine in ~/.cache/emollm_jax/peak_flops.json.
    """
    dev = jax.local_devices()[0]
    if dev.platform != "cpu":
        for key, peak in _PEAK_BF16:
            if key.lower() in dev.device_kind.lower():
                n = jax.local_device_count()
                return peak * n, f"{dev.device_kind} bf16 data-sheet peak x{n} chips"
        return float("nan"), f"unknown peak for {dev.device_kind}"
    key = f"{platform.node()}|{platform.processor() or platform.machine()}|{os.cpu_count()}"
    path = _cache_file()
    try:
        cached = json.loads(path.read_text())
        if key in cached:
            return float(cached[key]), f"CPU fp32 matmul peak measured earlier (cache {path})"
    except (OSError, ValueError):
        cached = {}
    peak = measure_matmul_flops()
    cached[key] = peak
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(cached, indent=1))
        tmp.replace(path)
    except OSError:
        pass
    return peak, "CPU fp32 2048^3 matmul peak measured now"


def mfu(flops_per_step: float, step_seconds: float, peak: float) -> float:
    """Model FLOPs utilisation in [0, 1]."""
    return flops_per_step / step_seconds / peak if step_seconds > 0 and peak > 0 else float("nan")

"""What the training loop calls around its steps: logging, checkpointing, the non-finite stop, profiling.

The loop (`train.train`) runs stages and steps and nothing else; at fixed points it calls every hook in order:

    on_stage_start(stage)                  before the stage's first step call of this run
    on_compile(stage, shape, seconds)      after the step was compiled for a new batch shape
    on_step(stage, step)                   after each step call, with its host metrics and the new state
    on_stage_end(stage)                    when the stage ends, also when it ends with an exception
    on_run_end()                           after the last stage finished without an exception
    close()                                always, last

A hook is a `Hook` subclass overriding what it needs; raising in a method stops the run (the exception
reaches the caller of `train.train`, and the later hooks' `on_stage_end` and `close` still run). The built-in
hooks run first, in this order: `NonFiniteStop`, `TrainLogging`, `Checkpointing`, `Profiling`; hooks passed
to `train.train(..., hooks=...)` run after them, so they see steps that are finite, logged and saved.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jax
import numpy as np

from emollm_jax import flops
from emollm_jax.metrics import MetricsLogger, StageProgress
from emollm_jax.models.emollm import EmoLLMConfig

if TYPE_CHECKING:
    from emollm_jax.checkpoint import Checkpointer

log = logging.getLogger(__name__)


class NonFiniteError(FloatingPointError):
    """The loss or gradient norm stopped being finite; the last complete checkpoint is left in place."""


@dataclasses.dataclass(frozen=True)
class StageInfo:
    """The stage being run, as hooks see it. Step numbers count step calls (micro-batches when
    `grad_accum` > 1), 1-based within the stage."""

    name: str
    index: int  # position in config.stage_order
    steps: int  # step calls of the stage: optimizer updates x grad_accum
    initial_step: int  # step calls done before this run reached the stage (a resume point; 0 when fresh)
    grad_accum: int
    lr_fn: Callable[[int], float]  # optimizer update -> learning rate
    model_cfg: EmoLLMConfig
    trainable: tuple[str, ...]
    projector_params: int


@dataclasses.dataclass(frozen=True)
class StepEvent:
    """One finished step call. `params` and `opt_state` are the state after it; their buffers are donated to
    the next step, so a hook must use them (save, copy to host) before returning, never keep them."""

    stage_step: int
    global_step: int
    metrics: dict[str, float]  # loss, grad_norm, supervised_tokens: the global batch's, on every process
    batch: dict[str, np.ndarray]  # this process's part of the batch (host arrays)
    params: Any
    opt_state: Any
    data_state: dict  # the data iterator's state just past this batch: what a resume restarts from


class Hook:
    """Base of all hooks: every method does nothing."""

    def on_stage_start(self, stage: StageInfo) -> None:
        pass

    def on_compile(self, stage: StageInfo, shape: tuple[int, ...], seconds: float) -> None:
        pass

    def on_step(self, stage: StageInfo, step: StepEvent) -> None:
        pass

    def on_stage_end(self, stage: StageInfo) -> None:
        pass

    def on_run_end(self) -> None:
        pass

    def close(self) -> None:
        pass


class Hooks(Hook):
    """Several hooks called in order. `on_stage_end` and `close` reach every hook even when one raises; the
    first exception is re-raised after all were called."""

    def __init__(self, hooks: Iterable[Hook]):
        self.hooks: list[Hook] = list(hooks)

    def on_stage_start(self, stage: StageInfo) -> None:
        for h in self.hooks:
            h.on_stage_start(stage)

    def on_compile(self, stage: StageInfo, shape: tuple[int, ...], seconds: float) -> None:
        for h in self.hooks:
            h.on_compile(stage, shape, seconds)

    def on_step(self, stage: StageInfo, step: StepEvent) -> None:
        for h in self.hooks:
            h.on_step(stage, step)

    def on_stage_end(self, stage: StageInfo) -> None:
        _call_all([lambda h=h: h.on_stage_end(stage) for h in self.hooks])

    def on_run_end(self) -> None:
        for h in self.hooks:
            h.on_run_end()

    def close(self) -> None:
        _call_all([h.close for h in self.hooks])


def _call_all(calls: Sequence[Callable[[], None]]) -> None:
    error = None
    for call in calls:
        try:
            call()
        except BaseException as e:  # noqa: BLE001  (re-raised below, after the others ran)
            error = error or e
    if error is not None:
        raise error


class NonFiniteStop(Hook):
    """Stops the run with `NonFiniteError` at the first step whose loss or gradient norm is not finite,
    before that step is logged or saved."""

    def __init__(self, ckpt: Checkpointer):
        self.ckpt = ckpt

    def on_step(self, stage: StageInfo, step: StepEvent) -> None:
        loss, gnorm = step.metrics["loss"], step.metrics["grad_norm"]
        if not (math.isfinite(loss) and math.isfinite(gnorm)):
            raise NonFiniteError(f"stage {stage.name!r} step {step.stage_step} (global step "
                                 f"{step.global_step}): loss={loss}, grad_norm={gnorm}; stopping, the last "
                                 f"complete checkpoint (step {self.ckpt.latest_step()}) is kept")


class Checkpointing(Hook):
    """Offers every step to the checkpointer (it saves every `train.checkpoint_every` steps) and forces a
    save at each stage's last step; waits for pending saves at the end of the run."""

    def __init__(self, ckpt: Checkpointer):
        self.ckpt = ckpt

    def on_step(self, stage: StageInfo, step: StepEvent) -> None:
        self.save(stage, step, force=step.stage_step == stage.steps)

    def save(self, stage: StageInfo, step: StepEvent, *, force: bool = False) -> bool:
        """Checkpoint of the state after `step` (params, optimizer, data iterator, stage position)."""
        meta = dict(stage_index=stage.index, stage_name=stage.name, stage_step=step.stage_step,
                    global_step=step.global_step)
        return self.ckpt.save(step.global_step, params=step.params, opt_state=step.opt_state, meta=meta,
                              data_state=step.data_state, force=force)

    def on_run_end(self) -> None:
        self.ckpt.wait()


class TrainLogging(Hook):
    """metrics.jsonl + TensorBoard (`MetricsLogger`), a progress bar per stage (`StageProgress`) and the
    loss PNGs at the end. Every `log_every` step calls (and at a stage's last) one record with the step's
    metrics and the throughput since the previous record; compile time is left out of that window. Only
    `enabled` (process 0) writes; compile times are logged by every process."""

    def __init__(self, workdir: str | Path, *, log_every: int, peak_flops: float, stages: Sequence[str],
                 process_count: int = 1, enabled: bool = True):
        self.logger = MetricsLogger(workdir, enabled=enabled)
        self.log_every, self.peak, self.stages = log_every, peak_flops, list(stages)
        self.process_count, self.enabled = process_count, enabled
        self._bar: StageProgress | None = None
        self._window_start, self._window_tokens, self._window_steps = time.perf_counter(), 0, 0

    def _reset_window(self) -> None:
        self._window_start, self._window_tokens, self._window_steps = time.perf_counter(), 0, 0

    def on_stage_start(self, stage: StageInfo) -> None:
        self._bar = StageProgress(stage.name, stage.steps, stage.initial_step, enabled=self.enabled)
        self._reset_window()

    def on_compile(self, stage: StageInfo, shape: tuple[int, ...], seconds: float) -> None:
        log.info("stage %s: train step for batch %s compiled in %.1f s", stage.name, shape, seconds)
        self._window_start = time.perf_counter()

    def on_step(self, stage: StageInfo, step: StepEvent) -> None:
        b, t = step.batch["input_ids"].shape
        self._window_tokens += b * t * self.process_count
        self._window_steps += 1
        if step.stage_step % self.log_every == 0 or step.stage_step == stage.steps:
            rec = self._record(stage, step, time.perf_counter() - self._window_start)
            self.logger.write(rec)
            self._bar.update(self._window_steps, loss=rec["loss"], tok_s=rec["tokens_per_s"])
            self._reset_window()

    def _record(self, stage: StageInfo, step: StepEvent, seconds: float) -> dict[str, Any]:
        """One metrics.jsonl record for the window of step calls ending at `step`, `seconds` long."""
        b, t = step.batch["input_ids"].shape
        f = flops.step_flops(stage.model_cfg, batch=b * self.process_count, seq_len=t,
                             frames=self._frames(step.batch), projector_params=stage.projector_params,
                             trainable=stage.trainable, audio_windows=self._frames(step.batch, "audio_media"))
        step_time = seconds / max(self._window_steps, 1)
        m = step.metrics
        return dict(step=step.global_step, stage=stage.name, stage_step=step.stage_step, loss=m["loss"],
                    lr=float(stage.lr_fn((step.stage_step - 1) // stage.grad_accum)),
                    grad_norm=m["grad_norm"], supervised_tokens=m["supervised_tokens"],
                    tokens_per_s=self._window_tokens / seconds, step_time_s=step_time,
                    mfu=flops.mfu(f.total / self.process_count, step_time, self.peak))

    def _frames(self, batch: dict[str, np.ndarray], key: str = "frame_media") -> int:
        """Real frames (or audio windows, key "audio_media") in the global batch (this process's count x
        processes)."""
        return int(np.sum(batch[key] >= 0)) * self.process_count if key in batch else 0

    def on_stage_end(self, stage: StageInfo) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        self.logger.flush()

    def close(self) -> None:
        try:
            if self.enabled:
                self.logger.plot(self.stages)
        finally:
            self.logger.close()


class Profiling(Hook):
    """Traces `steps` step calls with `jax.profiler` into `directory` (TensorBoard's profile plugin and
    Perfetto read it), starting right after the run's first step, so compilation stays out of the trace.
    One trace per run; `steps` <= 0: off. A run that ends sooner stops the trace with the steps it had."""

    def __init__(self, directory: str | Path, steps: int):
        self.directory, self.steps = Path(directory), int(steps)
        self._traced = 0  # step calls traced so far
        self._first: tuple[str, int] | None = None  # (stage, stage step) of the first traced call, once on
        self._done = self.steps <= 0

    def on_step(self, stage: StageInfo, step: StepEvent) -> None:
        if self._done:
            return
        if self._first is None:
            self.directory.mkdir(parents=True, exist_ok=True)
            jax.profiler.start_trace(str(self.directory))
            self._first = (stage.name, step.stage_step + 1)
            return
        self._traced += 1
        if self._traced == self.steps:
            self._stop()

    def _stop(self) -> None:
        jax.profiler.stop_trace()
        self._done = True
        stage, first = self._first
        log.info("profile of %d step calls (stage %s from step %d) -> %s", self._traced, stage, first,
                 self.directory)

    def close(self) -> None:
        if self._first is not None and not self._done:
            self._stop()

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
hooks run first, in this order: `NonFiniteStop`, `TrainLogging`, `Checkpointing`, `Preemption`, `Profiling`;
hooks passed to `train.train(..., hooks=...)` run after them, so they see steps that are finite, logged and
saved.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import signal
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jax
import numpy as np

from data_pipeline import storage
from emollm_jax import flops
from emollm_jax.logs import FILE_ONLY
from emollm_jax.metrics import MetricsLogger, StageProgress
from emollm_jax.models.emollm import EmoLLMConfig

if TYPE_CHECKING:
    from emollm_jax.checkpoint import Checkpointer

log = logging.getLogger(__name__)


class NonFiniteError(FloatingPointError):
    """The loss, gradient norm or weights stopped being finite; the last good checkpoint is left in place."""


class Preempted(Exception):  # noqa: N818  (an event the caller handles, not a fault)
    """SIGTERM (how cloud preemption arrives) or the cluster's preemption notice stopped the run after a
    checkpoint of `step` was saved; running the same command resumes from it. `exit_code` is 75 (EX_TEMPFAIL:
    try again)."""

    exit_code = 75

    def __init__(self, step: int, directory: str | Path):
        super().__init__(f"preempted: checkpoint of step {step} saved in {directory}; run the same command "
                         "to resume")
        self.step, self.directory = step, directory


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
    before that step is logged or saved. That step's loss was computed from the weights of the step before:
    if those were checkpointed, the checkpoint is moved aside (`<step>.nonfinite`, kept for inspection), so
    the newest checkpoint left is one whose weights gave a finite loss. (Weights that are themselves NaN or
    inf are never saved: `Checkpointing`.)"""

    def __init__(self, ckpt: Checkpointer):
        self.ckpt = ckpt

    def on_step(self, stage: StageInfo, step: StepEvent) -> None:
        loss, gnorm = step.metrics["loss"], step.metrics["grad_norm"]
        if math.isfinite(loss) and math.isfinite(gnorm):
            return
        where = f"stage {stage.name!r} step {step.stage_step} (global step {step.global_step})"
        note = ""
        previous = step.global_step - 1
        if self.ckpt.latest_step() == previous:
            why = (f"checkpoint step {previous} holds the weights that gave loss={loss}, grad_norm={gnorm} "
                   f"at global step {step.global_step}")
            moved = self.ckpt.set_aside(previous, "nonfinite", why)
            note = f"checkpoint {previous} holds the weights that gave it, moved to {moved}; "
        raise NonFiniteError(f"{where}: loss={loss}, grad_norm={gnorm}; stopping; {note}"
                             f"{_kept(self.ckpt)}")


def _kept(ckpt: Checkpointer) -> str:
    latest = ckpt.latest_step()
    if latest is None:
        return "no checkpoint is left: a rerun starts from the initial weights"
    return f"the last good checkpoint (step {latest}) is kept"


class Checkpointing(Hook):
    """Offers every step to the checkpointer (it saves every `train.checkpoint_every` steps) and forces a
    save at each stage's last step; waits for pending saves at the end of the run."""

    def __init__(self, ckpt: Checkpointer):
        self.ckpt = ckpt

    def on_step(self, stage: StageInfo, step: StepEvent) -> None:
        self.save(stage, step, force=step.stage_step == stage.steps)

    def save(self, stage: StageInfo, step: StepEvent, *, force: bool = False) -> bool:
        """Checkpoint of the state after `step` (params, optimizer, data iterator, stage position); weights
        or optimizer state holding NaN or inf stop the run with `NonFiniteError` instead."""
        from emollm_jax.checkpoint import NonFiniteCheckpointError

        meta = dict(stage_index=stage.index, stage_name=stage.name, stage_step=step.stage_step,
                    global_step=step.global_step)
        try:
            return self.ckpt.save(step.global_step, params=step.params, opt_state=step.opt_state, meta=meta,
                                  data_state=step.data_state, force=force)
        except NonFiniteCheckpointError as e:
            raise NonFiniteError(f"stage {stage.name!r} step {step.stage_step} (global step "
                                 f"{step.global_step}): {e}; stopping; {_kept(self.ckpt)}") from e

    def on_run_end(self) -> None:
        self.ckpt.wait()


class Preemption(Hook):
    """On a preemption notice, saves a checkpoint of the step just finished and stops the run with
    `Preempted`; the same command then resumes exactly there.

    One process: the notice is SIGTERM, caught by a handler installed while the run trains (from the main
    thread only) that just sets a flag; the step in flight finishes first. Several processes: JAX's
    preemption service (started by `jax.distributed.initialize`) catches SIGTERM on any of them and agrees
    on a step every process reaches (`multihost_utils.reached_preemption_sync_point`), so all save the
    same step; with that service disabled, the processes OR their SIGTERM flags after every step."""

    def __init__(self, checkpointing: Checkpointing, process_count: int = 1):
        self.checkpointing, self.process_count = checkpointing, process_count
        self.requested = threading.Event()
        self._service = process_count > 1 and _preemption_service()
        self._previous: Any = None
        self._installed = False

    def on_stage_start(self, stage: StageInfo) -> None:
        if self._service or self._installed or threading.current_thread() is not threading.main_thread():
            return
        self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        self._installed = True

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        if not self.requested.is_set():
            log.warning("SIGTERM: saving a checkpoint after the step in flight, then stopping")
        self.requested.set()

    def reached(self, global_step: int) -> bool:
        """Whether the run must save and stop after `global_step` (the same answer on every process)."""
        if self._service:
            from jax.experimental import multihost_utils

            return multihost_utils.reached_preemption_sync_point(global_step)
        if self.process_count > 1:
            from jax.experimental import multihost_utils

            flags = multihost_utils.process_allgather(np.asarray([self.requested.is_set()], np.int32))
            return bool(np.any(flags))
        return self.requested.is_set()

    def on_step(self, stage: StageInfo, step: StepEvent) -> None:
        if self.reached(step.global_step):
            self.checkpointing.save(stage, step, force=True)
            self.checkpointing.ckpt.wait()
            raise Preempted(step.global_step, self.checkpointing.ckpt.directory)

    def on_run_end(self) -> None:
        """A SIGTERM during the last step: the run is complete and saved, but still stops (one process; with
        several, only a notice all of them agreed on counts)."""
        latest = self.checkpointing.ckpt.latest_step()
        if self.process_count == 1 and self.requested.is_set() and latest is not None:
            raise Preempted(latest, self.checkpointing.ckpt.directory)

    def close(self) -> None:
        if self._installed:
            signal.signal(signal.SIGTERM, self._previous)
            self._installed = False


def _preemption_service() -> bool:
    """Whether JAX's preemption sync manager runs (multi-process runs, unless turned off). JAX has no public
    query for it; `multihost_utils.reached_preemption_sync_point` reads the same attribute."""
    try:
        from jax._src import distributed
    except ImportError:
        return False
    return getattr(distributed.global_state, "preemption_sync_manager", None) is not None


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
        log.info("stage %s: train step for batch %s compiled in %.1f s", stage.name, shape, seconds,
                 extra=FILE_ONLY)
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
        self.directory, self.steps = str(directory), int(steps)
        self._mirror: storage.Mirror | None = None  # a local trace directory, uploaded when the trace ends
        self._traced = 0  # step calls traced so far
        self._first: tuple[str, int] | None = None  # (stage, stage step) of the first traced call, once on
        self._done = self.steps <= 0

    def on_step(self, stage: StageInfo, step: StepEvent) -> None:
        if self._done:
            return
        if self._first is None:
            self._mirror = storage.Mirror(self.directory, directory=True)
            os.makedirs(self._mirror.local, exist_ok=True)
            jax.profiler.start_trace(self._mirror.local)
            self._first = (stage.name, step.stage_step + 1)
            return
        self._traced += 1
        if self._traced == self.steps:
            self._stop()

    def _stop(self) -> None:
        jax.profiler.stop_trace()
        self._mirror.close()
        self._done = True
        stage, first = self._first
        log.info("profile of %d step calls (stage %s from step %d) -> %s", self._traced, stage, first,
                 self.directory)

    def close(self) -> None:
        if self._first is not None and not self._done:
            self._stop()

"""Sequential multi-stage training of EmoLLM: functional state, one jitted sharded step, exact resume.

The model is split once (`nnx.split`) into a static graphdef and a params pytree; the step is a pure function
`(params, opt_state, batch) -> (params, opt_state, metrics)` compiled with explicit in/out shardings and the
state donated. Each stage (config.stage_order) brings its own data mixture, trainable groups, schedule and a
fresh optimizer state; params carry over. Checkpoints hold params, optimizer state, the data iterator state,
the stage index and the step, so a killed run resumes on exactly the batches it would have seen.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from emollm_jax import experiment, flops, sharding
from emollm_jax.configuration import Section
from emollm_jax.metrics import MetricsLogger, StageProgress
from emollm_jax.models.emollm import EmoLLM, EmoLLMConfig


@dataclasses.dataclass(frozen=True)
class TrainConfig(Section):
    """`config.train`: logging, checkpointing and the loss's chunking."""

    log_every: int = 10          # steps between metric lines
    checkpoint_every: int = 200  # steps between checkpoints
    max_to_keep: int = 2         # newest checkpoints kept
    # Cross-entropy over the vocab in chunks of this many positions (0: all at once); chunks where no row is
    # supervised are skipped (answer-only loss: most are).
    loss_chunk: int = 32
    profile: bool = False

    def check(self) -> None:
        for field in ("log_every", "checkpoint_every", "max_to_keep"):
            if getattr(self, field) <= 0:
                self.fail(field, "must be positive")
        if self.loss_chunk < 0:
            self.fail("loss_chunk", "must be >= 0 (0: the whole sequence at once)")


log = logging.getLogger(__name__)

BATCH_KEYS = ("input_ids", "attention_mask", "targets", "loss_mask", "pixel_values", "frame_media")


class NonFiniteError(FloatingPointError):
    """The loss or gradient norm stopped being finite; the last complete checkpoint is left in place."""


class StageData(Protocol):
    """A stage's batch stream (C2's Grain iterator): numpy batches with the contract's keys, resumable."""

    def __next__(self) -> dict[str, np.ndarray]: ...
    def get_state(self) -> dict: ...
    def set_state(self, state: dict) -> None: ...


# (config, stage, setup, tokenizer, model_cfg, local_batch, process_index, process_count)
#   -> (iterator, number of records in the stage's mixture)
DataFactory = Callable[..., tuple[StageData, int]]


# ----------------------------------------------------------------------------------------------------- loss


def token_cross_entropy(logits_fn: Callable[[jax.Array], jax.Array], hidden: jax.Array, targets: jax.Array,
                        loss_mask: jax.Array, chunk: int = 0) -> tuple[jax.Array, jax.Array]:
    """Mean cross-entropy over supervised tokens: (loss float32[], supervised token count float32[]).

    hidden: float[B, T, D] final-normed; targets int32[B, T]; loss_mask float32[B, T]; `logits_fn` maps
    float[..., D] -> float[..., V] (the vocab projection; whatever it closes over gets gradients).
    Fused: the forward pass also forms the gradient `(softmax - onehot) * mask` of each chunk of logits and
    pulls it back through `logits_fn` at once, so float32[B, T, V] logits are made once, never kept for the
    backward pass, and never recomputed (the backward pass only scales the stored gradients). With `chunk` > 0
    this happens `chunk` positions at a time, so at most float32[B, chunk, V] exists at once, and a chunk with
    no supervised token in any row is skipped (its loss and gradients are exactly zero): with answer-only
    masks most of the vocab projection's work, forward and backward, is never done.
    """
    mask = loss_mask.astype(jnp.float32)
    b, t = targets.shape
    chunk = t if chunk <= 0 or chunk >= t else chunk
    pad = -t % chunk
    h = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
    tg, m = jnp.pad(targets, ((0, 0), (0, pad))), jnp.pad(mask, ((0, 0), (0, pad)))
    n = (t + pad) // chunk
    xs = (h.reshape(b, n, chunk, -1).swapaxes(0, 1), tg.reshape(b, n, chunk).swapaxes(0, 1),
          m.reshape(b, n, chunk).swapaxes(0, 1))
    fn, consts = jax.closure_convert(logits_fn, xs[0][0])
    total = _fused_ce(fn, consts, *xs)
    count = jnp.sum(mask)
    return total / jnp.maximum(count, 1.0), count


def _masked_nll(logits: jax.Array, targets: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(summed masked negative log-likelihood, logsumexp per position) of float32 logits."""
    lse = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return jnp.sum((lse - picked) * mask), lse


def _ce_chunk(fn: Callable, consts: list, h: jax.Array, targets: jax.Array, mask: jax.Array):
    """Summed masked cross-entropy of one chunk and its gradients w.r.t. (consts, h)."""
    logits, pullback = jax.vjp(lambda c, x: fn(x, *c).astype(jnp.float32), consts, h)
    loss, lse = _masked_nll(logits, targets, mask)
    onehot = jax.nn.one_hot(targets, logits.shape[-1], dtype=jnp.float32)
    dlogits = (jnp.exp(logits - lse[..., None]) - onehot) * mask[..., None]
    dconsts, dh = pullback(dlogits)
    return loss, dconsts, dh


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _fused_ce(fn: Callable, consts: list, h: jax.Array, targets: jax.Array, mask: jax.Array) -> jax.Array:
    """Summed cross-entropy; h float[N, B, C, D], targets int32[N, B, C], mask float32[N, B, C] (N chunks)."""

    def chunk_loss(hc, tc, mc):
        return _masked_nll(fn(hc, *consts).astype(jnp.float32), tc, mc)[0]

    def body(total, x):
        hc, tc, mc = x
        add = lambda: total + chunk_loss(hc, tc, mc)  # noqa: E731
        return jax.lax.cond(jnp.any(mc != 0), add, lambda: total), None

    if h.shape[0] == 1:
        return chunk_loss(h[0], targets[0], mask[0])
    return jax.lax.scan(body, jnp.zeros((), jnp.float32), (h, targets, mask))[0]


def _fused_ce_fwd(fn, consts, h, targets, mask):
    if h.shape[0] == 1:
        loss, dconsts, dh = _ce_chunk(fn, consts, h[0], targets[0], mask[0])
        return loss, (dconsts, dh[None])

    def body(carry, x):
        hc, tc, mc = x

        def add():
            total, acc = carry
            loss, dconsts, dh = _ce_chunk(fn, consts, hc, tc, mc)
            return (total + loss, jax.tree.map(jnp.add, acc, dconsts)), dh

        return jax.lax.cond(jnp.any(mc != 0), add, lambda: (carry, jnp.zeros_like(hc)))

    zeros = jax.tree.map(jnp.zeros_like, consts)
    (total, dconsts), dh = jax.lax.scan(body, (jnp.zeros((), jnp.float32), zeros), (h, targets, mask))
    return total, (dconsts, dh)


def _fused_ce_bwd(fn, residuals, g):
    dconsts, dh = residuals
    scale = lambda x: (g * x).astype(x.dtype)  # noqa: E731
    return jax.tree.map(scale, dconsts), scale(dh), None, None


_fused_ce.defvjp(_fused_ce_fwd, _fused_ce_bwd)


def model_loss(model: EmoLLM, batch: dict[str, jax.Array], chunk: int = 0) -> tuple[jax.Array, jax.Array]:
    """Answer-token cross-entropy of `model` on a training batch (contract batch keys)."""
    hidden = model(batch["input_ids"], attention_mask=batch["attention_mask"],
                   pixel_values=batch.get("pixel_values"), frame_media=batch.get("frame_media"),
                   return_hidden=True)
    return token_cross_entropy(model.llm.logits, hidden, batch["targets"], batch["loss_mask"], chunk)


# ------------------------------------------------------------------------------------------------ the step


def make_train_step(graphdef: nnx.GraphDef, rest: nnx.State, tx: optax.GradientTransformation,
                    trainable: Any, loss_chunk: int = 0) -> Callable:
    """Pure step `(params, opt_state, batch) -> (params, opt_state, metrics)`; `trainable` is a bool tree like
    params (only trainable leaves enter the reported grad norm)."""

    def step(params, opt_state, batch):
        def loss_of(p):
            return model_loss(nnx.merge(graphdef, p, rest), batch, loss_chunk)

        (loss, count), grads = jax.value_and_grad(loss_of, has_aux=True)(params)
        trained = jax.tree.map(lambda g, t: g if t else jnp.zeros((), g.dtype), grads, trainable)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        metrics = {"loss": loss, "grad_norm": optax.global_norm(trained), "supervised_tokens": count}
        return params, opt_state, metrics

    return step


@dataclasses.dataclass
class StageState:
    """Everything compiled and sharded for one stage."""

    name: str
    index: int
    total_steps: int  # optimizer updates
    grad_accum: int  # micro-batches per update: the loop runs total_steps * grad_accum step calls
    tx: optax.GradientTransformation
    lr_fn: Callable[[int], float]
    trainable: tuple[str, ...]
    model_cfg: EmoLLMConfig
    graphdef: nnx.GraphDef
    rest: nnx.State
    param_shardings: Any
    opt_shardings: Any
    abstract_params: Any
    abstract_opt: Any
    step_fn: Callable


def abstract_model(model_cfg: EmoLLMConfig, seed: int = 0) -> tuple[nnx.GraphDef, Any, nnx.State]:
    """(graphdef, abstract params, other state) without allocating weights."""
    model = nnx.eval_shape(lambda: experiment.new_model(model_cfg, seed))
    return nnx.split(model, nnx.Param, ...)


def build_stage(config: ml_collections.ConfigDict, index: int, base_cfg: EmoLLMConfig,
                mesh: jax.sharding.Mesh, total_steps: int) -> StageState:
    """Optimizer, shardings and the jitted step for stage `config.stage_order[index]`. The vision tower sits
    under stop_gradient unless the stage trains it, so frozen-tower stages skip its backward pass."""
    from emollm_jax.optim import make_optimizer

    name = config.stage_order[index]
    stage = config.stages[name]
    trainable = tuple(stage.trainable)
    model_cfg = dataclasses.replace(base_cfg, freeze_vision="vision" not in trainable)
    graphdef, abstract_params, rest = abstract_model(model_cfg, config.seed)
    opt = make_optimizer(stage, abstract_params, total_steps)
    tx, lr_fn = opt.tx, opt.lr_fn
    abstract_opt = jax.eval_shape(tx.init, abstract_params)
    param_sh = sharding.logical_shardings(abstract_params, mesh, config.sharding_rules)
    opt_sh = sharding.optimizer_shardings(abstract_opt, param_sh, mesh)
    mask = opt.trainable_mask(abstract_params)
    step = make_train_step(graphdef, rest, tx, mask, int(config.train.loss_chunk))
    step_fn = jax.jit(step, in_shardings=(param_sh, opt_sh, sharding.data_sharding(mesh)),
                      out_shardings=(param_sh, opt_sh, sharding.replicated(mesh)), donate_argnums=(0, 1))
    return StageState(name, index, total_steps, int(opt.grad_accum), tx, lr_fn, trainable, model_cfg,
                      graphdef, rest, param_sh, opt_sh, abstract_params, abstract_opt, step_fn)


def init_params(config: ml_collections.ConfigDict, model_cfg: EmoLLMConfig, param_shardings: Any,
                init_from: str | None = None) -> Any:
    """Fresh params created directly with their shardings (jit out_shardings), then pretrained weights if
    configured."""
    def create():
        return nnx.state(experiment.new_model(model_cfg, config.seed), nnx.Param)

    params = jax.jit(create, out_shardings=param_shardings)()
    if init_from or config.init.hf or config.init.llm or config.init.vision or config.init.params:
        model = experiment.new_model(model_cfg, config.seed)
        experiment.load_initial_weights(config, model, init_from)
        params = jax.device_put(nnx.state(model, nnx.Param), param_shardings)
    return params


def stage_steps(stage: ml_collections.ConfigDict, num_records: int) -> int:
    """Optimizer steps of a stage: `steps`, or `epochs` over `num_records` at the stage's global batch."""
    if stage.steps > 0:
        return int(stage.steps)
    return max(1, math.ceil(stage.epochs * num_records / stage.batch_size))


# ------------------------------------------------------------------------------------------------- data


def stage_records(setup: experiment.DataSetup, split: str, tasks: tuple[str, ...],
                  out: Path) -> tuple[Path, int]:
    """Writes the records of `tasks` from `<root>/<split>.jsonl` to `out` (a stage's mixture, in file order);
    returns (path, record count). Rewritten atomically, so concurrent processes agree."""
    from data_pipeline.records import iter_records

    src = Path(setup.root) / f"{split}.jsonl"
    if not src.exists():
        raise FileNotFoundError(f"{src}: no {split!r} record file (config.data.root={setup.root!r})")
    lines = [json.dumps(rec) for _, rec in iter_records(src) if rec.get("task") in tasks]
    if not lines:
        raise ValueError(f"{src}: no record of tasks {list(tasks)}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(out)
    return out, len(lines)


def default_data_factory(config, stage, setup, tokenizer, model_cfg, local_batch, process_index,
                         process_count, *, workdir: str) -> tuple[StageData, int]:
    """C2's Grain pipeline for one stage: this process's shard of the stage's task mixture, repeated."""
    from data_pipeline import pipeline
    from emollm_jax import emoprompt
    from emollm_jax.models.emollm import visual_tokens_per_media

    path, n = stage_records(setup, config.data.train_split, tuple(stage.tasks),
                            Path(workdir) / "mixtures" / f"{stage.name}_{config.data.train_split}.jsonl")
    frames = int(config.data.num_frames)
    spec = pipeline.PipelineSpec(
        sources=(str(path),),
        tokenizer=setup.tokenizer_path,
        data_root=setup.root,
        template=config.data.template,
        image_size=int(config.model.vision.image_size),
        num_frames=frames,
        max_media_frames=frames,
        visual_tokens_fn=functools.partial(visual_tokens_per_media, model_cfg),
        batch_size=local_batch,
        seq_buckets=tuple(config.data.seq_buckets) or (int(config.data.max_len),),
        seed=int(config.seed),
        shuffle=True,
        worker_count=int(config.data.num_workers),
        prompt_prefix=emoprompt.from_config(config, setup.root, workdir),
    )
    it = pipeline.make_train_iterator(spec, tokenizer=tokenizer, process_index=process_index,
                                      process_count=process_count)
    return it, n


# ------------------------------------------------------------------------------------------------- loop


@dataclasses.dataclass
class TrainResult:
    params: Any
    model_cfg: EmoLLMConfig
    global_step: int
    losses: dict[str, list[float]]


def _frames(host: dict[str, np.ndarray]) -> int:
    """Real frames in the global batch (this process's count x processes)."""
    return int(np.sum(host["frame_media"] >= 0)) * jax.process_count() if "frame_media" in host else 0


def _host_batch(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    missing = [k for k in ("input_ids", "attention_mask", "targets", "loss_mask") if k not in batch]
    if missing:
        raise KeyError(f"training batch lacks {missing}; has {sorted(batch)}")
    return {k: np.asarray(batch[k]) for k in BATCH_KEYS if k in batch}


def train(config: ml_collections.ConfigDict, workdir: str, *, init_from: str | None = None,
          data_factory: DataFactory | None = None, mesh: jax.sharding.Mesh | None = None) -> TrainResult:
    """Runs every stage of `config.stage_order`, resuming from the latest checkpoint in `workdir` if any.

    Global step g lies in stage i when offset_i < g <= offset_i + total_i. A checkpoint at a stage's last step
    only hands its params on; one inside a stage also restores optimizer and data-iterator state.
    """
    from emollm_jax.checkpoint import Checkpointer

    data_factory = data_factory or functools.partial(default_data_factory, workdir=workdir)
    workdir_p = Path(workdir)
    lead = jax.process_index() == 0
    mesh = mesh or sharding.make_mesh(dict(config.mesh))
    setup = experiment.prepare_data(config, workdir)
    tokenizer = experiment.load_tokenizer(setup)
    base_cfg = experiment.model_config(config, vocab_size=tokenizer.vocab_size,
                                       image_token_id=tokenizer.image_token_id)
    ckpt = Checkpointer(workdir_p / "checkpoints", max_to_keep=int(config.train.max_to_keep),
                        save_interval_steps=int(config.train.checkpoint_every))
    logger = MetricsLogger(workdir_p, enabled=lead)
    peak, peak_source = flops.device_peak_flops()
    log.info("MFU peak: %.3g FLOP/s per process (%s)", peak, peak_source)

    latest = ckpt.latest_step()
    params, offset, global_step = None, 0, 0
    losses: dict[str, list[float]] = {}
    streams: list[StageData] = []
    try:
        for index, name in enumerate(config.stage_order):
            stage = config.stages[name]
            n_proc = jax.process_count()
            accum = int(stage.grad_accum)
            data, n_records = data_factory(config, stage, setup, tokenizer, base_cfg,
                                           stage.batch_size // accum // n_proc, jax.process_index(), n_proc)
            streams.append(data)  # kept alive to the end: a collected record source closes its descriptor
            updates = stage_steps(stage, n_records)
            total = updates * accum  # step calls (micro-batches) of this stage
            end, start = offset + total, offset
            offset = end
            if latest is not None and params is None and latest > end:
                continue  # finished before the checkpoint we resume from
            st = build_stage(config, index, base_cfg, mesh, updates)
            opt_state, step_in_stage = None, 0
            if latest is not None and params is None:
                params, opt_state, meta, data_state = ckpt.restore(
                    latest, abstract_params=st.abstract_params, abstract_opt_state=st.abstract_opt,
                    param_shardings=st.param_shardings, opt_shardings=st.opt_shardings)
                step_in_stage = latest - start
                if (int(meta["stage_index"]), int(meta["stage_step"])) != (index, step_in_stage):
                    raise ValueError(
                        f"{workdir_p / 'checkpoints'}: checkpoint {latest} was written at stage "
                        f"{meta['stage_name']!r} step {meta['stage_step']}, but the config places step "
                        f"{latest} at "
                        f"stage {name!r} step {step_in_stage}; stage lengths changed (use a new --workdir)")
                global_step = latest
                log.info("resumed from checkpoint %d (stage %s, step %d/%d)", latest, name, step_in_stage,
                         total)
                if step_in_stage >= total:
                    continue
                if data_state is not None:
                    data.set_state(data_state)
            if params is None:
                params = init_params(config, st.model_cfg, st.param_shardings, init_from)
            if opt_state is None:  # fresh optimizer state per stage; params carry over
                opt_state = jax.jit(st.tx.init, out_shardings=st.opt_shardings)(params)
            params, opt_state, global_step, losses[name] = _run_stage(
                config, st, data, params, opt_state, step_in_stage, global_step, mesh, ckpt, logger, peak)
            del opt_state
        ckpt.wait()
    finally:
        if lead:
            logger.plot(list(config.stage_order))
        logger.close()
        ckpt.close()
    return TrainResult(params=params, model_cfg=base_cfg, global_step=global_step, losses=losses)


def _run_stage(config, st: StageState, data: Iterator, params, opt_state, step_in_stage: int,
               global_step: int, mesh, ckpt, logger: MetricsLogger, peak: float):
    """Step calls `step_in_stage + 1 .. total_steps * grad_accum` of one stage. Returns (params, opt_state,
    global_step, losses of this run)."""
    lead = jax.process_index() == 0
    calls = st.total_steps * st.grad_accum
    bar = StageProgress(st.name, calls, step_in_stage, enabled=lead)
    projector_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(st.abstract_params["projector"]))
    losses: list[float] = []
    compiled: dict[tuple[int, ...], Any] = {}  # one executable per sequence bucket (batch shape)
    window_t, window_tokens, window_steps = time.perf_counter(), 0, 0
    upcoming = (_host_batch(next(data)), data.get_state()) if step_in_stage < calls else None
    try:
        for s in range(step_in_stage + 1, calls + 1):
            host, data_state = upcoming  # data_state: the iterator just past this batch, for a resume
            batch = sharding.global_batch(host, mesh)
            shape = tuple(batch["input_ids"].shape)
            if shape not in compiled:
                t0 = time.perf_counter()
                compiled[shape] = st.step_fn.lower(params, opt_state, batch).compile()
                log.info("stage %s: train step for batch %s compiled in %.1f s", st.name, shape,
                         time.perf_counter() - t0)
                window_t = time.perf_counter()
            params, opt_state, metrics = compiled[shape](params, opt_state, batch)
            if s < calls:  # the next batch is read while the device runs this step (dispatch is asynchronous)
                upcoming = (_host_batch(next(data)), data.get_state())
            metrics = jax.device_get(metrics)
            loss, gnorm = float(metrics["loss"]), float(metrics["grad_norm"])
            global_step += 1
            if not (math.isfinite(loss) and math.isfinite(gnorm)):
                raise NonFiniteError(f"stage {st.name!r} step {s} (global step {global_step}): loss={loss}, "
                                     f"grad_norm={gnorm}; stopping, the last complete checkpoint "
                                     f"(step {ckpt.latest_step()}) is kept")
            losses.append(loss)
            b, t = host["input_ids"].shape
            window_tokens += b * t * jax.process_count()
            window_steps += 1
            if s % config.train.log_every == 0 or s == calls:
                dt = time.perf_counter() - window_t
                frames = _frames(host)
                f = flops.step_flops(st.model_cfg, batch=b * jax.process_count(), seq_len=t, frames=frames,
                                     projector_params=projector_params, trainable=st.trainable)
                step_time = dt / max(window_steps, 1)
                rec = dict(step=global_step, stage=st.name, stage_step=s, loss=loss,
                           lr=float(st.lr_fn((s - 1) // st.grad_accum)),
                           grad_norm=gnorm, supervised_tokens=float(metrics["supervised_tokens"]),
                           tokens_per_s=window_tokens / dt, step_time_s=step_time,
                           mfu=flops.mfu(f.total / jax.process_count(), step_time, peak))
                logger.write(rec)
                bar.update(window_steps, loss=loss, tok_s=rec["tokens_per_s"])
                window_t, window_tokens, window_steps = time.perf_counter(), 0, 0
            meta = dict(stage_index=st.index, stage_name=st.name, stage_step=s, global_step=global_step)
            ckpt.save(global_step, params=params, opt_state=opt_state, meta=meta, data_state=data_state,
                      force=s == calls)
    finally:
        bar.close()
        logger.flush()
    return params, opt_state, global_step, losses

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
import logging
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from data_pipeline import storage
from emollm_jax import experiment, flops, lora, sharding
from emollm_jax.configuration import Section
from emollm_jax.data import stage_stream
from emollm_jax.hooks import (
    Checkpointing,
    Hook,
    Hooks,
    NonFiniteStop,
    Preemption,
    Profiling,
    StageInfo,
    StepEvent,
    TrainLogging,
)
from emollm_jax.logs import FILE_ONLY
from emollm_jax.models.emollm import EmoLLM, EmoLLMConfig

if TYPE_CHECKING:
    from emollm_jax.checkpoint import Checkpointer


@dataclasses.dataclass(frozen=True)
class TrainConfig(Section):
    """`config.train`: logging, checkpointing, profiling and the loss's chunking."""

    log_every: int = 10          # steps between metric lines
    checkpoint_every: int = 200  # steps between checkpoints
    max_to_keep: int = 2         # newest checkpoints kept
    # Cross-entropy over the vocab in chunks of this many positions (0: all at once); chunks where no row is
    # supervised are skipped (answer-only loss: most are).
    loss_chunk: int = 32
    profile_steps: int = 0       # trace this many steps after the first one into <workdir>/profile (0: off)

    def check(self) -> None:
        for field in ("log_every", "checkpoint_every", "max_to_keep"):
            if getattr(self, field) <= 0:
                self.fail(field, "must be positive")
        if self.loss_chunk < 0:
            self.fail("loss_chunk", "must be >= 0 (0: the whole sequence at once)")
        if self.profile_steps < 0:
            self.fail("profile_steps", "must be >= 0 (0: no profile)")


log = logging.getLogger(__name__)

BATCH_KEYS = ("input_ids", "attention_mask", "targets", "loss_mask", "pixel_values", "frame_media",
              "audio_features", "audio_media", "segment_ids", "positions")  # the last two: packed rows only


class StageData(Protocol):
    """A stage's batch stream: numpy batches with the keys of BATCH_KEYS, resumable."""

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
    """Answer-token cross-entropy of `model` on a training batch (the keys of BATCH_KEYS; a packed batch
    adds segment_ids and positions)."""
    hidden = model(batch["input_ids"], attention_mask=batch["attention_mask"],
                   pixel_values=batch.get("pixel_values"), frame_media=batch.get("frame_media"),
                   audio_features=batch.get("audio_features"), audio_media=batch.get("audio_media"),
                   segment_ids=batch.get("segment_ids"), positions=batch.get("positions"),
                   return_hidden=True)
    return token_cross_entropy(model.llm.logits, hidden, batch["targets"], batch["loss_mask"], chunk)


# ------------------------------------------------------------------------------------------------ the step


def make_train_step(graphdef: nnx.GraphDef, rest: nnx.State, tx: optax.GradientTransformation,
                    trainable: Any, loss_chunk: int = 0, seed: int = 0) -> Callable:
    """Pure step `(params, opt_state, batch) -> (params, opt_state, metrics)`; `trainable` is a bool tree like
    params (only trainable leaves enter the reported grad norm). LoRA dropout, when configured, draws its
    masks from `seed` and the batch (`lora.batch_key`)."""

    def step(params, opt_state, batch):
        def loss_of(p):
            model = nnx.merge(graphdef, p, rest)
            lora.set_dropout_key(model, lora.batch_key(seed, batch["input_ids"]))
            return model_loss(model, batch, loss_chunk)

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

    @property
    def calls(self) -> int:
        """Step calls of the stage (micro-batches): total_steps x grad_accum."""
        return self.total_steps * self.grad_accum


def abstract_model(model_cfg: EmoLLMConfig, seed: int = 0) -> tuple[nnx.GraphDef, Any, nnx.State]:
    """(graphdef, abstract params, other state) without allocating weights."""
    model = nnx.eval_shape(lambda: experiment.new_model(model_cfg, seed))
    return nnx.split(model, nnx.Param, ...)


def build_stage(config: ml_collections.ConfigDict, index: int, base_cfg: EmoLLMConfig,
                mesh: jax.sharding.Mesh, total_steps: int) -> StageState:
    """Optimizer, shardings and the jitted step for stage `config.stage_order[index]`. The vision and audio
    towers sit under stop_gradient unless the stage trains them (or the vision tower's adapters), so
    frozen-tower stages skip their backward pass."""
    from emollm_jax.optim import make_optimizer, trains_vision

    name = config.stage_order[index]
    stage = config.stages[name]
    trainable = tuple(stage.trainable)
    model_cfg = dataclasses.replace(base_cfg, freeze_vision=not trains_vision(trainable, base_cfg.lora),
                                    freeze_audio="audio" not in trainable)
    graphdef, abstract_params, rest = abstract_model(model_cfg, config.seed)
    opt = make_optimizer(stage, abstract_params, total_steps)
    tx, lr_fn = opt.tx, opt.lr_fn
    abstract_opt = jax.eval_shape(tx.init, abstract_params)
    param_sh = sharding.logical_shardings(abstract_params, mesh, config.sharding_rules)
    opt_sh = sharding.optimizer_shardings(abstract_opt, param_sh, mesh)
    mask = opt.trainable_mask(abstract_params)
    step = make_train_step(graphdef, rest, tx, mask, int(config.train.loss_chunk), int(config.seed))
    step = sharding.with_activation_sharding(step, mesh, config.sharding_rules)  # activations' logical names
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


# ------------------------------------------------------------------------------------------------- loop


@dataclasses.dataclass
class TrainResult:
    """What `train` hands back: the final params, the model they belong to, and this run's losses."""

    params: Any
    model_cfg: EmoLLMConfig
    global_step: int
    losses: dict[str, list[float]]  # per stage: the losses of the step calls this run made


@dataclasses.dataclass
class RunContext:
    """What every stage of one `train()` call needs, built once at its start."""

    config: ml_collections.ConfigDict
    workdir: Path
    mesh: jax.sharding.Mesh
    setup: experiment.DataSetup
    tokenizer: Any
    base_cfg: EmoLLMConfig  # the model before a stage's freezing choices
    ckpt: Checkpointer
    data_factory: DataFactory
    init_from: str | None
    peak_flops: float  # per process, for MFU
    process_index: int
    process_count: int
    hooks: Hooks = dataclasses.field(default_factory=lambda: Hooks(()))

    @property
    def lead(self) -> bool:
        """Whether this process writes the run's logs."""
        return self.process_index == 0


@dataclasses.dataclass
class StageRun:
    """One stage as this run meets it: its compiled state, its batch stream and where the run enters it.
    Global step = `offset` + stage step."""

    state: StageState
    data: StageData
    offset: int  # global steps before the stage's first step call
    initial_step: int = 0  # step calls of the stage done before this run (a resume point)
    compiled: dict[tuple[int, ...], Any] = dataclasses.field(default_factory=dict)  # one per batch shape

    def info(self) -> StageInfo:
        st = self.state
        projector = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(st.abstract_params["projector"]))
        return StageInfo(name=st.name, index=st.index, steps=st.calls, initial_step=self.initial_step,
                         grad_accum=st.grad_accum, lr_fn=st.lr_fn, model_cfg=st.model_cfg,
                         trainable=st.trainable, projector_params=projector)


def train(config: ml_collections.ConfigDict, workdir: str, *, init_from: str | None = None,
          data_factory: DataFactory | None = None, mesh: jax.sharding.Mesh | None = None,
          hooks: Sequence[Hook] = ()) -> TrainResult:
    """Runs every stage of `config.stage_order`, resuming from the latest checkpoint in `workdir` if any.

    Global step g lies in stage i when offset_i < g <= offset_i + total_i. A checkpoint at a stage's last step
    only hands its params on; one inside a stage also restores optimizer and data-iterator state.

    `hooks`: extra `emollm_jax.hooks.Hook`s, called after the built-in ones (non-finite stop, logging,
    checkpointing, profiling) at each stage start, compile, step, stage end and run end; `on_step` receives
    the step's host metrics (loss, grad_norm, supervised_tokens) and state. See `emollm_jax.hooks`.
    """
    ctx = _run_context(config, workdir, init_from=init_from, data_factory=data_factory, mesh=mesh)
    try:
        ctx.hooks = Hooks([*builtin_hooks(ctx), *hooks])
        result = _run_stages(ctx)
        ctx.hooks.on_run_end()
    finally:
        try:
            ctx.hooks.close()
        finally:
            ctx.ckpt.close()
    return result


def _run_context(config: ml_collections.ConfigDict, workdir: str, *, init_from: str | None,
                 data_factory: DataFactory | None, mesh: jax.sharding.Mesh | None) -> RunContext:
    """Mesh, data, tokenizer, model config, checkpointer and device peak of a run (no hooks yet)."""
    from emollm_jax.checkpoint import Checkpointer

    workdir_p = storage.path(workdir)
    mesh = mesh or sharding.make_mesh(dict(config.mesh))
    setup = experiment.prepare_data(config, workdir)
    tokenizer = experiment.load_tokenizer(setup)
    base_cfg = experiment.model_config(config, vocab_size=tokenizer.vocab_size,
                                       image_token_id=tokenizer.image_token_id, init_from=init_from,
                                       audio_token_id=getattr(tokenizer, "audio_token_id", None))
    ckpt = Checkpointer(workdir_p / "checkpoints", max_to_keep=int(config.train.max_to_keep),
                        save_interval_steps=int(config.train.checkpoint_every))
    peak, peak_source = flops.device_peak_flops()
    log.info("MFU peak: %.3g FLOP/s per process (%s)", peak, peak_source, extra=FILE_ONLY)
    return RunContext(config=config, workdir=workdir_p, mesh=mesh, setup=setup, tokenizer=tokenizer,
                      base_cfg=base_cfg, ckpt=ckpt,
                      data_factory=data_factory or functools.partial(stage_stream, workdir=workdir),
                      init_from=init_from, peak_flops=peak, process_index=jax.process_index(),
                      process_count=jax.process_count())


def builtin_hooks(ctx: RunContext) -> list[Hook]:
    """The hooks every run has, in calling order: stop on a non-finite step (before it is logged or saved),
    logs, checkpoints, save-and-stop on SIGTERM / a preemption notice, and the optional trace of
    `train.profile_steps` steps into <workdir>/profile."""
    config = ctx.config
    profile_dir = ctx.workdir / "profile"
    if ctx.process_count > 1:
        profile_dir = profile_dir / f"process_{ctx.process_index}"
    checkpointing = Checkpointing(ctx.ckpt)
    return [
        NonFiniteStop(ctx.ckpt),
        TrainLogging(ctx.workdir, log_every=int(config.train.log_every), peak_flops=ctx.peak_flops,
                     stages=list(config.stage_order), process_count=ctx.process_count, enabled=ctx.lead),
        checkpointing,
        Preemption(checkpointing, ctx.process_count),
        Profiling(profile_dir, int(config.train.profile_steps)),
    ]


def _run_stages(ctx: RunContext) -> TrainResult:
    """`_run_stages_from` the newest checkpoint that verifies: a damaged one (raised by the restore, before
    any step ran) is moved aside with one log line and the next older one is tried."""
    from emollm_jax.checkpoint import CheckpointDamaged

    while True:
        try:
            return _run_stages_from(ctx, ctx.ckpt.latest_step())
        except CheckpointDamaged as e:
            if e.step is None or not storage.path(e.where).is_relative_to(ctx.ckpt.directory / str(e.step)):
                raise  # initial weights from elsewhere (config.init.*): not this run's to move
            ctx.ckpt.set_aside(e.step, "damaged", str(e))


def _run_stages_from(ctx: RunContext, latest: int | None) -> TrainResult:
    """Every stage in order: stages finished before the checkpoint resumed from (`latest`) are skipped, the
    stage holding it is restored, the rest start with a fresh optimizer state; params carry over."""
    params, offset, global_step = None, 0, 0
    losses: dict[str, list[float]] = {}
    streams: list[StageData] = []  # kept alive to the end: a collected record source closes its descriptor
    for index, name in enumerate(ctx.config.stage_order):
        data, updates = _open_stage_data(ctx, index)
        streams.append(data)
        start, offset = offset, offset + updates * int(ctx.config.stages[name].grad_accum)
        resuming = latest is not None and params is None
        if resuming and latest > offset:
            continue  # finished before the checkpoint we resume from
        run = StageRun(build_stage(ctx.config, index, ctx.base_cfg, ctx.mesh, updates), data, start)
        opt_state = None
        if resuming:
            params, opt_state, run.initial_step = _restore(ctx, run, latest)
            global_step = latest
            if run.initial_step >= run.state.calls:
                continue
        if params is None:
            params = init_params(ctx.config, run.state.model_cfg, run.state.param_shardings, ctx.init_from)
        if opt_state is None:  # fresh optimizer state per stage; params carry over
            opt_state = jax.jit(run.state.tx.init, out_shardings=run.state.opt_shardings)(params)
        params, losses[name] = _run_stage(ctx, run, params, opt_state)
        global_step = offset
        del opt_state  # donated to the stage's first step
    return TrainResult(params=params, model_cfg=ctx.base_cfg, global_step=global_step, losses=losses)


def _open_stage_data(ctx: RunContext, index: int) -> tuple[StageData, int]:
    """(this process's batch stream, optimizer updates) of stage `index`: the updates may follow from the
    size of its data mixture (`epochs`)."""
    stage = ctx.config.stages[ctx.config.stage_order[index]]
    local_batch = stage.batch_size // int(stage.grad_accum) // ctx.process_count
    data, n_records = ctx.data_factory(ctx.config, stage, ctx.setup, ctx.tokenizer, ctx.base_cfg, local_batch,
                                       ctx.process_index, ctx.process_count)
    return data, stage_steps(stage, n_records)


def _restore(ctx: RunContext, run: StageRun, step: int) -> tuple[Any, Any, int]:
    """(params, optimizer state, stage step) of checkpoint `step`, which the config places in `run`'s stage;
    the batch stream continues where that checkpoint left it unless the stage was finished."""
    st = run.state
    params, opt_state, meta, data_state = ctx.ckpt.restore(
        step, abstract_params=st.abstract_params, abstract_opt_state=st.abstract_opt,
        param_shardings=st.param_shardings, opt_shardings=st.opt_shardings)
    step_in_stage = step - run.offset
    if (int(meta["stage_index"]), int(meta["stage_step"])) != (st.index, step_in_stage):
        raise ValueError(
            f"{ctx.workdir / 'checkpoints'}: checkpoint {step} was written at stage {meta['stage_name']!r} "
            f"step {meta['stage_step']}, but the config places step {step} at stage {st.name!r} step "
            f"{step_in_stage}; stage lengths changed (use a new --workdir)")
    log.info("resumed from checkpoint %d (stage %s, step %d/%d)", step, st.name, step_in_stage, st.calls)
    if step_in_stage < st.calls and data_state is not None:
        run.data.set_state(data_state)
    return params, opt_state, step_in_stage


def _run_stage(ctx: RunContext, run: StageRun, params: Any, opt_state: Any) -> tuple[Any, list[float]]:
    """Step calls `run.initial_step + 1 .. calls` of one stage; returns (params, the losses of those calls).
    The hooks see each step; the loop only feeds batches and steps."""
    st, data, hooks = run.state, run.data, ctx.hooks
    info = run.info()
    losses: list[float] = []
    hooks.on_stage_start(info)
    try:
        upcoming = (_host_batch(next(data)), data.get_state()) if run.initial_step < st.calls else None
        for s in range(run.initial_step + 1, st.calls + 1):
            host, data_state = upcoming  # data_state: the iterator just past this batch, for a resume
            batch = sharding.global_batch(host, ctx.mesh)
            step_fn = _executable(ctx, run, info, params, opt_state, batch)
            params, opt_state, metrics = step_fn(params, opt_state, batch)
            if s < st.calls:  # the next batch is read while the device runs this step (asynchronous dispatch)
                upcoming = (_host_batch(next(data)), data.get_state())
            metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
            event = StepEvent(stage_step=s, global_step=run.offset + s, metrics=metrics, batch=host,
                              params=params, opt_state=opt_state, data_state=data_state)
            hooks.on_step(info, event)
            losses.append(metrics["loss"])
    finally:
        hooks.on_stage_end(info)
    return params, losses


def _executable(ctx: RunContext, run: StageRun, info: StageInfo, params: Any, opt_state: Any,
                batch: dict[str, jax.Array]) -> Callable:
    """The stage's step compiled for this batch shape (one executable per sequence bucket)."""
    shape = tuple(batch["input_ids"].shape)
    if shape not in run.compiled:
        t0 = time.perf_counter()
        run.compiled[shape] = run.state.step_fn.lower(params, opt_state, batch).compile()
        ctx.hooks.on_compile(info, shape, time.perf_counter() - t0)
    return run.compiled[shape]


def _host_batch(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    missing = [k for k in ("input_ids", "attention_mask", "targets", "loss_mask") if k not in batch]
    if missing:
        raise KeyError(f"training batch lacks {missing}; has {sorted(batch)}")
    return {k: np.asarray(batch[k]) for k in BATCH_KEYS if k in batch}

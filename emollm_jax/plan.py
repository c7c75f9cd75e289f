"""`--mode=plan`: will a config's train step fit? AOT lower + compile on abstract inputs, no weights.

Each stage's step is compiled for the config's mesh over N devices (fake CPU devices work: main.py sets
`jax_num_cpu_devices` before JAX starts). Parameter, optimizer and batch bytes per device are exact (shapes x
shardings). Activation / temporary bytes come from `compiled.memory_analysis()`, with one correction:

With `model.text.scan_layers` the real program is compiled at full depth: inside a scan XLA keeps the
rematerialisation as it is (the backward loop recomputes each layer from the saved layer inputs), so its
memory analysis is the plan, for any `remat_policy`.

XLA:CPU drops `jax.checkpoint`'s optimization barriers before CSE, so an UNROLLED remat'd layer stack is
planned as if nothing were rematerialised (every layer's attention scores stay live). With `remat` on and no
scan, the step is therefore compiled with one decoder layer (its whole working set: the layer's forward +
backward, the head, the loss, the vision tower) and each further layer adds what remat really keeps on an
accelerator: its input hidden state `[b, T, D]` plus its parameters' gradients (`decoder_layer_bytes`).
Without remat, with `plan.shallow_layers=k`, the step is compiled at k and 2k layers and the difference
extrapolated. CPU compiles remain a proxy for an accelerator's plan: fusion and layouts differ.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from emollm_jax import data, experiment, sharding, train
from emollm_jax.configuration import Section, apply_overrides
from emollm_jax.models import attention
from emollm_jax.models.emollm import EmoLLMConfig, audio_parts
from emollm_jax.optim import param_group

log = logging.getLogger(__name__)
GiB = float(1 << 30)


@dataclasses.dataclass(frozen=True)
class PlanConfig(Section):
    """`config.plan`: the memory budget and device count `--mode=plan` plans for."""

    device_memory_gb: float = 16.0  # per device
    num_devices: int = 8            # fake CPU devices the plan compiles for (`--plan_devices` overrides)
    shallow_layers: int = 0         # > 0: compile at k and 2k decoder layers and extrapolate (no remat)

    def check(self) -> None:
        if not self.device_memory_gb > 0:
            self.fail("device_memory_gb", "must be positive")
        if self.num_devices <= 0:
            self.fail("num_devices", "must be positive")
        if self.shallow_layers < 0:
            self.fail("shallow_layers", "must be >= 0")


@dataclasses.dataclass
class StagePlan:
    stage: str
    params_bytes: float       # per device
    opt_bytes: float          # per device
    batch_bytes: float        # per device
    temp_bytes: float         # per device: activations, gradients, workspace
    total_bytes: float        # per device peak estimate
    compile_s: float
    note: str

    def lines(self, budget_gb: float) -> list[str]:
        fits = "fits" if self.total_bytes <= budget_gb * GiB else "does NOT fit"
        return [
            f"stage {self.stage}: per device params {self.params_bytes / GiB:.2f} GiB, optimizer "
            f"{self.opt_bytes / GiB:.2f} GiB, batch {self.batch_bytes / GiB:.3f} GiB, activations/temp "
            f"{self.temp_bytes / GiB:.2f} GiB -> total {self.total_bytes / GiB:.2f} GiB: {fits} in "
            f"{budget_gb:g} GiB (compile {self.compile_s:.1f} s{'; ' + self.note if self.note else ''})",
        ]


def _sharded_bytes(abstract: Any, shardings: Any) -> float:
    """Bytes one device holds of `abstract` laid out with `shardings` (largest shard per leaf)."""
    total = 0
    for a, s in zip(jax.tree.leaves(abstract), jax.tree.leaves(shardings), strict=True):
        shape = s.shard_shape(tuple(a.shape))
        total += int(np.prod(shape)) * np.dtype(a.dtype).itemsize
    return float(total)


def abstract_batch(config: ml_collections.ConfigDict, batch: int, mesh,
                   model_cfg: EmoLLMConfig | None = None) -> dict[str, jax.ShapeDtypeStruct]:
    """ShapeDtypeStructs of a training batch (the keys of `train.BATCH_KEYS`; the audio ones with an audio
    tower; with `data.packing` the packed row's slots, segment_ids and positions: `model_cfg` needed) with
    the data sharding."""
    t, k = int(config.data.max_len), int(config.data.num_frames)
    a = int(config.data.get("audio_windows", 1))
    size = int(config.model.vision.image_size)
    sh = sharding.data_sharding(mesh)
    spec = dict(input_ids=((batch, t), np.int32), attention_mask=((batch, t), np.int32),
                targets=((batch, t), np.int32), loss_mask=((batch, t), np.float32))
    if config.data.get("packing", False):
        if model_cfg is None:
            raise ValueError("abstract_batch: a packed batch's slots depend on the model: pass model_cfg")
        layout = data.packed_row_layout(config, model_cfg)
        k, a = layout.frame_slots, layout.audio_slots
        spec.update(segment_ids=((batch, t), np.int32), positions=((batch, t), np.int32))
    spec.update(pixel_values=((batch, k, size, size, 3), np.float32), frame_media=((batch, k), np.int32))
    tower = audio_parts(config.model)[0]
    if tower is not None:  # the audio tower's windows: `data.audio_windows` per sample (or a packed row's)
        spec.update(audio_features=((batch, a, tower.n_mels, tower.mel_frames), np.float32),
                    audio_media=((batch, a), np.int32))
    return {key: jax.ShapeDtypeStruct(shape, dtype, sharding=sh) for key, (shape, dtype) in spec.items()}


def _compile_stage(config, index: int, base_cfg, mesh) -> tuple[Any, train.StageState, dict, float]:
    st = train.build_stage(config, index, base_cfg, mesh, total_steps=1000)
    stage = config.stages[config.stage_order[index]]
    batch = abstract_batch(config, stage.batch_size // stage.grad_accum, mesh, base_cfg)
    params = sharding.with_shardings(st.abstract_params, st.param_shardings)
    opt = sharding.with_shardings(st.abstract_opt, st.opt_shardings)
    t0 = time.perf_counter()
    compiled = st.step_fn.lower(params, opt, batch).compile()
    return compiled, st, batch, time.perf_counter() - t0


def _temp(compiled) -> float:
    mem = compiled.memory_analysis()
    return float(mem.temp_size_in_bytes) if mem is not None else float("nan")


def decoder_layer_bytes(st: train.StageState, micro_batch: int, seq_len: int, mesh) -> tuple[float, float]:
    """(stash, grads): bytes per device that one more remat'd decoder layer adds to the train step.

    stash: the layer's input hidden state `dtype[b, T, D]` (b = this device's share of the micro-batch), all
    that `nnx.remat` saves (the layer's other inputs, cos/sin/mask, are shared by all layers). grads: the
    layer's trainable parameters' gradients, laid out like the parameters; they all live until the update.
    """
    text = st.model_cfg.text
    per_device = micro_batch / math.prod(mesh.shape[a] for a in sharding.batch_axes())
    stash = per_device * seq_len * text.hidden_size * jnp.dtype(text.dtype).itemsize
    layer = st.abstract_params["llm"]["model"]["layers"][0]
    layer_sh = st.param_shardings["llm"]["model"]["layers"][0]
    grads = 0.0
    leaves = jax.tree_util.tree_leaves_with_path(layer)
    for (path, a), s in zip(leaves, jax.tree.leaves(layer_sh), strict=True):
        if param_group(("llm", "model", "layers", 0, *path)) in st.trainable:
            grads += int(np.prod(s.shard_shape(tuple(a.shape)))) * jnp.dtype(a.dtype).itemsize
    return float(stash), grads


def _stage_temp(config: ml_collections.ConfigDict, index: int, base_cfg: Any, mesh: Any,
                st: train.StageState, micro: int) -> tuple[float, float, str]:
    """(activation/temp bytes per device, compile seconds, how they were found) of stage `index`."""
    depth, seq = base_cfg.text.num_layers, int(config.data.max_len)
    shallow = int(config.plan.shallow_layers)
    if base_cfg.text.scan_layers:
        compiled, _, _, compile_s = _compile_stage(config, index, base_cfg, mesh)
        return _temp(compiled), compile_s, "scanned layers: full-depth compile"
    if base_cfg.text.remat and depth > 1:
        cfg = dataclasses.replace(base_cfg, text=dataclasses.replace(base_cfg.text, num_layers=1))
        compiled, _, _, compile_s = _compile_stage(config, index, cfg, mesh)
        stash, grads = decoder_layer_bytes(st, micro, seq, mesh)
        return (_temp(compiled) + (depth - 1) * (stash + grads), compile_s,
                f"remat: 1-layer compile + {depth - 1} x (stash {stash / GiB:.3f} + grads "
                f"{grads / GiB:.3f} GiB)")
    if 0 < shallow and 2 * shallow < depth:
        temps, times = [], []
        for layers in (shallow, 2 * shallow):
            cfg = dataclasses.replace(base_cfg, text=dataclasses.replace(base_cfg.text, num_layers=layers))
            compiled, _, _, secs = _compile_stage(config, index, cfg, mesh)
            temps.append(_temp(compiled))
            times.append(secs)
        per_layer = (temps[1] - temps[0]) / shallow
        return (temps[0] + per_layer * (depth - shallow), sum(times),
                f"temp extrapolated from {shallow}- and {2 * shallow}-layer compiles: {per_layer / GiB:.3f} "
                "GiB/layer")
    compiled, _, _, compile_s = _compile_stage(config, index, base_cfg, mesh)
    return _temp(compiled), compile_s, "full-depth compile"


def plan(config: ml_collections.ConfigDict, num_devices: int | None = None) -> list[StagePlan]:
    """Memory plan of every stage for `config.mesh` over the first `num_devices` devices. A stage that trains
    LoRA adapters is followed by the same stage as full fine-tuning (the decoder trained instead of its
    adapters, none added), named "<stage> (full fine-tuning)"."""
    devices = jax.devices()[: num_devices or len(jax.devices())]
    mesh = sharding.make_mesh(dict(config.mesh), devices=devices)
    plans = []
    for index, name in enumerate(config.stage_order):
        plans.append(_stage_plan(config, index, mesh))
        trainable = tuple(config.stages[name].trainable)
        if "lora" in trainable:
            full = tuple(dict.fromkeys("llm" if g == "lora" else g for g in trainable))
            full_config = apply_overrides(config, {"lora.rank": 0, f"stages.{name}.trainable": full})
            plans.append(dataclasses.replace(_stage_plan(full_config, index, mesh),
                                             stage=f"{name} (full fine-tuning)"))
    return plans


def _stage_plan(config: ml_collections.ConfigDict, index: int, mesh) -> StagePlan:
    """The plan of stage `config.stage_order[index]` (see the module docstring for the remat correction)."""
    vocab = int(config.model.text.vocab_size) or 512  # tiny: the tokenizer decides; 512 is a stand-in
    image_id = int(config.model.image_token_id) if config.model.image_token_id != -1 else vocab - 1
    base_cfg = experiment.model_config(config, vocab_size=vocab, image_token_id=image_id)
    text = base_cfg.text
    impl = attention.resolve(text.attention, dtype=text.dtype, head_dim=text.dim_per_head,
                             num_keys=int(config.data.max_len))
    how = f"attention {impl}, " + (f"remat {text.remat_policy}" if text.remat else "no remat")
    name = config.stage_order[index]
    stage = config.stages[name]
    micro = stage.batch_size // stage.grad_accum
    st = train.build_stage(config, index, base_cfg, mesh, total_steps=1000)
    temp, compile_s, note = _stage_temp(config, index, base_cfg, mesh, st, micro)
    note = f"micro-batch {micro} ({stage.grad_accum} accumulation steps), {how}; {note}"
    batch = abstract_batch(config, micro, mesh, base_cfg)
    p = _sharded_bytes(st.abstract_params, st.param_shardings)
    o = _sharded_bytes(st.abstract_opt, st.opt_shardings)
    b = _sharded_bytes(batch, jax.tree.map(lambda x: x.sharding, batch))
    return StagePlan(name, p, o, b, temp, p + o + b + temp, compile_s, note)


def run_plan(config: ml_collections.ConfigDict, num_devices: int | None = None) -> list[StagePlan]:
    """Prints the plan (what `--mode=plan` shows) and returns it."""
    n = num_devices or len(jax.devices())
    print(f"memory plan: variant {config.variant}, {n} {jax.devices()[0].platform} devices, mesh "
          f"{dict(config.mesh)}, budget {config.plan.device_memory_gb:g} GiB per device")
    plans = plan(config, n)
    for p in plans:
        for line in p.lines(float(config.plan.device_memory_gb)):
            print(line)
    return plans

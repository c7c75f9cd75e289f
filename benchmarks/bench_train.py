"""Train-step speed and compile time, emollm_jax vs HF PyTorch: decoder alone, and with vision + projector.

Same shapes on both sides: the `mid` decoder (hidden 512, inter 1376, 8 layers, 8 heads, vocab 32000), batch
8 x 256 tokens, answer loss on the last 32 positions, AdamW, fp32 master weights, CPU, everything trainable.
- decoder alone: `jax_lm` (fp32), `jax_lm_bf16` (bf16 compute, fp32 params) vs HF LlamaForCausalLM with sdpa,
  eager (`torch_lm`) and under `torch.compile` (`torch_lm_compile`);
- multimodal: the tiny CLIP tower (64 px, patch 16, hidden 64, 2 layers) + projector (`jax_mvp`,
  `jax_mlp2x_gelu`) in front, one image (16 visual tokens) per sample, vs HF LlavaForConditionalGeneration
  (`torch_llava`, `torch_llava_compile`; mlp2x_gelu: HF has no MVP).
Each variant runs in its own process (JAX and torch in one process slow each other's thread pools), variants
alternate in order and reverse order, and medians are compared; "vs torch" divides by the faster of the
torch runs of the same model. The compile column is JAX's `lower().compile()` (torch: its first step, which
includes torch.compile's compilation). The machine load (1-minute average) is printed with the table.
MFU divides the model FLOPs of a step (6 x matmul params x tokens + attention, every position's logits counted
although unsupervised chunks are skipped) by the fp32 2048^3 matmul peak measured by JAX in this run.

    python benchmarks/bench_train.py --rounds 3 --steps 3 [--json OUT]
    python benchmarks/bench_train.py --variants torch_lm,jax_lm,jax_lm_bf16
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from results import Results, add_json_argument

ROOT = Path(__file__).resolve().parents[1]
B, T, V, IMAGE_ID = 8, 256, 32000, 4
LM = dict(vocab_size=V, hidden_size=512, intermediate_size=1376, num_layers=8, num_heads=8, num_kv_heads=8)
# Positions per fused cross-entropy chunk (config.train.loss_chunk); chunks with no answer token are skipped,
# here 7 of 8 (HF computes the logits of every position, then masks the loss).
LOSS_CHUNK = 32
VARIANTS = (
    "torch_lm", "torch_lm_compile", "jax_lm", "jax_lm_bf16", "torch_llava", "torch_llava_compile", "jax_mvp",
    "jax_mlp2x_gelu", "jax_mvp_bf16",
)


def _inputs(np):
    rng = np.random.default_rng(0)
    ids = rng.integers(5, V, (B, T)).astype(np.int32)
    ids[:, 2:18] = IMAGE_ID
    loss_mask = np.zeros((B, T), np.float32)
    loss_mask[:, T - 32:] = 1.0
    pixels = rng.normal(size=(B, 64, 64, 3)).astype(np.float32)
    return ids, loss_mask, pixels


def worker_jax(projector: str, steps: int, dtype: str = "float32") -> dict:
    import jax
    import numpy as np

    from emollm_jax import experiment, flops, sharding, train
    from emollm_jax.configuration import load_config

    config = load_config(f"{ROOT / 'configs' / 'emobench.py'}:mid")
    config.model.projector.kind = projector
    config.model.vision.dtype = config.model.text.dtype = dtype
    config.train.loss_chunk = LOSS_CHUNK
    config.stages.emotional.update(batch_size=B, grad_clip=0.0, weight_decay=0.0, warmup_ratio=0.0)
    mesh = sharding.make_mesh({"data": 1}, devices=jax.devices()[:1])
    base = experiment.model_config(config, image_token_id=IMAGE_ID)
    st = train.build_stage(config, 1, base, mesh, total_steps=1000)
    params = train.init_params(config, st.model_cfg, st.param_shardings)
    opt = jax.jit(st.tx.init)(params)
    ids, loss_mask, pixels = _inputs(np)
    batch = sharding.global_batch(dict(
        input_ids=ids, attention_mask=np.ones_like(ids), targets=np.roll(ids, -1, 1), loss_mask=loss_mask,
        pixel_values=pixels[:, None], frame_media=np.zeros((B, 1), np.int32)), mesh)
    t0 = time.perf_counter()
    step = st.step_fn.lower(params, opt, batch).compile()
    compile_s = time.perf_counter() - t0
    params, opt, m = step(params, opt, batch)
    jax.block_until_ready(m)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        params, opt, m = step(params, opt, batch)
        float(m["loss"])
        times.append(time.perf_counter() - t0)
    proj = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(st.abstract_params["projector"]))
    f = flops.step_flops(st.model_cfg, batch=B, seq_len=T, frames=B, projector_params=proj,
                         trainable=st.trainable).total
    return {"step_s": statistics.median(times), "compile_s": compile_s, "flops": f}


def _timed(step, steps: int) -> list[float]:
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return times


def _time_torch_steps(opt, loss_fn, steps: int) -> dict:
    """One PyTorch AdamW step = zero_grad, loss_fn() forward, backward, step; the first call is timed apart
    (torch.compile compiles there), then the median of `steps` calls."""

    def step():
        opt.zero_grad(set_to_none=True)
        loss = loss_fn()
        loss.backward()
        opt.step()
        return float(loss.detach())

    t0 = time.perf_counter()
    step()
    first = time.perf_counter() - t0
    return {"step_s": statistics.median(_timed(step, steps)), "compile_s": first}


def worker_jax_lm(dtype: str, steps: int) -> dict:
    """The decoder alone: LlamaForCausalLM + the training loss (`train.token_cross_entropy`) + AdamW, one jit
    with params and optimizer state donated."""
    import jax
    import numpy as np
    import optax
    from flax import nnx

    from emollm_jax import train
    from emollm_jax.models.llama import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**LM, dtype=dtype)
    graphdef, params, rest = nnx.split(LlamaForCausalLM(cfg, rngs=nnx.Rngs(0)), nnx.Param, ...)
    tx = optax.adamw(1e-4, weight_decay=0.0)
    opt = tx.init(params)
    ids, loss_mask, _ = _inputs(np)
    batch = {"input_ids": ids, "targets": np.roll(ids, -1, 1), "loss_mask": loss_mask}

    def step(params, opt, batch):
        def loss_of(p):
            model = nnx.merge(graphdef, p, rest)
            hidden = model(batch["input_ids"], return_hidden=True)
            return train.token_cross_entropy(model.logits, hidden, batch["targets"], batch["loss_mask"],
                                             LOSS_CHUNK)[0]

        loss, grads = jax.value_and_grad(loss_of)(params)
        updates, opt = tx.update(grads, opt, params)
        return optax.apply_updates(params, updates), opt, loss

    t0 = time.perf_counter()
    compiled = jax.jit(step, donate_argnums=(0, 1)).lower(params, opt, batch).compile()
    compile_s = time.perf_counter() - t0
    state = [params, opt, None]

    def run():
        state[0], state[1], state[2] = compiled(state[0], state[1], batch)
        return float(state[2])

    run()
    times = _timed(run, steps)
    n_matmul = cfg.num_layers * (4 * 512 * 512 + 3 * 512 * 1376) + 512 * V
    flops = B * T * (6 * n_matmul + 6 * cfg.num_layers * 512 * T)  # causal attention counted at half
    return {"step_s": statistics.median(times), "compile_s": compile_s, "flops": flops, "loss": run()}


def worker_torch_lm(steps: int, compile_model: bool) -> dict:
    import numpy as np
    import torch
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=V, hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8,
        num_key_value_heads=8, max_position_embeddings=2048, attn_implementation="sdpa")
    model = transformers.LlamaForCausalLM(cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0)
    forward = torch.compile(model) if compile_model else model
    ids, loss_mask, _ = _inputs(np)
    input_ids = torch.from_numpy(ids.astype(np.int64))
    labels = input_ids.clone()
    labels[torch.from_numpy(np.roll(loss_mask, 1, 1)) == 0] = -100  # HF shifts labels inside the loss

    return _time_torch_steps(opt, lambda: forward(input_ids=input_ids, labels=labels).loss, steps)


def worker_torch(steps: int, compile_model: bool) -> dict:
    import numpy as np
    import torch
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(0)
    cfg = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                                       num_attention_heads=4, image_size=64, patch_size=16),
        text_config=LlamaConfig(vocab_size=V, hidden_size=512, intermediate_size=1376, num_hidden_layers=8,
                                num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=2048),
        image_token_index=IMAGE_ID, vision_feature_layer=-2, vision_feature_select_strategy="default",
        projector_hidden_act="gelu")
    model = LlavaForConditionalGeneration(cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0)
    ids, loss_mask, pixels = _inputs(np)
    input_ids = torch.from_numpy(ids.astype(np.int64))
    labels = input_ids.clone()
    labels[torch.from_numpy(np.roll(loss_mask, 1, 1)) == 0] = -100
    pixel_values = torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous()
    forward = torch.compile(model) if compile_model else model

    return _time_torch_steps(
        opt, lambda: forward(input_ids=input_ids, pixel_values=pixel_values, labels=labels).loss, steps)


def worker_peak() -> dict:
    import emollm_jax  # noqa: F401
    from emollm_jax.flops import measure_matmul_flops

    return {"peak": measure_matmul_flops(repeats=10)}


def _env() -> dict[str, str]:
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
    env.pop("XLA_FLAGS", None)
    return env


def _run(variant: str, steps: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--worker", variant, "--steps", str(steps)], env=_env(),
                         check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _worker(variant: str, steps: int) -> dict:
    if variant == "peak":
        return worker_peak()
    if variant in ("torch_lm", "torch_lm_compile"):
        return worker_torch_lm(steps, compile_model=variant.endswith("compile"))
    if variant in ("torch_llava", "torch_llava_compile"):
        return worker_torch(steps, compile_model=variant.endswith("compile"))
    if variant in ("jax_lm", "jax_lm_bf16"):
        return worker_jax_lm("bfloat16" if variant.endswith("bf16") else "float32", steps)
    if variant.endswith("_bf16"):
        return worker_jax(variant.removeprefix("jax_").removesuffix("_bf16"), steps, "bfloat16")
    return worker_jax(variant.removeprefix("jax_"), steps)


def _group(variant: str) -> str:
    return "lm" if variant.endswith(("_lm", "_lm_bf16", "_lm_compile")) else "llava"


def record(runs: dict[str, list[dict]], peak: float, config: dict) -> Results:
    """Figures per variant (tokens/s, step, compile, MFU, loss) and each JAX variant's ratio against the
    faster torch variant of the same model."""
    res = Results(__file__, config)
    res.figure("peak_gflops", peak / 1e9, "GFLOP/s", "best JAX fp32 2048^3 matmul, before and after the runs")
    flops_of = {
        "lm": next((runs[v][0]["flops"] for v in ("jax_lm", "jax_lm_bf16") if v in runs), None),
        "llava": next((runs[v][0]["flops"] for v in ("jax_mlp2x_gelu", "jax_mvp") if v in runs), None),
    }
    for v, rs in runs.items():
        step = statistics.median(x["step_s"] for x in rs)
        res.figure(f"{v}.tokens_per_s", B * T / step, "tok/s")
        res.figure(f"{v}.step_ms", step * 1e3, "ms", "median over processes of each process's median step")
        res.figure(f"{v}.compile_s", statistics.median(x["compile_s"] for x in rs), "s",
                   "JAX lower().compile(); torch: its first step (torch.compile compiles there)")
        flops = rs[0].get("flops", flops_of[_group(v)])
        if flops:
            res.figure(f"{v}.mfu", flops / step / peak, "fraction", "model FLOPs / step time / fp32 peak")
        if "loss" in rs[0]:
            res.figure(f"{v}.loss", statistics.median(x["loss"] for x in rs), "nats")
    peers = {"lm": ("torch_lm", "torch_lm_compile"), "llava": ("torch_llava", "torch_llava_compile")}
    names = {"lm": "HF LlamaForCausalLM (sdpa), the faster of eager and torch.compile",
             "llava": "HF LlavaForConditionalGeneration, the faster of eager and torch.compile"}
    for v in runs:
        measured = [t for t in peers[_group(v)] if t in runs]
        if v.startswith("jax_") and measured:
            best = max(measured, key=lambda t: res.figures[f"{t}.tokens_per_s"]["value"])
            res.ratio(f"{v}_vs_torch", f"{v}.tokens_per_s", f"{best}.tokens_per_s", names[_group(v)])
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--worker", choices=(*VARIANTS, "peak"))
    p.add_argument("--steps", type=int, default=3, help="timed steps per process, after one warm-up step")
    p.add_argument("--rounds", type=int, default=3, help="processes per variant")
    p.add_argument("--variants", default=",".join(VARIANTS))
    add_json_argument(p)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(_worker(args.worker, args.steps)))
        return

    variants = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        raise SystemExit(f"--variants: unknown {unknown}; expected some of {list(VARIANTS)}")
    runs: dict[str, list[dict]] = {v: [] for v in variants}
    loads = []
    peaks = [_run("peak", 0)["peak"]]
    for r in range(args.rounds):
        for v in variants if r % 2 == 0 else variants[::-1]:
            loads.append(os.getloadavg()[0])
            runs[v].append(_run(v, args.steps))
    peaks.append(_run("peak", 0)["peak"])
    res = record(runs, max(peaks), {**LM, "batch": B, "seq_len": T, "loss_chunk": LOSS_CHUNK,
                                    "rounds": args.rounds, "steps": args.steps})
    print(f"train step, batch {B} x {T} tokens, CPU, fp32 master weights, medians of {args.rounds} processes "
          f"x {args.steps} steps; peak {max(peaks) / 1e9:.0f} GFLOP/s (best JAX fp32 2048^3 matmul, before "
          f"and after the runs); load avg during the runs {min(loads):.1f}-{max(loads):.1f}")
    for v in variants:
        fig = lambda name, v=v: res.figures.get(f"{v}.{name}", {}).get("value")
        mfu = f"MFU {fig('mfu'):5.1%}" if fig("mfu") is not None else "MFU    - "
        vs = res.ratios.get(f"{v}_vs_torch")
        ratio = f"x{vs['value']:.2f} vs best torch" if vs else ""
        loss = f"  loss {fig('loss'):.4f}" if fig("loss") is not None else ""
        print(f"{v:17s} {fig('tokens_per_s'):7.0f} tok/s  step {fig('step_ms'):7.1f} ms  {mfu}  {ratio:20s} "
              f"compile/first step {fig('compile_s'):5.1f} s{loss}")
    if args.json:
        res.write(args.json, args, _env())


if __name__ == "__main__":
    main()

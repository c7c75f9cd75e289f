"""Compile time and train-step time of a deep, narrow decoder: unrolled layers vs scanned layers.

A 32-layer LLaMA (hidden 256, intermediate 688, 4 heads, vocab 4096), batch 4 x 256 tokens, answer loss on
the last 32 positions (`train.token_cross_entropy`), AdamW, fp32, one jit with params and optimizer state
donated: the same step as `bench_train.py`'s decoder, with `scan_layers` off (`unrolled`: 32 compiled copies
of the layer) and on (`scanned`: one layer inside a `lax.scan` over stacked parameters). `--remat`
rematerialises every layer in both. The peer is the unrolled stack measured in the same run: each variant
runs in its own process, variants alternate in order and reverse order, medians are compared.

    python benchmarks/bench_scan.py --rounds 2 --steps 3 --json scan.json
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
B, T, V = 4, 256, 4096
LM = dict(vocab_size=V, hidden_size=256, intermediate_size=688, num_layers=32, num_heads=4, num_kv_heads=4)
VARIANTS = ("unrolled", "scanned")


def worker(variant: str, steps: int, remat: bool) -> dict:
    import jax
    import numpy as np
    import optax
    from flax import nnx

    from emollm_jax import train
    from emollm_jax.models.llama import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**LM, scan_layers=variant == "scanned", remat=remat)
    graphdef, params, rest = nnx.split(LlamaForCausalLM(cfg, rngs=nnx.Rngs(0)), nnx.Param, ...)
    tx = optax.adamw(1e-4, weight_decay=0.0)
    opt = tx.init(params)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, V, (B, T)).astype(np.int32)
    loss_mask = np.zeros((B, T), np.float32)
    loss_mask[:, T - 32:] = 1.0
    batch = {"input_ids": ids, "targets": np.roll(ids, -1, 1), "loss_mask": loss_mask}

    def step(params, opt, batch):
        def loss_of(p):
            model = nnx.merge(graphdef, p, rest)
            hidden = model(batch["input_ids"], return_hidden=True)
            targets, mask = batch["targets"], batch["loss_mask"]
            return train.token_cross_entropy(model.logits, hidden, targets, mask, 32)[0]

        loss, grads = jax.value_and_grad(loss_of)(params)
        updates, opt = tx.update(grads, opt, params)
        return optax.apply_updates(params, updates), opt, loss

    t0 = time.perf_counter()
    lowered = jax.jit(step, donate_argnums=(0, 1)).lower(params, opt, batch)
    trace_s = time.perf_counter() - t0
    compiled = lowered.compile()
    compile_s = time.perf_counter() - t0
    state = [params, opt, None]

    def run() -> float:
        state[0], state[1], state[2] = compiled(state[0], state[1], batch)
        return float(state[2])

    first = run()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return {"compile_s": compile_s, "trace_s": trace_s, "step_s": statistics.median(times), "loss": first}


def _env() -> dict[str, str]:
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
    env.pop("XLA_FLAGS", None)
    return env


def _run(variant: str, steps: int, remat: bool) -> dict:
    cmd = [sys.executable, __file__, "--worker", variant, "--steps", str(steps)]
    cmd += ["--remat"] if remat else []
    out = subprocess.run(cmd, env=_env(), check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--worker", choices=VARIANTS)
    p.add_argument("--steps", type=int, default=3, help="timed steps per process, after one warm-up step")
    p.add_argument("--rounds", type=int, default=2, help="processes per variant")
    p.add_argument("--remat", action="store_true", help="rematerialise every layer (both variants)")
    add_json_argument(p)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.steps, args.remat)))
        return

    runs: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    loads = []
    for r in range(args.rounds):
        for v in VARIANTS if r % 2 == 0 else VARIANTS[::-1]:
            loads.append(os.getloadavg()[0])
            runs[v].append(_run(v, args.steps, args.remat))
    res = Results(__file__, {**LM, "batch": B, "seq_len": T, "remat": args.remat, "rounds": args.rounds,
                             "steps": args.steps})
    for v, rs in runs.items():
        med = {k: statistics.median(r[k] for r in rs) for k in ("trace_s", "compile_s", "step_s")}
        res.figure(f"{v}.trace_s", med["trace_s"], "s", "jit trace + lower")
        res.figure(f"{v}.compile_s", med["compile_s"], "s", "trace + lower + compile")
        res.figure(f"{v}.step_ms", 1e3 * med["step_s"], "ms", "train step after warm-up")
        res.figure(f"{v}.first_loss", rs[0]["loss"], "nats", "loss of the first step (the variants agree)")
    peer = "the unrolled layer stack (same model and step)"
    compile_speedup = res.ratio("compile", "scanned.compile_s", "unrolled.compile_s", peer)
    step_speedup = res.ratio("step", "scanned.step_ms", "unrolled.step_ms", peer)
    print(f"32-layer decoder (h256, B{B} x T{T}, fp32, AdamW{', remat' if args.remat else ''}); load average "
          f"{min(loads):.1f}-{max(loads):.1f}")
    print(f"{'variant':<10} {'trace s':>8} {'compile s':>10} {'step ms':>9}")
    for v in VARIANTS:
        f = {k: res.figures[f"{v}.{k}"]["value"] for k in ("trace_s", "compile_s", "step_ms")}
        print(f"{v:<10} {f['trace_s']:>8.2f} {f['compile_s']:>10.2f} {f['step_ms']:>9.1f}")
    print(f"compile: scanned is {compile_speedup:.1f}x faster than unrolled; step time unrolled / scanned = "
          f"{step_speedup:.2f}")
    losses = {v: rs[0]["loss"] for v, rs in runs.items()}
    if abs(losses["unrolled"] - losses["scanned"]) > 1e-4:
        raise SystemExit(f"the two variants disagree on the first loss: {losses}")
    if args.json:
        res.write(args.json, args, _env())


if __name__ == "__main__":
    main()

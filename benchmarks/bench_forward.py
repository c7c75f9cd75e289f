"""Forward-pass time of our LLaMA (jax.jit, after warm-up) vs HF PyTorch on the same weights.

    python benchmarks/bench_forward.py [--rounds 3] [--reps 5] [--json OUT]

Config: hidden 512, intermediate 1376, 8 layers, 8 heads, vocab 32000, batch 4, seq 256, fp32. Each side runs
in its own subprocess (JAX and torch in one process slow each other's thread pools), alternating
jax, torch, jax, torch, ...; each subprocess reports the median of `reps` timed forwards after one warm-up,
and the script prints the median over rounds and the ratio torch/ours (> 1: ours is faster).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from results import Results, add_json_argument

CONFIG = dict(vocab_size=32000, hidden_size=512, intermediate_size=1376, num_hidden_layers=8,
              num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=1024)
BATCH, SEQ = 4, 256


def _ids():
    import numpy as np

    return np.random.RandomState(0).randint(0, CONFIG["vocab_size"], (BATCH, SEQ)).astype("int32")


def run_jax(weights: str, reps: int) -> list[float]:
    import jax
    from flax import nnx

    from emollm_jax.convert import load_hf

    graphdef, state = nnx.split(load_hf(weights))
    forward = jax.jit(lambda s, ids: nnx.merge(graphdef, s)(ids))
    ids = jax.numpy.asarray(_ids())
    forward(state, ids).block_until_ready()  # compile + warm-up
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        forward(state, ids).block_until_ready()
        times.append(time.perf_counter() - t0)
    return times


def run_torch(weights: str, reps: int) -> list[float]:
    import torch
    import transformers

    model = transformers.LlamaForCausalLM.from_pretrained(weights).eval()
    ids = torch.tensor(_ids(), dtype=torch.long)
    times = []
    with torch.no_grad():
        model(ids)  # warm-up
        for _ in range(reps):
            t0 = time.perf_counter()
            model(ids).logits.sum().item()
            times.append(time.perf_counter() - t0)
    return times


def make_weights(path: Path) -> None:
    import torch
    import transformers

    torch.manual_seed(0)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**CONFIG)).save_pretrained(path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--reps", type=int, default=5)
    add_json_argument(p)
    p.add_argument("--worker", choices=["jax", "torch"], help=argparse.SUPPRESS)
    p.add_argument("--weights", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        times = (run_jax if args.worker == "jax" else run_torch)(args.weights, args.reps)
        print(json.dumps({"median_s": statistics.median(times)}))
        return
    results: dict[str, list[float]] = {"jax": [], "torch": []}
    with tempfile.TemporaryDirectory() as tmp:
        make_weights(Path(tmp))
        for r in range(args.rounds):
            for side in ("jax", "torch"):
                cmd = [sys.executable, __file__, "--worker", side, "--weights", tmp, "--reps", str(args.reps)]
                out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip()
                results[side].append(json.loads(out.splitlines()[-1])["median_s"])
                print(f"round {r}: {side:5s} {results[side][-1] * 1e3:8.1f} ms", flush=True)
    res = Results(__file__, {**CONFIG, "batch": BATCH, "seq_len": SEQ, "rounds": args.rounds,
                             "reps": args.reps})
    ours, theirs = (res.figure(f"{s}.forward_ms", statistics.median(results[s]) * 1e3, "ms",
                               "median over rounds of each process's median forward")
                    for s in ("jax", "torch"))
    ratio = res.ratio("forward_vs_torch", "jax.forward_ms", "torch.forward_ms",
                      "HF LlamaForCausalLM (PyTorch, CPU)")
    print(f"config: B={BATCH} T={SEQ} {CONFIG}")
    print(f"ours (jax.jit)   : {ours:8.1f} ms/forward")
    print(f"HF PyTorch (CPU) : {theirs:8.1f} ms/forward")
    print(f"ratio torch/ours : {ratio:8.2f}")
    if args.json:
        res.write(args.json, args)


if __name__ == "__main__":
    main()

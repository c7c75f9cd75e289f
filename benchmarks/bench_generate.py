"""Greedy decoding speed: emollm_jax `generate` (prefill + one jitted while_loop) vs HF PyTorch `generate`.

Both sides decode the same converted weights (a random LLaMA saved with `save_pretrained`: hidden 512,
intermediate 1376, 8 layers, 8 heads, vocab 32000, fp32) from the same prompts (32 tokens), 64 new tokens,
batch 1 and 8. Each side runs in its own subprocess (JAX and torch in one process slow each other's thread
pools), alternating JAX, torch, JAX, torch, ...; the reported number is the median over all timed
repetitions, after one warm-up call per process (JAX's includes compilation, reported separately). The tokens
must be identical (greedy, fp32), else the script fails.

    python benchmarks/bench_generate.py [--rounds 3] [--reps 3] [--batches 1,8]
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

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout without installing

CONFIG = dict(vocab_size=32000, hidden_size=512, intermediate_size=1376, num_hidden_layers=8,
              num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=256)  # fmt: skip
PROMPT, NEW = 32, 64


def make_model(path: Path) -> None:
    import torch
    import transformers

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**CONFIG)).eval()
    model.save_pretrained(path)


def worker(side: str, model_dir: str, batch: int, reps: int) -> dict:
    """Loads the model, warms up once, times `reps` calls; returns times and the tokens."""
    ids = np.random.default_rng(0).integers(3, CONFIG["vocab_size"], size=(batch, PROMPT)).astype(np.int32)
    mask = np.ones_like(ids)
    if side == "jax":
        import jax

        import emollm_jax  # noqa: F401
        from emollm_jax.convert import load_hf
        from emollm_jax.generate import generate

        model = load_hf(model_dir)

        def run():
            out = generate(model, ids, mask, max_new_tokens=NEW, eos_id=-1, pad_id=0)
            return np.asarray(jax.block_until_ready(out))
    else:
        import torch
        import transformers

        model = transformers.LlamaForCausalLM.from_pretrained(model_dir).eval()
        model.generation_config.eos_token_id = None
        model.generation_config.pad_token_id = 0
        t_ids, t_mask = torch.tensor(ids, dtype=torch.long), torch.tensor(mask)

        def run():
            with torch.no_grad():
                out = model.generate(
                    input_ids=t_ids, attention_mask=t_mask, max_new_tokens=NEW, do_sample=False
                )
            return out[:, PROMPT:].numpy()

    t0 = time.perf_counter()
    tokens = run()
    first = time.perf_counter() - t0
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        tokens = run()
        times.append(time.perf_counter() - t0)
    return {"first_s": first, "times_s": times, "tokens": tokens.tolist()}


def spawn(side: str, model_dir: Path, batch: int, reps: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", side, "--model_dir", str(model_dir), "--batch", str(batch),
           "--reps", str(reps)]  # fmt: skip
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3, help="subprocess pairs (JAX then torch) per batch size")
    p.add_argument("--reps", type=int, default=3, help="timed calls per subprocess, after one warm-up")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--worker", choices=("jax", "torch"), help=argparse.SUPPRESS)
    p.add_argument("--model_dir", help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.model_dir, args.batch, args.reps)))
        return 0

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "llama"
        make_model(model_dir)
        print(f"config {CONFIG}, prompt {PROMPT}, {NEW} new tokens, greedy fp32; medians over "
              f"{args.rounds} x {args.reps} timed calls per side")  # fmt: skip
        print(
            f"{'batch':>5} {'jax tok/s':>10} {'torch tok/s':>12} {'jax/torch':>10} {'jax first call s':>17}"
        )
        for batch in (int(b) for b in args.batches.split(",")):
            runs: dict[str, list[dict]] = {"jax": [], "torch": []}
            for _ in range(args.rounds):
                for side in ("jax", "torch"):
                    runs[side].append(spawn(side, model_dir, batch, args.reps))
            ref = runs["torch"][0]["tokens"]
            for side, results in runs.items():
                for r in results:
                    if r["tokens"] != ref:
                        diff = np.argwhere(np.asarray(r["tokens"]) != np.asarray(ref))[:5].tolist()
                        raise SystemExit(
                            f"batch {batch}: {side} tokens differ from torch at (row, step) {diff}"
                        )
            tps = {
                s: batch * NEW / statistics.median(t for r in rs for t in r["times_s"])
                for s, rs in runs.items()
            }
            first = statistics.median(r["first_s"] for r in runs["jax"])
            print(f"{batch:>5} {tps['jax']:>10.1f} {tps['torch']:>12.1f} {tps['jax'] / tps['torch']:>10.2f} "
                  f"{first:>17.2f}")  # fmt: skip
        print("tokens identical on both sides")
    return 0


if __name__ == "__main__":
    sys.exit(main())

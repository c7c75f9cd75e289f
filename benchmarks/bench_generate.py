"""Greedy decoding speed: emollm_jax `generate` (prefill + one jitted while_loop) vs HF PyTorch `generate`,
and decoding against the machine's memory-read roof.

Both sides decode the same converted weights (a random LLaMA saved with `save_pretrained`; `--size mid`:
hidden 512, intermediate 1376, 8 layers, 8 heads, vocab 32000, fp32) from the same prompts (32 tokens), 64 new
tokens, batch 1 and 8. Each side runs in its own subprocess (JAX and torch in one process slow each other's
thread pools), alternating JAX, torch, JAX bf16, ...; the reported number is the median over all timed
repetitions, after one warm-up call per process (JAX's includes compilation, reported separately). The tokens
must be identical (greedy, fp32), else the script fails. `jax_bf16` decodes the same weights loaded as bf16
(`load_hf(dtype="bfloat16")`: bf16 parameters, compute and KV cache); its tokens may differ and are not
compared.

The roof. A decode step reads every weight once, so its speed is bounded by how fast the machine reads memory.
Each JAX process measures that itself, before and after its timed calls: a reduction over a float32 array of
`--roof-mib` MiB (far larger than the caches) as a jitted JAX row sum, as numpy's sum on one thread, and as
numpy's sum split over every CPU; per method the median of the passes, and the roof is the best method. The
same process times decoding alone: step time = (time for 64 new tokens - time for 1) / 63, no prefill.

Bytes per decoded step (counted from the loaded model, as stored: 4 bytes per fp32 parameter, 2 per bf16):
every parameter the step reads, i.e. all layer weights, the final norm and the LM head, and of the embedding
table only the B rows looked up (all of it when tied to the LM head); plus the KV cache: keys and values of
every layer, row and cache slot (prompt + new tokens), in the cache dtype, since attention reads every slot
each step (unwritten ones masked out). Achieved GB/s = bytes per step / step time (at batch 1: bytes per
token x tokens/s), printed as a fraction of the roof. The bytes are those stored, also for bf16: XLA:CPU
has no bf16 matrix-vector product, so at batch 1 it converts each bf16 weight to a float32 copy, hoisted out
of the decode loop (once per call: the prefill column) and read by every step, and the bf16 fraction shows
that the halved storage buys no bandwidth. From batch 2 on, bf16 products go to YNNPACK and read bf16.

    python benchmarks/bench_generate.py [--rounds 3] [--reps 3] [--batches 1,8] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout without installing

from results import Results, add_json_argument  # noqa: E402

SIZES = {
    "mid": dict(vocab_size=32000, hidden_size=512, intermediate_size=1376, num_hidden_layers=8,
                num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=256),
    "tiny": dict(vocab_size=1000, hidden_size=64, intermediate_size=172, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256),
}  # fmt: skip
PROMPT, NEW = 32, 64
SIDES = ("jax", "torch", "jax_bf16")
ROOF_METHODS = ("jax_row_sum", "numpy_sum_1_thread", "numpy_sum_threads")
ROOF_PASSES = 5  # per method, before and after the timed calls


def make_model(path: Path, size: str = "mid") -> None:
    import torch
    import transformers

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**SIZES[size])).eval()
    model.save_pretrained(path)


def read_bandwidth(mib: int, passes: int = ROOF_PASSES) -> dict[str, list[float]]:
    """GB/s of `passes` reads of a float32[mib MiB] array per method (ROOF_METHODS)."""
    import jax
    import jax.numpy as jnp

    host = np.ones(mib * 2**20 // 4, np.float32)
    rows = 2048 if host.size % 2048 == 0 else 1
    device = jnp.asarray(host.reshape(rows, -1))
    row_sum = jax.jit(lambda a: jnp.sum(a, axis=1))
    parts = np.array_split(host, os.cpu_count() or 1)
    pool = ThreadPoolExecutor(len(parts))
    methods = {
        "jax_row_sum": lambda: row_sum(device).block_until_ready(),
        "numpy_sum_1_thread": host.sum,
        "numpy_sum_threads": lambda: sum(pool.map(np.sum, parts)),
    }
    out: dict[str, list[float]] = {}
    for name, fn in methods.items():
        fn()  # compile / first touch
        out[name] = []
        for _ in range(passes):
            t0 = time.perf_counter()
            fn()
            out[name].append(host.nbytes / (time.perf_counter() - t0) / 1e9)
    pool.shutdown()
    return out


def bytes_per_step(model, batch: int, cache_len: int) -> int:
    """Bytes one decode step reads (see the module docstring): parameters as stored, of the embedding table
    only the looked-up rows unless tied to the head, plus the whole KV cache."""
    import jax
    from flax import nnx

    decoder = getattr(model, "llm", model)
    cfg = decoder.config
    table = decoder.model.embed_tokens.embedding
    total = sum(x.nbytes for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    if not cfg.tie_word_embeddings:
        total += batch * table.shape[-1] * table.dtype.itemsize - table.nbytes
    kv = 2 * cfg.num_layers * batch * cfg.num_kv_heads * cache_len * cfg.dim_per_head
    return int(total + kv * np.dtype(cfg.dtype).itemsize)


def _timed(run, reps: int) -> list[float]:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return times


def jax_worker(model_dir: str, ids: np.ndarray, reps: int, dtype: str, roof_mib: int) -> dict:
    """Times `generate` (64 and 1 new tokens) between two bandwidth measurements in this process."""
    import jax

    import emollm_jax  # noqa: F401
    from emollm_jax.convert import load_hf
    from emollm_jax.generate import generate

    model = load_hf(model_dir, dtype=None if dtype == "float32" else dtype)
    mask = np.ones_like(ids)

    def run(new: int = NEW):
        out = generate(model, ids, mask, max_new_tokens=new, eos_id=-1, pad_id=0)
        return np.asarray(jax.block_until_ready(out))

    roof = read_bandwidth(roof_mib)
    t0 = time.perf_counter()
    tokens = run()
    first = time.perf_counter() - t0
    run(1)
    times, one = [], []
    for _ in range(reps):  # interleaved, so load changes hit both alike
        times += _timed(run, 1)
        one += _timed(lambda: run(1), 1)
    for name, gbps in read_bandwidth(roof_mib).items():
        roof[name] += gbps
    step = (statistics.median(times) - statistics.median(one)) / (NEW - 1)
    return {"first_s": first, "times_s": times, "one_s": one, "tokens": tokens.tolist(), "step_s": step,
            "bytes_per_step": bytes_per_step(model, ids.shape[0], PROMPT + NEW), "roof_gbps": roof}


def torch_worker(model_dir: str, ids: np.ndarray, reps: int) -> dict:
    import torch
    import transformers

    model = transformers.LlamaForCausalLM.from_pretrained(model_dir).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    t_ids, t_mask = torch.tensor(ids, dtype=torch.long), torch.ones(ids.shape, dtype=torch.long)

    def run():
        with torch.no_grad():
            out = model.generate(input_ids=t_ids, attention_mask=t_mask, max_new_tokens=NEW, do_sample=False)
        return out[:, PROMPT:].numpy()

    t0 = time.perf_counter()
    tokens = run()
    first = time.perf_counter() - t0
    return {"first_s": first, "times_s": _timed(run, reps), "tokens": tokens.tolist()}


def worker(side: str, model_dir: str, size: str, batch: int, reps: int, roof_mib: int) -> dict:
    vocab = SIZES[size]["vocab_size"]
    ids = np.random.default_rng(0).integers(3, vocab, size=(batch, PROMPT)).astype(np.int32)
    if side == "torch":
        return torch_worker(model_dir, ids, reps)
    return jax_worker(model_dir, ids, reps, "bfloat16" if side == "jax_bf16" else "float32", roof_mib)


def _env() -> dict[str, str]:
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    env.pop("XLA_FLAGS", None)  # one CPU device, as a user runs it
    return env


def spawn(side: str, model_dir: Path, args: argparse.Namespace, batch: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", side, "--model_dir", str(model_dir), "--size", args.size,
           "--batch", str(batch), "--reps", str(args.reps), "--roof-mib", str(args.roof_mib)]  # fmt: skip
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=_env())
    return json.loads(out.stdout.strip().splitlines()[-1])


def check_tokens(batch: int, runs: dict[str, list[dict]]) -> None:
    ref = runs["torch"][0]["tokens"]
    for side in ("jax", "torch"):
        for r in runs[side]:
            if r["tokens"] != ref:
                diff = np.argwhere(np.asarray(r["tokens"]) != np.asarray(ref))[:5].tolist()
                raise SystemExit(f"batch {batch}: {side} tokens differ from torch at (row, step) {diff}")


def record(res: Results, batch: int, runs: dict[str, list[dict]]) -> None:
    """Figures of one batch size: end-to-end tok/s per side, and per JAX side the decode step against the
    roof measured in the same processes."""
    for side, rs in runs.items():
        key = f"{side}.b{batch}"
        call = statistics.median(t for r in rs for t in r["times_s"])
        res.figure(f"{key}.tokens_per_s", batch * NEW / call, "tok/s", "end to end: prefill + 64 tokens")
        res.figure(f"{key}.first_call_s", statistics.median(r["first_s"] for r in rs), "s",
                   "first call of the process (JAX: includes compilation)")
        if side == "torch":
            continue
        step = statistics.median(r["step_s"] for r in rs)
        nbytes = rs[0]["bytes_per_step"]
        res.figure(f"{key}.decode_step_ms", step * 1e3, "ms", "one decode step, prefill excluded")
        res.figure(f"{key}.prefill_ms", 1e3 * statistics.median(t for r in rs for t in r["one_s"]), "ms",
                   "a call for 1 new token: the prompt's prefill and the first token")
        res.figure(f"{key}.bytes_per_step", nbytes / 1e6, "MB", "weights + KV cache read per decode step")
        res.figure(f"{key}.achieved_gbps", statistics.median(nbytes / r["step_s"] / 1e9 for r in rs), "GB/s")
        for m in ROOF_METHODS:
            reads = [g for r in rs for g in r["roof_gbps"][m]]
            res.figure(f"{key}.read_{m}_gbps", statistics.median(reads), "GB/s")
        best = max(ROOF_METHODS, key=lambda m: res.figures[f"{key}.read_{m}_gbps"]["value"])
        res.figure(f"{key}.roof_gbps", res.figures[f"{key}.read_{best}_gbps"]["value"], "GB/s",
                   f"best read bandwidth of the methods ({best}), measured in the JAX processes")
        res.ratio(f"{key}.roof_fraction", f"{key}.achieved_gbps", f"{key}.roof_gbps",
                  "the machine's memory read bandwidth")
    res.ratio(f"decode_vs_hf.b{batch}", f"jax.b{batch}.tokens_per_s", f"torch.b{batch}.tokens_per_s",
              "HF transformers generate (PyTorch, CPU, fp32)")
    if "jax_bf16" in runs:
        res.ratio(f"decode_bf16_vs_hf.b{batch}", f"jax_bf16.b{batch}.tokens_per_s",
                  f"torch.b{batch}.tokens_per_s", "HF transformers generate (PyTorch, CPU, fp32)")


def report(res: Results, batches: list[int]) -> None:
    f = lambda name: res.figures[name]["value"]
    print(f"{'batch':>5} {'jax tok/s':>10} {'jax bf16 tok/s':>15} {'torch tok/s':>12} {'jax/torch':>10} "
          f"{'jax first call s':>17}")
    for b in batches:
        print(f"{b:>5} {f(f'jax.b{b}.tokens_per_s'):>10.1f} {f(f'jax_bf16.b{b}.tokens_per_s'):>15.1f} "
              f"{f(f'torch.b{b}.tokens_per_s'):>12.1f} {res.ratios[f'decode_vs_hf.b{b}']['value']:>10.2f} "
              f"{f(f'jax.b{b}.first_call_s'):>17.2f}")
    print("tokens identical (jax fp32 vs torch)\n")
    print("decode step (prefill excluded) against the memory read roof measured in the same processes:")
    print(f"{'batch':>5} {'weights':>8} {'prefill ms':>11} {'step ms':>8} {'MB/step':>8} {'GB/s':>6} "
          f"{'roof GB/s':>10} {'of roof':>8}   read GB/s: " + " / ".join(ROOF_METHODS))
    for b in batches:
        for side, name in (("jax", "fp32"), ("jax_bf16", "bf16")):
            k = f"{side}.b{b}"
            reads = " / ".join(f"{f(f'{k}.read_{m}_gbps'):.1f}" for m in ROOF_METHODS)
            print(f"{b:>5} {name:>8} {f(f'{k}.prefill_ms'):>11.1f} {f(f'{k}.decode_step_ms'):>8.2f} "
                  f"{f(f'{k}.bytes_per_step'):>8.1f} "
                  f"{f(f'{k}.achieved_gbps'):>6.1f} {f(f'{k}.roof_gbps'):>10.1f} "
                  f"{res.ratios[f'{k}.roof_fraction']['value']:>8.0%}   {reads}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3, help="process triples (JAX, torch, JAX bf16) per batch")
    p.add_argument("--reps", type=int, default=3, help="timed calls per subprocess, after one warm-up")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--size", choices=tuple(SIZES), default="mid", help="the decoder's size (tiny: for tests)")
    p.add_argument("--roof-mib", type=int, default=512, help="MiB read per bandwidth pass")
    add_json_argument(p)
    p.add_argument("--worker", choices=SIDES, help=argparse.SUPPRESS)
    p.add_argument("--model_dir", help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        out = worker(args.worker, args.model_dir, args.size, args.batch, args.reps, args.roof_mib)
        print(json.dumps(out))
        return 0

    batches = [int(b) for b in args.batches.split(",")]
    res = Results(__file__, {**SIZES[args.size], "prompt": PROMPT, "new_tokens": NEW, "batches": batches,
                             "rounds": args.rounds, "reps": args.reps, "roof_mib": args.roof_mib})
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "llama"
        make_model(model_dir, args.size)
        print(f"config {SIZES[args.size]}, prompt {PROMPT}, {NEW} new tokens, greedy; medians over "
              f"{args.rounds} x {args.reps} timed calls per side; {os.cpu_count()} CPUs, load average "
              f"{os.getloadavg()[0]:.1f}", flush=True)
        for batch in batches:
            runs: dict[str, list[dict]] = {s: [] for s in SIDES}
            for r in range(args.rounds):
                for side in SIDES:
                    run = spawn(side, model_dir, args, batch)
                    runs[side].append(run)
                    rate = batch * NEW / statistics.median(run["times_s"])
                    step = f", decode step {run['step_s'] * 1e3:.2f} ms" if "step_s" in run else ""
                    print(f"batch {batch} round {r}: {side:8s} {rate:8.1f} tok/s{step}", flush=True)
            check_tokens(batch, runs)
            record(res, batch, runs)
    report(res, batches)
    print(f"load average at the end {os.getloadavg()[0]:.1f}")
    if args.json:
        res.write(args.json, args, _env())
    return 0


if __name__ == "__main__":
    sys.exit(main())

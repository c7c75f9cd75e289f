"""Useful (non-padding) tokens per second through the train step: packed rows vs length buckets.

An EmoBench-like length mix: every record is one 336 px image (576 visual tokens) and 20-300 text tokens
(uniform; the last 3 are the supervised answer), max_len 2048. Model: a small CLIP tower (336 px, patch 14,
hidden 64, 2 layers) frozen behind stop_gradient, the mlp2x_gelu projector and a small LLaMA decoder (hidden
256, 4 layers, 4 heads, vocab 32000), fp32, AdamW, attention `auto` (blockwise at 1024 keys and more on CPU),
loss in chunks of 32 positions; the real jitted step of `train.build_stage`, 4 rows per batch.

Variants, each the config's own data path (`data.pipeline_spec` -> the pipeline's batching on the same record
stream):
- `packed`: `data.packing=True`, rows of 2048 tokens holding several records (`data_pipeline.packing`);
- `bucketed`: `data.seq_buckets=()` (rows padded to max_len, as the shipped 2048-token configs run today);
- `bucketed_fine`: `data.seq_buckets=(1024, 2048)` (a finer bucket set: most batches pad to 1024).
Each variant runs in its own process, variants alternate in order and reverse order, medians are compared.
Useful tokens are the real tokens (visual and text) of the records a step trains on; shapes are compiled
before the timed steps. The ratios are packed over each bucketed peer measured in the same run.

Also printed (no model): the fill of an evaluation prefill on the same mix, prompts (the records without
their answers) in batches of 32 padded to evaluation's buckets (`data.eval_buckets`) vs packed into rows of
2048 tokens.

    python benchmarks/bench_packing.py --rounds 2 --steps 4 --json packing.json
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
ROWS, MAX_LEN, VISUAL, TEXT, ANSWER, V, IMAGE_ID = 4, 2048, 576, (20, 300), 3, 32000, 4
VARIANTS = {"packed": dict(packing=True), "bucketed": dict(seq_buckets=()),
            "bucketed_fine": dict(seq_buckets=(1024, 2048))}
EVAL_BATCH = 32


def _config(variant: str):
    from emollm_jax.configuration import load_config

    c = load_config(f"{ROOT / 'configs' / 'emobench.py'}:mid")
    c.model.vision.update(image_size=336, patch_size=14, hidden_size=64, intermediate_size=256, num_layers=2,
                          num_heads=4)
    c.model.projector.kind = "mlp2x_gelu"
    c.model.text.update(vocab_size=V, hidden_size=256, intermediate_size=688, num_layers=4, num_heads=4,
                        num_kv_heads=4, max_position_embeddings=4096)
    c.data.update(max_len=MAX_LEN, num_frames=1, **VARIANTS[variant])
    c.train.loss_chunk = 32
    c.stages.emotional.update(batch_size=ROWS, trainable=("projector", "llm"), grad_clip=0.0,
                              weight_decay=0.0, warmup_ratio=0.0)
    return c


def _record(index: int) -> dict:
    """One encoded record of the mix: bos, a short system prompt, the image's 576 tokens, the question and
    a 3-token answer (supervised), all text ids random; the image random pixels."""
    import numpy as np

    rng = np.random.default_rng(index)
    n_text = int(rng.integers(TEXT[0], TEXT[1] + 1))
    head = 8
    ids = rng.integers(10, V, VISUAL + n_text).astype(np.int32)
    ids[head:head + VISUAL] = IMAGE_ID
    mask = np.zeros(len(ids), bool)
    mask[-ANSWER:] = True
    return {"id": f"r{index}", "input_ids": ids, "loss_mask": mask,
            "pixel_values": rng.normal(size=(1, 336, 336, 3)).astype(np.float32),
            "frame_media": np.zeros(1, np.int32)}


def _batches(config, model_cfg):
    """The variant's batch stream over records 0, 1, 2, ... through the pipeline's own batching."""
    import grain

    from data_pipeline import packing, pipeline
    from emollm_jax import data

    spec = data.pipeline_spec(config, model_cfg, sources=("bench",), tokenizer="", data_root=None,
                              batch_size=ROWS, training=True)
    records = grain.MapDataset.range(1 << 20).map(_record).to_iter_dataset()
    if spec.packing:
        return iter(packing.PackedBatches(records, ROWS, packing.row_layout(spec), 0))
    return iter(records.batch(ROWS, drop_remainder=True, batch_fn=pipeline._TrainBatcher(spec, 0)))


def worker(variant: str, steps: int) -> dict:
    import jax

    from emollm_jax import experiment, sharding, train

    config = _config(variant)
    mesh = sharding.make_mesh({"data": 1}, devices=jax.devices()[:1])
    base = experiment.model_config(config, image_token_id=IMAGE_ID)
    st = train.build_stage(config, 1, base, mesh, total_steps=1000)
    params = train.init_params(config, st.model_cfg, st.param_shardings)
    opt = jax.jit(st.tx.init)(params)
    stream = _batches(config, st.model_cfg)
    host = [next(stream) for _ in range(steps + 1)]  # the first is the warm-up step
    compiled, compile_s = {}, 0.0
    for b in host:  # every shape the timed steps meet, compiled before timing
        shape = b["input_ids"].shape
        if shape not in compiled:
            t0 = time.perf_counter()
            batch = sharding.global_batch(b, mesh)
            compiled[shape] = st.step_fn.lower(params, opt, batch).compile()
            compile_s += time.perf_counter() - t0
    batches = [sharding.global_batch(b, mesh) for b in host]
    params, opt, m = compiled[host[0]["input_ids"].shape](params, opt, batches[0])
    jax.block_until_ready(m)
    t0 = time.perf_counter()
    for b, batch in zip(host[1:], batches[1:], strict=True):
        params, opt, m = compiled[b["input_ids"].shape](params, opt, batch)
    jax.block_until_ready(m)
    seconds = time.perf_counter() - t0
    useful = sum(int(b["attention_mask"].sum()) for b in host[1:])
    positions = sum(b["input_ids"].size for b in host[1:])
    records = sum(int(b["segment_ids"].max(1).sum()) if "segment_ids" in b else len(b["input_ids"])
                  for b in host[1:])
    return {"useful_tokens_per_s": useful / seconds, "step_s": seconds / steps, "fill": useful / positions,
            "records_per_step": records / steps, "compile_s": compile_s,
            "shapes": sorted({tuple(b["input_ids"].shape) for b in host}), "loss": float(m["loss"])}


def eval_prefill_fill(n: int = 4096) -> dict[str, float]:
    """Fill (real / padded positions) of evaluation prefills on the mix: batches of EVAL_BATCH prompts left
    padded to evaluation's buckets (`data.eval_buckets`), vs the same prompts packed into rows of MAX_LEN
    tokens (first fit)."""
    import numpy as np

    from data_pipeline import packing
    from emollm_jax import data, experiment

    model_cfg = experiment.model_config(_config("bucketed"), vocab_size=V, image_token_id=IMAGE_ID)
    buckets = data.eval_buckets(model_cfg, int(_config("bucketed").eval.max_new_tokens))
    rng = np.random.default_rng(0)
    prompts = VISUAL + rng.integers(TEXT[0], TEXT[1] + 1, n) - ANSWER
    real = bucketed = packed = 0
    for i in range(0, n - EVAL_BATCH + 1, EVAL_BATCH):
        batch = prompts[i:i + EVAL_BATCH]
        real += int(batch.sum())
        bucketed += EVAL_BATCH * min(b for b in buckets if b >= batch.max())
        used: list[list[int]] = []
        for length in batch:
            if packing.first_fit(used, (int(length),), (MAX_LEN,)) is None:
                used.append([int(length)])
        packed += len(used) * MAX_LEN
    return {"bucketed": real / bucketed, "packed": real / packed}


def _env() -> dict[str, str]:
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
    env.pop("XLA_FLAGS", None)
    return env


def _run(variant: str, steps: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", variant, "--steps", str(steps)]
    out = subprocess.run(cmd, env=_env(), capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"{variant} worker failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--worker", choices=tuple(VARIANTS))
    p.add_argument("--steps", type=int, default=4, help="timed steps per process, after one warm-up step")
    p.add_argument("--rounds", type=int, default=2, help="processes per variant")
    add_json_argument(p)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.steps)))
        return

    names = tuple(VARIANTS)
    runs: dict[str, list[dict]] = {v: [] for v in names}
    loads = []
    for r in range(args.rounds):
        for v in names if r % 2 == 0 else names[::-1]:
            loads.append(os.getloadavg()[0])
            runs[v].append(_run(v, args.steps))
    res = record(runs, args)
    print(f"EmoBench-like mix ({VISUAL} visual + {TEXT[0]}-{TEXT[1]} text tokens, max_len {MAX_LEN}), {ROWS} "
          f"rows per step, fp32; load average {min(loads):.1f}-{max(loads):.1f}")
    print(f"{'variant':<14} {'useful tok/s':>13} {'step s':>8} {'fill':>6} {'records/step':>13} "
          f"{'compile s':>10}")
    for v in names:
        m = {k: res.figures[f"{v}.{k}"]["value"] for k, _ in FIGURES}
        print(f"{v:<14} {m['useful_tokens_per_s']:>13.0f} {m['step_s']:>8.2f} {m['fill']:>6.2f} "
              f"{m['records_per_step']:>13.1f} {m['compile_s']:>10.1f}")
    for v in names[1:]:
        print(f"packed_vs_{v}: {res.ratios[f'packed_vs_{v}']['value']:.2f}x useful tokens per second")
    fill = {k: res.figures[f"eval_prefill.{k}_fill"]["value"] for k in ("bucketed", "packed")}
    print(f"evaluation prefill fill, batches of {EVAL_BATCH}: evaluation's buckets {fill['bucketed']:.3f}, "
          f"packed rows of {MAX_LEN} {fill['packed']:.3f} ({res.ratios['eval_prefill_fill']['value']:.2f}x)")
    if args.json:
        res.write(args.json, args, _env())


FIGURES = (("useful_tokens_per_s", "tok/s"), ("step_s", "s"), ("fill", "fraction"),
           ("records_per_step", "records"), ("compile_s", "s"))


def record(runs: dict[str, list[dict]], args: argparse.Namespace) -> Results:
    """Medians per variant, packed over each bucketed peer, and the evaluation prefill fill."""
    res = Results(__file__, {"rows": ROWS, "max_len": MAX_LEN, "visual_tokens": VISUAL, "text_tokens": TEXT,
                             "rounds": args.rounds, "steps": args.steps, "variants": VARIANTS})
    for v, rs in runs.items():
        for key, unit in FIGURES:
            res.figure(f"{v}.{key}", statistics.median(run[key] for run in rs), unit)
        res.details[f"{v}.shapes"] = rs[0]["shapes"]
    for v in runs:
        if v != "packed":
            res.ratio(f"packed_vs_{v}", "packed.useful_tokens_per_s", f"{v}.useful_tokens_per_s",
                      f"the same step on {v} rows ({VARIANTS[v]})")
    prefill = eval_prefill_fill()
    res.figure("eval_prefill.bucketed_fill", prefill["bucketed"], "fraction",
               f"real / padded positions, batches of {EVAL_BATCH} in power-of-two buckets")
    res.figure("eval_prefill.packed_fill", prefill["packed"], "fraction", f"packed into rows of {MAX_LEN}")
    res.ratio("eval_prefill_fill", "eval_prefill.packed_fill", "eval_prefill.bucketed_fill",
              "evaluation prefill in power-of-two buckets")
    return res


if __name__ == "__main__":
    main()

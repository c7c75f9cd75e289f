"""Evaluation throughput: `--mode=eval`'s `evaluate.run_eval` vs HF `LlavaForConditionalGeneration.generate`.

Both sides evaluate the same converted weights: a random HF Llava saved with `save_pretrained` (a CLIP
ViT-L/14-336-shaped tower, narrower: 336 px images, patch 14, 577 positions, hidden 256, intermediate 1024,
6 layers, 4 heads; the `mlp2x_gelu` projector; the `mid` decoder of configs/emobench.py: LLaMA hidden 512,
intermediate 1376, 8 layers, 8 heads, vocab 32000), which `emollm_jax.convert.load_hf` loads. The records are
mini-EmoBench's six EmoBench tasks (images only, upscaled to 336 x 336), each prompt 576 visual tokens plus
its text. Our side times `run_eval` on the loaded model (data pipeline, generation, answer parsing, scoring
and the written report); the HF side times `generate` alone on the very batches our pipeline made (same
prompts, same left padding, the same images), greedy, the same `max_new_tokens` and stop ids. The generated
token ids must be identical, else the script fails (with `--dtype bfloat16` our side is not held to HF's
float32 tokens: the share of answers with the same ids is printed instead).

Each side runs in its own subprocess, alternating ours, HF, ours, HF, ... (JAX and torch in one process slow
each other's thread pools); the reported number is the median over all timed passes over the records, after
one warm-up pass per process (ours includes compilation, reported separately). `--profile` also times the
parts of our pass (the pipeline alone, prefill alone, the whole generation) and HF's prefill.

    python benchmarks/bench_eval.py [--records_per_task 8] [--batch 8] [--rounds 2] [--reps 2]
                                    [--dtype float32] [--profile] [--json OUT]
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
from pathlib import Path

import numpy as np
from results import Results, add_json_argument

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # runnable from a checkout without installing

VISION = dict(image_size=336, patch_size=14, hidden_size=256, intermediate_size=1024, num_hidden_layers=6,
              num_attention_heads=4)  # fmt: skip
TEXT = dict(vocab_size=32000, hidden_size=512, intermediate_size=1376, num_hidden_layers=8,
            num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=2048)  # fmt: skip
TASKS = ("emo_c", "emo_o", "intent", "hate", "humor", "sarcasm")


# --------------------------------------------------------------------------------------------- set-up


def make_records(root: Path, per_task: int) -> tuple[Path, Path]:
    """mini-EmoBench's six tasks (`per_task` test records each, images only, 336 x 336) and its tokenizer."""
    from PIL import Image

    from data_pipeline import mini_emobench
    from data_pipeline.records import iter_records
    from data_pipeline.text import train_tiny_tokenizer

    data = root / "data"
    mini_emobench.generate(data, seed=0, sizes={t: (2, per_task) for t in TASKS}, blank_control=False,
                           video_fraction=0.0)
    for png in (data / "images").glob("*.png"):
        Image.open(png).convert("RGB").resize((336, 336), Image.BICUBIC).save(png)
    texts = ["Example: Reasoning: Answer:"]
    for split in ("train", "test"):
        for _, r in iter_records(data / f"{split}.jsonl"):
            texts += [t["value"] for t in r["conversations"]] + list(r.get("options") or [])
    train_tiny_tokenizer(texts, root / "tokenizer")
    return data, root / "tokenizer"


def make_llava(path: Path, image_token_id: int, pad_id: int) -> None:
    import torch
    import transformers

    cfg = transformers.LlavaConfig(vision_config=transformers.CLIPVisionConfig(**VISION),
                                   text_config=transformers.LlamaConfig(**TEXT, pad_token_id=pad_id),
                                   image_token_index=image_token_id)
    torch.manual_seed(0)
    transformers.LlavaForConditionalGeneration(cfg).eval().save_pretrained(path)


def eval_config(data: Path, tokenizer: Path, batch: int, new_tokens: int, dtype: str):
    from emollm_jax.configuration import load_config

    return load_config(f"{REPO / 'configs' / 'emobench.py'}:mid", [
        f"data.root={data}", f"data.tokenizer={tokenizer}", "data.max_len=2048", f"eval.batch_size={batch}",
        f"eval.max_new_tokens={new_tokens}", "eval.control_split=none", "eval.audio_control_split=none",
        f"eval.dtype={dtype}"])


# -------------------------------------------------------------------------------------------- workers


def _timed(fn, reps: int) -> tuple[float, list[float]]:
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return first, times


def jax_worker(args: argparse.Namespace) -> dict:
    """`run_eval` passes over the records; the generated tokens of every batch (and, on request, the batches
    themselves for the HF side) go to `args.batches`."""
    import jax

    import emollm_jax  # noqa: F401
    from data_pipeline.text import load_tokenizer
    from emollm_jax import evaluate, model_dtype
    from emollm_jax.convert import load_hf
    from emollm_jax.generate import generate

    config = eval_config(Path(args.data), Path(args.tokenizer), args.batch, args.new_tokens, args.dtype)
    tok = load_tokenizer(args.tokenizer)
    model = evaluate.eval_model(config, load_hf(args.model_dir))
    work = Path(args.work)
    out: dict = {}

    def run_eval():
        out["results"] = evaluate.run_eval(config, work, model=model, tokenizer=tok, progress=False)

    out["first_s"], out["times_s"] = _timed(run_eval, args.reps)
    n = out.pop("results")["splits"]["test"]["n"]

    def batches():
        b, _ = evaluate.record_batches(config, Path(args.data) / "test.jsonl", args.data, tok, model)
        return [evaluate.trim_media(batch) for batch, _ in b]

    stops = evaluate.stop_ids(config, tok)

    def gen(batch, new_tokens):
        return np.asarray(jax.block_until_ready(generate(
            model, batch["input_ids"], batch["attention_mask"], pixel_values=batch["pixel_values"],
            frame_media=batch["frame_media"], max_new_tokens=new_tokens, eos_id=tuple(stops),
            pad_id=tok.pad_id)))

    made = batches()
    tokens = [gen(b, args.new_tokens)[b["valid"]] for b in made]  # the rows of real records
    if args.save_batches:
        keys = ("input_ids", "attention_mask", "pixel_values", "frame_media", "valid")
        arrays = {f"{k}_{i}": b[k] for i, b in enumerate(made) for k in keys}
        np.savez(args.save_batches, stops=np.asarray(stops), pad_id=np.asarray(tok.pad_id), **arrays)
    if args.profile:
        _, out["pipeline_s"] = _timed(batches, args.reps)
        _, out["prefill_s"] = _timed(lambda: [gen(b, 1) for b in made], args.reps)
        _, out["generate_s"] = _timed(lambda: [gen(b, args.new_tokens) for b in made], args.reps)
    out.update(records=n, tokens=[t.tolist() for t in tokens], param_dtypes=model_dtype.param_dtypes(model),
               lengths=[int(b["input_ids"].shape[1]) for b in made])
    return out


def torch_worker(args: argparse.Namespace) -> dict:
    """`generate` over the batches the JAX side saved: the real rows of each, their images (NCHW)."""
    import torch
    import transformers

    saved = np.load(args.batches)
    model = transformers.LlavaForConditionalGeneration.from_pretrained(args.model_dir).eval()
    pad_id = int(saved["pad_id"])
    model.generation_config.eos_token_id = [int(s) for s in saved["stops"]]
    model.generation_config.pad_token_id = pad_id
    batches = []
    for i in range(len([k for k in saved.files if k.startswith("input_ids_")])):
        rows = saved[f"valid_{i}"]  # the rows of real records (a last batch may be padded with empty ones)
        real = saved[f"frame_media_{i}"][rows] >= 0  # [B, K]: each row's images, in order
        pixels = saved[f"pixel_values_{i}"][rows][real].transpose(0, 3, 1, 2)  # [n images, 3, S, S]
        batches.append(dict(input_ids=torch.tensor(saved[f"input_ids_{i}"][rows], dtype=torch.long),
                            attention_mask=torch.tensor(saved[f"attention_mask_{i}"][rows], dtype=torch.long),
                            pixel_values=torch.tensor(np.ascontiguousarray(pixels))))
    out: dict = {}

    def gen(new_tokens):
        rows = []
        with torch.no_grad():
            for b in batches:
                ids = model.generate(**b, max_new_tokens=new_tokens, do_sample=False)
                new = ids[:, b["input_ids"].shape[1]:].numpy()
                rows.append(np.pad(new, ((0, 0), (0, new_tokens - new.shape[1])), constant_values=pad_id))
        out["tokens"] = [r.tolist() for r in rows]

    out["first_s"], out["times_s"] = _timed(lambda: gen(args.new_tokens), args.reps)
    tokens = out["tokens"]
    if args.profile:
        _, out["prefill_s"] = _timed(lambda: gen(1), args.reps)
    out["tokens"] = tokens
    return out


# ----------------------------------------------------------------------------------------------- driver


def spawn(side: str, args: argparse.Namespace, **extra: str) -> dict:
    cmd = [sys.executable, __file__, "--worker", side]
    for key in ("model_dir", "data", "tokenizer", "work", "batches", "batch", "new_tokens", "reps", "dtype"):
        cmd += [f"--{key}", str(getattr(args, key))]
    cmd += [x for k, v in extra.items() for x in (f"--{k}", v)] + (["--profile"] if args.profile else [])
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode:
        raise SystemExit(f"{side} worker failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _median(runs: list[dict], key: str) -> float:
    return statistics.median(t for r in runs for t in r[key])


def check_tokens(runs: dict[str, list[dict]]) -> None:
    ref = runs["torch"][0]["tokens"]
    for side, results in runs.items():
        for r in results:
            for i, (mine, theirs) in enumerate(zip(r["tokens"], ref, strict=True)):
                if mine != theirs:
                    diff = np.argwhere(np.asarray(mine) != np.asarray(theirs))[:5].tolist()
                    raise SystemExit(f"batch {i}: {side} tokens differ from HF's at (row, step) {diff}")


def report(args: argparse.Namespace, runs: dict[str, list[dict]], res: Results) -> dict:
    """Prints the table and records the figures and the ratio in `res`; returns the printed figures."""
    n = runs["jax"][0]["records"]
    sps = {side: n / _median(rs, "times_s") for side, rs in runs.items()}
    figures = {
        "ratio": sps["jax"] / sps["torch"],
        "jax_first_call_s": statistics.median(r["first_s"] for r in runs["jax"]),
    }
    res.config.update(records=n, batch=args.batch, max_new_tokens=args.new_tokens, dtype=args.dtype,
                      vision=VISION, text=TEXT, rounds=args.rounds, reps=args.reps)
    res.details.update(prompt_lengths=runs["jax"][0]["lengths"], param_dtypes=runs["jax"][0]["param_dtypes"])
    res.figure("ours.samples_per_s", sps["jax"], "samples/s", f"run_eval in {args.dtype}")
    res.figure("hf.samples_per_s", sps["torch"], "samples/s", "HF Llava generate, fp32")
    res.figure("ours.first_pass_s", figures["jax_first_call_s"], "s", "first run_eval pass (compiles)")
    res.ratio("eval_vs_hf_generate", "ours.samples_per_s", "hf.samples_per_s",
              "HF LlavaForConditionalGeneration.generate, batched the same way")
    print(f"{n} records, batch {args.batch}, prompts {sorted(set(res.details['prompt_lengths']))} tokens, "
          f"{args.new_tokens} new tokens, greedy, ours in {args.dtype}; medians over {args.rounds} x "
          f"{args.reps} passes per side")
    print(f"{'run_eval samples/s':>19} {'HF generate samples/s':>22} {'ratio':>6} {'ours first pass s':>18}")
    print(f"{sps['jax']:>19.2f} {sps['torch']:>22.2f} {figures['ratio']:>6.2f} "
          f"{figures['jax_first_call_s']:>18.1f}")
    if args.profile:
        parts = {f"jax_{k}": _median(runs["jax"], f"{k}_s") for k in ("pipeline", "prefill", "generate")}
        parts["torch_prefill"] = _median(runs["torch"], "prefill_s")
        parts["jax_run_eval"] = _median(runs["jax"], "times_s")
        parts["torch_generate"] = _median(runs["torch"], "times_s")
        for k, v in parts.items():
            res.figure(f"profile.{k}_s", v, "s")
        print("seconds per pass: " + ", ".join(f"{k} {v:.2f}" for k, v in parts.items()))
    return figures


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--records_per_task", type=int, default=8)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--new_tokens", type=int, default=8, help="max_new_tokens (config.eval.max_new_tokens)")
    p.add_argument("--rounds", type=int, default=2, help="subprocess pairs (ours, then HF)")
    p.add_argument("--reps", type=int, default=2, help="timed passes per subprocess, after one warm-up")
    p.add_argument("--dtype", default="float32", help="config.eval.dtype of our side (HF stays float32)")
    p.add_argument("--profile", action="store_true", help="also time pipeline / prefill / generation")
    add_json_argument(p)
    for hidden in ("worker", "model_dir", "data", "tokenizer", "work", "batches", "save_batches"):
        p.add_argument(f"--{hidden}", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps((jax_worker if args.worker == "jax" else torch_worker)(args)))
        return 0

    from data_pipeline.text import load_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data, tok_path = make_records(tmp, args.records_per_task)
        tok = load_tokenizer(tok_path)
        make_llava(tmp / "llava", tok.image_token_id, tok.pad_id)
        # the workers' inputs, in this run's temporary directory (not among the arguments the JSON records)
        inputs = argparse.Namespace(**{**vars(args), "model_dir": tmp / "llava", "data": data,
                                       "tokenizer": tok_path, "work": tmp / "work",
                                       "batches": tmp / "batches.npz"})
        runs: dict[str, list[dict]] = {"jax": [], "torch": []}
        for i in range(args.rounds):
            save = {"save_batches": str(inputs.batches)} if i == 0 else {}
            runs["jax"].append(spawn("jax", inputs, **save))
            runs["torch"].append(spawn("torch", inputs))
        if args.dtype == "float32":
            check_tokens(runs)
        res = Results(__file__)
        report(args, runs, res)
        if args.dtype == "float32":
            print("token ids identical on both sides")
        else:
            ours, theirs = (np.concatenate([np.asarray(t) for t in runs[side][0]["tokens"]])
                            for side in ("jax", "torch"))
            same = float(np.mean((ours == theirs).all(axis=1)))
            res.figure("answers_identical_to_hf_float32", same, "fraction")
            print(f"ours in {args.dtype}: {same:.0%} of the answers have HF float32's token ids exactly")
    if args.json:
        res.write(args.json, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())

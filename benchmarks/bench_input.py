"""Input pipeline throughput: our Grain pipeline vs a torch DataLoader doing the same work, and vs what the
default job's train step consumes, in one run.

    python benchmarks/bench_input.py [--records 96] [--batch 8] [--image-size 336] [--workers 0 1 2] \
        [--json OUT]

1. Both sides decode mini-EmoBench PNGs, resize to `--image-size` (LLaVA "pad" mode), CLIP-normalise, apply
   the vicuna_v1 template with 576 visual tokens per image and tokenize with the tiny tokenizer, then pad and
   stack batches. The torch side reuses the same per-record functions (`media.load_media`,
   `text.encode_conversation`), so the ratio measures the pipeline machinery (Grain workers/threads vs
   DataLoader workers), not different image code. Configurations alternate for `--rounds` rounds; medians of
   samples/s and the ratio ours / torch per worker count are printed.
2. The default job (`configs/emobench.py`, tiny): its stage-2 pipeline as `train` builds it (in-process, the
   config's default) against its compiled train step fed from memory, in samples/s, in one subprocess.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import flags  # noqa: E402

flags.FLAGS.mark_as_parsed()  # grain 0.2.18 workers need parsed absl flags (google/grain#1355)

from results import Results, add_json_argument  # noqa: E402

from data_pipeline import media, pipeline, text  # noqa: E402

VISUAL_TOKENS = 576  # CLIP ViT-L/14 at 336 px: 24 x 24 patches


def make_bench(out: str, n_records: int) -> tuple[str, str]:
    """mini-EmoBench image records (the generator's, or a stand-in) + the tiny tokenizer."""
    try:
        from data_pipeline import mini_emobench

        mini_emobench.generate(out, seed=0, blank_control=False, video_fraction=0.0)
        src = os.path.join(out, "train.jsonl")
    except ImportError:  # stand-in: flat-colour PNGs
        from PIL import Image

        os.makedirs(os.path.join(out, "images"), exist_ok=True)
        src = os.path.join(out, "train.jsonl")
        with open(src, "w") as f:
            for i in range(n_records):
                image = Image.fromarray(np.full((64, 64, 3), i % 255, np.uint8))
                image.save(os.path.join(out, f"images/{i}.png"))
                conv = [{"from": "human", "value": "<image>\nWhich emotion is shown?"},
                        {"from": "gpt", "value": "joy"}]
                f.write(json.dumps({"id": f"emo_c-{i}", "task": "emo_c", "image": f"images/{i}.png",
                                    "conversations": conv}) + "\n")
    with open(src) as f:
        records = [json.loads(line) for line in f if line.strip()]
    images = [r for r in records if isinstance(r.get("image"), str)][:n_records]
    path = os.path.join(out, "bench.jsonl")
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in images)
    texts = [m["value"] for r in images for m in r["conversations"]] + [text.VICUNA_SYSTEM]
    text.train_tiny_tokenizer(texts, os.path.join(out, "tok"))
    return path, os.path.join(out, "tok")


class TorchEmoBench:
    """map-style torch Dataset doing the same per-record work as the Grain pipeline."""

    def __init__(self, path: str, tok_dir: str, image_size: int):
        with open(path) as f:
            self.records = [json.loads(line) for line in f if line.strip()]
        self.root = os.path.dirname(path)
        self.tokenizer = text.load_tokenizer(tok_dir)
        self.image_size = image_size

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict:
        rec = self.records[i]
        pixels = media.load_media(rec, self.root, image_size=self.image_size, num_frames=1)
        ids, mask = text.encode_conversation(rec["conversations"], "vicuna_v1", self.tokenizer,
                                             visual_tokens=[VISUAL_TOKENS])
        return {"input_ids": ids, "loss_mask": mask, "pixel_values": pixels}


def torch_collate(samples: list[dict], buckets=(640, 768, 1024), pad_id: int = 0) -> dict:
    t = pipeline.bucket_length(max(len(s["input_ids"]) for s in samples), buckets)
    ids = np.full((len(samples), t), pad_id, np.int32)
    mask = np.zeros((len(samples), t), np.float32)
    for i, s in enumerate(samples):
        n = len(s["input_ids"])
        ids[i, :n] = s["input_ids"]
        mask[i, : n - 1] = s["loss_mask"][1:]
    pixels = np.stack([s["pixel_values"] for s in samples])
    return {"input_ids": ids, "loss_mask": mask, "pixel_values": pixels}


def measure(batches, n_batches: int, batch_size: int) -> float:
    """samples/s over `n_batches` after the first (which pays worker start-up)."""
    it = iter(batches)
    next(it)
    start = time.perf_counter()
    for _ in range(n_batches):
        next(it)
    return n_batches * batch_size / (time.perf_counter() - start)


def default_job_rates(batches: int, steps: int) -> dict:
    """(pipeline samples/s, train-step samples/s) of the default job's emotional stage, same process."""
    import jax

    from emollm_jax import data, experiment, sharding, train
    from emollm_jax.configuration import load_config

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    config = load_config(os.path.join(root, "configs", "emobench.py") + ":tiny")
    with tempfile.TemporaryDirectory() as workdir:
        setup = experiment.prepare_data(config, workdir)
        tokenizer = experiment.load_tokenizer(setup)
        base = experiment.model_config(config, vocab_size=tokenizer.vocab_size,
                                       image_token_id=tokenizer.image_token_id)
        mesh = sharding.make_mesh(dict(config.mesh))
        index = list(config.stage_order).index("emotional")
        stage = config.stages.emotional
        st = train.build_stage(config, index, base, mesh, total_steps=1000)
        stream, _ = data.stage_stream(config, stage, setup, tokenizer, base, int(stage.batch_size), 0, 1,
                                      workdir=workdir)
        next(stream)
        start = time.perf_counter()
        host = [train._host_batch(next(stream)) for _ in range(batches)]
        pipeline_rate = batches * stage.batch_size / (time.perf_counter() - start)

        params = train.init_params(config, st.model_cfg, st.param_shardings)
        opt = jax.jit(st.tx.init)(params)
        device = [sharding.global_batch(h, mesh) for h in host]
        compiled = {}
        for b in device:  # one executable per sequence bucket, as in `train`
            shape = b["input_ids"].shape
            if shape not in compiled:
                compiled[shape] = st.step_fn.lower(params, opt, b).compile()
        times = []
        for i in range(steps + 1):
            b = device[i % len(device)]
            t0 = time.perf_counter()
            params, opt, metrics = compiled[b["input_ids"].shape](params, opt, b)
            float(metrics["loss"])
            times.append(time.perf_counter() - t0)
        step_rate = stage.batch_size / float(np.median(times[1:]))
    return {"pipeline": pipeline_rate, "step": step_rate, "batch": int(stage.batch_size)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=96)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--batches", type=int, default=10, help="timed batches per configuration")
    parser.add_argument("--image-size", type=int, default=336)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--rounds", type=int, default=3, help="alternating repetitions per configuration")
    parser.add_argument("--job-steps", type=int, default=20, help="timed default-job train steps")
    add_json_argument(parser)
    parser.add_argument("--default-job-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.default_job_worker:
        print(json.dumps(default_job_rates(batches=args.batches * 3, steps=args.job_steps)))
        return

    import torch

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        path, tok_dir = make_bench(tmp, args.records)
        tok = text.load_tokenizer(tok_dir)
        spec = pipeline.PipelineSpec(
            sources=(path,), tokenizer=tok_dir, image_size=args.image_size, num_frames=1, max_media_frames=1,
            visual_tokens_per_frame=VISUAL_TOKENS, batch_size=args.batch, seq_buckets=(640, 768, 1024),
            read_threads=1,
        )
        print(f"{args.records} mini-EmoBench images -> {args.image_size}px, batch {args.batch}, "
              f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
        rates: dict[tuple[str, int], list[float]] = {}
        for r in range(args.rounds):
            for w in args.workers if r % 2 == 0 else args.workers[::-1]:
                ours_it = pipeline.make_train_iterator(dataclasses.replace(spec, worker_count=w),
                                                       tokenizer=tok, process_index=0, process_count=1)
                rates.setdefault(("grain", w), []).append(measure(ours_it, args.batches, args.batch))
                loader = torch.utils.data.DataLoader(
                    TorchEmoBench(path, tok_dir, args.image_size), batch_size=args.batch, shuffle=True,
                    num_workers=w, collate_fn=torch_collate, drop_last=True,
                    persistent_workers=False, generator=torch.Generator().manual_seed(0),
                )

                def forever(loader=loader):
                    while True:
                        yield from loader

                rates.setdefault(("torch", w), []).append(measure(forever(), args.batches, args.batch))
        res = Results(__file__, {k: getattr(args, k) for k in ("records", "batch", "batches", "image_size",
                                                               "workers", "rounds", "job_steps")})
        print(f"{'workers':>7} {'grain samples/s':>16} {'torch samples/s':>16} {'ratio':>7}   (medians of "
              f"{args.rounds})")
        for w in args.workers:
            ours, theirs = (res.figure(f"{side}.w{w}.samples_per_s", float(np.median(rates[(side, w)])),
                                       "samples/s") for side in ("grain", "torch"))
            ratio = res.ratio(f"pipeline.w{w}", f"grain.w{w}.samples_per_s", f"torch.w{w}.samples_per_s",
                              "torch DataLoader with the same per-record work")
            print(f"{w:>7} {ours:>16.1f} {theirs:>16.1f} {ratio:>7.2f}")

    out = subprocess.run([sys.executable, __file__, "--default-job-worker", "--batches", str(args.batches),
                          "--job-steps", str(args.job_steps)], env=_env(), check=True, capture_output=True,
                         text=True)
    job = json.loads(out.stdout.strip().splitlines()[-1])
    res.figure("default_job.pipeline_samples_per_s", job["pipeline"], "samples/s",
               f"the default job's stage-2 pipeline, batch {job['batch']}, in process")
    res.figure("default_job.step_samples_per_s", job["step"], "samples/s", "what its train step consumes")
    ratio = res.ratio("default_job", "default_job.pipeline_samples_per_s", "default_job.step_samples_per_s",
                      "the default job's train step (samples it consumes per second)")
    print(f"default job (tiny, stage 2, batch {job['batch']}, in-process pipeline): pipeline "
          f"{job['pipeline']:.0f} samples/s, train step consumes {job['step']:.0f} samples/s -> "
          f"{ratio:.1f}x; load average {os.getloadavg()[0]:.1f}")
    if args.json:
        res.write(args.json, args, _env())


def _env() -> dict[str, str]:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    return env


if __name__ == "__main__":
    main()

"""Input pipeline throughput: our Grain pipeline vs a torch DataLoader doing the same work, in one run.

    python benchmarks/bench_input.py [--records 96] [--batch 8] [--image-size 336] [--workers 0 1 2]

Both sides decode mini-EmoBench PNGs, resize to `--image-size` (LLaVA "pad" mode), CLIP-normalise, apply the
vicuna_v1 template with 576 visual tokens per image and tokenize with the tiny tokenizer, then pad and stack
batches. The torch side reuses the same per-record functions (`media.load_media`,
`text.encode_conversation`), so the ratio measures the pipeline machinery (Grain workers/threads vs
DataLoader workers), not different image code. Prints samples/s and the ratio ours / torch per worker count.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import flags  # noqa: E402

flags.FLAGS.mark_as_parsed()  # grain 0.2.18 workers need parsed absl flags (google/grain#1355)

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=96)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--batches", type=int, default=10, help="timed batches per configuration")
    parser.add_argument("--image-size", type=int, default=336)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()

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
        print(f"{'workers':>7} {'grain samples/s':>16} {'torch samples/s':>16} {'ratio':>7}")
        for w in args.workers:
            ours_it = pipeline.make_train_iterator(dataclasses.replace(spec, worker_count=w), tokenizer=tok,
                                                   process_index=0, process_count=1)
            ours = measure(ours_it, args.batches, args.batch)
            loader = torch.utils.data.DataLoader(
                TorchEmoBench(path, tok_dir, args.image_size), batch_size=args.batch, shuffle=True,
                num_workers=w, collate_fn=torch_collate, drop_last=True,
                persistent_workers=False, generator=torch.Generator().manual_seed(0),
            )

            def forever(loader=loader):
                while True:
                    yield from loader

            theirs = measure(forever(), args.batches, args.batch)
            print(f"{w:>7} {ours:>16.1f} {theirs:>16.1f} {ours / theirs:>7.2f}")


if __name__ == "__main__":
    main()

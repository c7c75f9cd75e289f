"""Audio front end vs transformers' WhisperFeatureExtractor; our Whisper encoder (jax.jit) vs transformers'
WhisperEncoder (PyTorch, CPU) on the same random whisper-base-shaped weights.

    python benchmarks/bench_audio.py [--rounds 3] [--reps 5] [--json OUT]

Front end: log-mel features (80 bins) of one 30 s clip, and of a 4 min clip as eight 30 s windows
(`log_mel_windows` vs the extractor on the eight chunks as one batch). Encoder: whisper-base shapes (width
512, 6 layers, 8 heads, FFN 2048, 80 mels, 3000 frames -> 1500), batch 2 windows, fp32. Each side runs in
its own subprocess (JAX and torch in one process slow each other's thread pools), alternating ours, peer,
ours, peer, ...; each subprocess reports the median of `reps` timed calls after one warm-up, and the script
prints the median over rounds and the ratio peer/ours (> 1: ours is faster).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from results import Results, add_json_argument

ENCODER = dict(num_mel_bins=80, d_model=512, encoder_layers=6, encoder_attention_heads=8,
               encoder_ffn_dim=2048, max_source_positions=1500)
BATCH = 2
CLIP_S, LONG_S = 30, 240
MEASURES = ("frontend_30s", "frontend_8x30s", "encoder")


def _wave(seconds: float):
    """float32[S] at 16 kHz: a harmonic stack on a gliding pitch with syllable-rate loudness and a little
    noise (the front end's cost does not depend on content; this keeps the logs in a speech-like range)."""
    import numpy as np

    t = np.arange(int(seconds * 16_000)) / 16_000
    phase = 2 * np.pi * (180 * t - 40 / (2 * np.pi * 0.5) * np.cos(2 * np.pi * 0.5 * t))
    x = sum(np.sin(k * phase) / k for k in range(1, 25)) * np.abs(np.sin(2 * np.pi * 2 * t)) * 0.1
    return (x + 0.003 * np.random.RandomState(0).randn(len(t))).astype(np.float32)


def _features():
    import numpy as np

    return np.random.RandomState(0).randn(BATCH, 80, 3000).astype(np.float32)


def _median_time(fn: Callable[[], object], reps: int) -> float:
    fn()  # compile / warm-up
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run_ours(weights: str, reps: int) -> dict[str, float]:
    import jax
    from flax import nnx

    from data_pipeline.audio import log_mel_spectrogram, log_mel_windows
    from emollm_jax.convert import load_hf

    clip, long = _wave(CLIP_S), _wave(LONG_S)
    graphdef, state = nnx.split(load_hf(weights))
    forward = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))
    x = jax.numpy.asarray(_features())
    return {
        "frontend_30s": _median_time(lambda: log_mel_spectrogram(clip, 80), reps),
        "frontend_8x30s": _median_time(lambda: log_mel_windows(long, 80).features, reps),
        "encoder": _median_time(lambda: forward(state, x).block_until_ready(), reps),
    }


def run_peer(weights: str, reps: int) -> dict[str, float]:
    import torch
    import transformers
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    clip, long = _wave(CLIP_S), _wave(LONG_S)
    chunks = [long[i:i + 480_000] for i in range(0, len(long), 480_000)]
    extractor = transformers.WhisperFeatureExtractor(feature_size=80)
    extract = lambda wave: extractor(wave, sampling_rate=16_000, return_tensors="np")["input_features"]
    model = WhisperEncoder.from_pretrained(weights).eval()
    x = torch.tensor(_features())

    def encode():
        with torch.no_grad():
            return model(x).last_hidden_state.sum().item()

    return {
        "frontend_30s": _median_time(lambda: extract(clip), reps),
        "frontend_8x30s": _median_time(lambda: extract(chunks), reps),
        "encoder": _median_time(encode, reps),
    }


def make_weights(path: Path) -> None:
    import torch
    import transformers
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    torch.manual_seed(0)
    WhisperEncoder(transformers.WhisperConfig(**ENCODER)).save_pretrained(path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--reps", type=int, default=5)
    add_json_argument(p)
    p.add_argument("--worker", choices=["ours", "peer"], help=argparse.SUPPRESS)
    p.add_argument("--weights", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        times = (run_ours if args.worker == "ours" else run_peer)(args.weights, args.reps)
        print(json.dumps(times))
        return
    results: dict[str, dict[str, list[float]]] = {s: {m: [] for m in MEASURES} for s in ("ours", "peer")}
    with tempfile.TemporaryDirectory() as tmp:
        make_weights(Path(tmp))
        for r in range(args.rounds):
            for side in ("ours", "peer"):
                cmd = [sys.executable, __file__, "--worker", side, "--weights", tmp, "--reps", str(args.reps)]
                out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip()
                times = json.loads(out.splitlines()[-1])
                for m in MEASURES:
                    results[side][m].append(times[m])
                shown = "  ".join(f"{m} {times[m] * 1e3:8.1f} ms" for m in MEASURES)
                print(f"round {r}: {side:4s} {shown}", flush=True)
    res = Results(__file__, {"encoder": ENCODER, "batch": BATCH, "clip_s": CLIP_S, "long_s": LONG_S,
                             "rounds": args.rounds, "reps": args.reps})
    names = {"frontend_30s": "log-mel, one 30 s clip", "frontend_8x30s": "log-mel, 4 min clip as 8 windows",
             "encoder": f"Whisper encoder forward, B={BATCH}"}
    peers = {"frontend_30s": "transformers WhisperFeatureExtractor (torch.stft path)",
             "frontend_8x30s": "transformers WhisperFeatureExtractor on the 8 chunks as one batch",
             "encoder": "transformers WhisperEncoder (PyTorch, CPU)"}
    print(f"encoder config: {ENCODER}, batch {BATCH} windows, fp32")
    for m in MEASURES:
        ours, peer = (res.figure(f"{side}.{m}_ms", statistics.median(results[side][m]) * 1e3, "ms", names[m])
                      for side in ("ours", "peer"))
        ratio = res.ratio(m, f"ours.{m}_ms", f"peer.{m}_ms", peers[m])
        print(f"{names[m]:34s}: ours {ours:8.1f} ms   peer {peer:8.1f} ms   ratio peer/ours {ratio:5.2f}")
    print("peers: transformers' WhisperFeatureExtractor (its torch.stft path) and WhisperEncoder (CPU)")
    if args.json:
        res.write(args.json, args)


if __name__ == "__main__":
    main()

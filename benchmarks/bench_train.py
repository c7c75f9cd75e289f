"""Train-step throughput: emollm_jax (mlp2x and MVP projectors) vs HF PyTorch LlavaForConditionalGeneration.

Same shapes on both sides: the `mid` decoder (hidden 512, inter 1376, 8 layers, 8 heads, vocab 32000), the
tiny CLIP tower (64 px, patch 16, hidden 64, 2 layers), batch 8 x 256 tokens with one image (16 visual
tokens) per sample, AdamW, fp32, CPU, everything trainable. Each variant runs in its own process (JAX and
torch in one process slow each other's thread pools), alternating, and the medians are compared.

    python benchmarks/bench_train.py --rounds 3 --steps 5
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

ROOT = Path(__file__).resolve().parents[1]
B, T, V, IMAGE_ID = 8, 256, 32000, 4


def _inputs(np):
    rng = np.random.default_rng(0)
    ids = rng.integers(5, V, (B, T)).astype(np.int32)
    ids[:, 2:18] = IMAGE_ID
    loss_mask = np.zeros((B, T), np.float32)
    loss_mask[:, T - 32:] = 1.0
    pixels = rng.normal(size=(B, 64, 64, 3)).astype(np.float32)
    return ids, loss_mask, pixels


def worker_jax(projector: str, steps: int) -> dict:
    import importlib.util

    import jax
    import numpy as np

    from emollm_jax import experiment, flops, sharding, train

    spec = importlib.util.spec_from_file_location("emobench", ROOT / "configs" / "emobench.py")
    emobench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(emobench)
    config = emobench.get_config("mid")
    config.model.projector.kind = projector
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


def worker_torch(steps: int) -> dict:
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

    def step():
        opt.zero_grad(set_to_none=True)
        out = model(input_ids=input_ids, pixel_values=pixel_values, labels=labels)
        out.loss.backward()
        opt.step()
        return float(out.loss)

    t0 = time.perf_counter()
    step()
    first = time.perf_counter() - t0
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return {"step_s": statistics.median(times), "compile_s": first}


def _run(variant: str, steps: int) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
    env.pop("XLA_FLAGS", None)
    out = subprocess.run([sys.executable, __file__, "--worker", variant, "--steps", str(steps)], env=env,
                         check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--worker", choices=["jax_mlp2x_gelu", "jax_mvp", "torch"])
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    if args.worker:
        if args.worker == "torch":
            res = worker_torch(args.steps)
        else:
            res = worker_jax(args.worker.removeprefix("jax_"), args.steps)
        print(json.dumps(res))
        return

    sys.path.insert(0, str(ROOT))
    from emollm_jax.flops import device_peak_flops

    variants = ["torch", "jax_mlp2x_gelu", "jax_mvp"]
    runs: dict[str, list[dict]] = {v: [] for v in variants}
    for r in range(args.rounds):
        for v in variants if r % 2 == 0 else variants[::-1]:
            runs[v].append(_run(v, args.steps))
    peak, source = device_peak_flops()
    flops_mlp = runs["jax_mlp2x_gelu"][0]["flops"]
    print(f"train step, batch {B} x {T} tokens, CPU fp32, medians of {args.rounds} processes x {args.steps} "
          f"steps; peak {peak / 1e9:.0f} GFLOP/s ({source})")
    torch_s = statistics.median(x["step_s"] for x in runs["torch"])
    for v in variants:
        s = statistics.median(x["step_s"] for x in runs[v])
        c = statistics.median(x["compile_s"] for x in runs[v])
        f = runs[v][0].get("flops", flops_mlp)
        print(f"{v:16s} {B * T / s:8.0f} tok/s  step {s * 1e3:7.1f} ms  MFU {f / s / peak:5.1%}  "
              f"x{torch_s / s:.2f} vs torch  (first step / compile {c:.1f} s)")


if __name__ == "__main__":
    main()

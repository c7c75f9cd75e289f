"""Ablations on the tiny variant: runs over (foundation combination) x (variant) x (seed), one table.

`python -m emollm_jax.ablation --config configs/ablation.py[:arg] --workdir W` trains and evaluates every run
in `W/<combination>/<variant>/seed<k>` (all sharing W/data and one EmoPrompt bank) and writes
`W/ablation.md`, `W/ablation.json` and `W/ablation.png`. arg:

- "" (default): EmoPrompt M in {0, 1, 3} with MVP, and the plain MLP projector with M = 0; CLIP + LLaMA;
  seed 0.
- "grid": both projectors x every M.
- "quick": the default set with short stages on 5% of mini-EmoBench (smoke test).
- "foundations": the paper's "across foundation models" comparison: the base model (LLaVA's mlp2x_gelu
  projector, no EmoPrompt) against MVP + EmoPrompt (M = 1), for CLIP + LLaMA, SigLIP + Qwen2 and
  CLIP + Mistral, seeds 0, 1, 2, with stage 2 shortened to 300 steps.
- "foundations_quick": the same runs with short stages on 5% of mini-EmoBench, seeds 0 and 1 (smoke test).

`config.ablation` holds the axes: `variants` and `foundations` map a name to nested config overrides; a block
there that names another `kind` than the config's (e.g. `model.text.kind = "qwen2"`) is that registered
part's defaults plus the given fields, a block of the same kind changes only the given keys. `seeds` lists
`config.seed` values; `baseline` names the variant the others are compared with. Everything else is
configs/emobench.py's tiny variant without its audio tower.
"""

from __future__ import annotations

from pathlib import Path

import ml_collections

from emollm_jax.configuration import ConfigError, load_config
from emollm_jax.models.emollm import NO_AUDIO

ARGS = ("", "grid", "quick", "foundations", "foundations_quick")
EXEMPLAR_COUNTS = (0, 1, 3)
PROJECTORS = {"mvp": "mvp", "mlp": "mlp2x_gelu"}


def variants(grid: bool = False) -> dict[str, dict[str, object]]:
    """variant name -> nested config overrides (ConfigDict keys hold no dots: configuration.flatten)."""
    out = {}
    for proj, kind in PROJECTORS.items():
        for m in EXEMPLAR_COUNTS:
            if grid or proj == "mvp" or m == 0:
                out[f"{proj}_m{m}"] = {"model": {"projector": {"kind": kind}},
                                       "emoprompt": {"num_exemplars": m}}
    return out


# The two arms of the foundations comparison. "mvp" keeps the tiny variant's MVP block (token + relation +
# multilevel perspectives, sum fusion, levels -1, -2, -3); "mlp2x_gelu" is LLaVA-1.5's own projector.
FOUNDATION_VARIANTS = {
    "base": {"model": {"projector": {"kind": "mlp2x_gelu"}}, "emoprompt": {"num_exemplars": 0}},
    "mvp_emoprompt": {"model": {"projector": {"kind": "mvp"}}, "emoprompt": {"num_exemplars": 1}},
}

# Tiny parts of each family, with the non-size fields of the real checkpoints they stand for. Towers: 64 px,
# patch 16, 2 layers of width 64. Decoders: 4 layers, width 128, 4 query heads over 2 key/value heads, the
# vocabulary from the tiny tokenizer (0).
_TOWER = dict(image_size=64, patch_size=16, hidden_size=64, intermediate_size=256, num_layers=2, num_heads=4)
_DECODER = dict(vocab_size=0, hidden_size=128, intermediate_size=344, num_layers=4, num_heads=4,
                num_kv_heads=2, max_position_embeddings=1024)
CLIP = dict(kind="clip", **_TOWER, hidden_act="quick_gelu", layer_norm_eps=1e-5, image_mode="pad")
# LLaVA reads a SigLIP hidden state, never its attention-pooling head.
SIGLIP = dict(kind="siglip", **_TOWER, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6,
              image_mode="resize", use_head=False)
LLAMA = dict(kind="llama", **_DECODER, rope_theta=10000.0, rms_norm_eps=1e-5, attention_bias=False,
             tie_word_embeddings=False)  # Vicuna-7B-v1.5 / LLaVA-1.5
QWEN2 = dict(kind="qwen2", **_DECODER, rope_theta=1000000.0, rms_norm_eps=1e-6, attention_bias=True,
             tie_word_embeddings=True)  # Qwen2-0.5B / llava-interleave-qwen-0.5b: q/k/v biases, tied head
# Mistral-7B-v0.1 attends over a 4096-token window of a 32k context; here 64 tokens, shorter than most
# prompts, so the window binds (the answer sees the image through the layers, not directly).
MISTRAL = dict(kind="mistral", **_DECODER, rope_theta=10000.0, rms_norm_eps=1e-5, attention_bias=False,
               tie_word_embeddings=False, sliding_window=64)


def foundations() -> dict[str, dict[str, object]]:
    """combination name -> nested overrides: its tower, its decoder and how LLaVA reads that tower (CLIP:
    penultimate layer without the class token; SigLIP has none: last layer, every token, as
    llava-interleave-qwen)."""
    clip_features = {"vision_feature_layer": -2, "vision_feature_select": "patch"}
    return {
        "clip_llama": {"model": {"vision": CLIP, "text": LLAMA, **clip_features}},
        "siglip_qwen2": {"model": {"vision": SIGLIP, "text": QWEN2, "vision_feature_layer": -1,
                                   "vision_feature_select": "full"}},
        "clip_mistral": {"model": {"vision": CLIP, "text": MISTRAL, **clip_features}},
    }


def _ablation_block(**fields: object) -> ml_collections.ConfigDict:
    block = dict(variants={}, foundations={"clip_llama": {}}, seeds=(0,), baseline="", title="",
                 note="", mini_scale=1.0)
    block.update(fields)
    return ml_collections.ConfigDict(block)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    arg = (arg or "").strip()
    if arg not in ARGS:
        raise ConfigError(f"configs/ablation.py: unknown argument {arg!r}; expected one of {ARGS}")
    c = load_config(f"{Path(__file__).with_name('emobench.py')}:tiny")
    # The ablations compare what sees (towers, projectors, prompts): the tiny job's audio tower and its voice
    # records stay out, so every run reads the same image records.
    c.model.audio.kind = NO_AUDIO
    for stage in c.stage_order:
        c.stages[stage].trainable = tuple(g for g in c.stages[stage].trainable if g != "audio")
    quick = arg.endswith("quick")
    if arg.startswith("foundations"):
        c.data.template = ""  # each decoder's own chat template
        # With M = 1 exemplar, mini-EmoBench prompts stay under 192 tokens with the vicuna_v1, llama2,
        # mistral_instruct and chatml templates (at most 185: llama2's [INST] with its system text).
        c.data.max_len = 192
        c.data.seq_buckets = (128, 160, 192)
        c.stages.emotional.steps = 300
        c.ablation = _ablation_block(
            variants=FOUNDATION_VARIANTS, foundations=foundations(), seeds=(0, 1) if quick else (0, 1, 2),
            baseline="base", title="EmoLLM across foundation models: base model vs MVP + EmoPrompt",
            note="Stage 2 is shortened from the tiny job's 1600 steps to 300 to keep 18 runs short on a CPU; "
                 "the models are tiny, trained from random weights, and undertrained.")
    else:
        # M = 3 exemplars make prompts of up to 304 tokens.
        c.data.max_len = 320
        c.data.seq_buckets = (128, 160, 192, 256, 320)
        c.ablation = _ablation_block(
            variants=variants(grid=arg == "grid"), baseline="mlp_m0",
            title="Ablation: EmoPrompt exemplars (M) and projector")
    if quick:
        c.stages.objective.steps = 4
        c.stages.emotional.steps = 8
        c.data.seq_buckets = (c.data.max_len,)  # one compile per stage
        c.ablation.mini_scale = 0.05  # of mini-EmoBench's default split sizes (generated once, shared)
        c.ablation.note = "Smoke test: 4 + 8 training steps on 5% of mini-EmoBench; the numbers mean nothing."
    return c

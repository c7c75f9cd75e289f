"""Shared by test_evaluate / test_predict / test_notebooks: a small mini-EmoBench, its tokenizer, the tiny
config (shrunk further for speed) and a random EmoLLM."""

from __future__ import annotations

from pathlib import Path

from emollm_jax.configuration import load_config

ROOT = Path(__file__).resolve().parents[1]


def tiny_config(data_root: Path, tokenizer: Path, **eval_overrides):
    c = load_config(f"{ROOT / 'configs' / 'emobench.py'}:tiny")
    c.data.root = str(data_root)
    c.data.tokenizer = str(tokenizer)
    c.model.text.update(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2, num_kv_heads=1)
    c.model.vision.update(hidden_size=32, intermediate_size=64, num_heads=2)
    c.eval.update(batch_size=8, max_new_tokens=4, **eval_overrides)
    return c


def make_data(tmp: Path, per_task_test: int = 2):
    """mini-EmoBench with a few records per task (+ blank control) and its word-level tokenizer."""
    from data_pipeline import mini_emobench
    from data_pipeline.records import iter_records
    from data_pipeline.text import train_tiny_tokenizer

    data = tmp / "data"
    sizes = {t: (3, per_task_test) for t in mini_emobench.DEFAULT_SIZES}
    mini_emobench.generate(data, seed=0, sizes=sizes)
    texts = []
    for split in ("train", "test"):
        for _, r in iter_records(data / f"{split}.jsonl"):
            texts += [t["value"] for t in r["conversations"]] + list(r.get("options") or [])
            texts += [r.get("rationale") or ""]
    texts.append("Example: Reasoning: Answer:")
    tok = train_tiny_tokenizer(texts, tmp / "tokenizer")
    return data, tmp / "tokenizer", tok


def random_model(config, tok, seed: int = 0):
    from emollm_jax import experiment

    cfg = experiment.model_config(config, vocab_size=tok.vocab_size, image_token_id=tok.image_token_id)
    return experiment.new_model(cfg, seed)

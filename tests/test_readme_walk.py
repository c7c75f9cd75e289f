"""README "Using your own data and weights", steps 1-5, run as written on a small copy of mini-EmoBench.

The README's bash block is executed by bash with only its paths replaced (data, checkpoints, workdir, the
image), the vicuna7b variant replaced by the tiny one with short stages (a 7B model does not train on a CPU
in a test) and LLaVA-1.5-7B replaced by a tiny random LLaVA with the tiny variant's shapes, saved with
`save_pretrained` beside a tokenizer. `EMOLLM_README_WALK=FILE` keeps the walk's output in FILE.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHORT = ("--config.stages.objective.steps=2 --config.stages.emotional.steps=3 --config.eval.batch_size=16 "
         "--config.eval.max_examples=16")


def readme_block() -> str:
    section = (REPO / "README.md").read_text().split("## Using your own data and weights", 1)[1]
    return section.split("```bash\n", 1)[1].split("```", 1)[0]


def tiny_llava(path: Path, vocab_size: int, image_token_id: int) -> None:
    """A random LlavaForConditionalGeneration with the tiny variant's tower and decoder shapes."""
    import torch
    import transformers

    cfg = transformers.LlavaConfig(
        vision_config=transformers.CLIPVisionConfig(image_size=64, patch_size=16, hidden_size=64,
                                                    intermediate_size=256, num_hidden_layers=2,
                                                    num_attention_heads=4),
        text_config=transformers.LlamaConfig(vocab_size=vocab_size, hidden_size=128, intermediate_size=344,
                                             num_hidden_layers=4, num_attention_heads=4,
                                             num_key_value_heads=2, max_position_embeddings=1024),
        image_token_index=image_token_id)
    torch.manual_seed(0)
    transformers.LlavaForConditionalGeneration(cfg).save_pretrained(path)


@pytest.mark.slow
def test_readme_steps_1_to_5_on_a_small_mini_emobench(tmp_path):
    from data_pipeline import mini_emobench
    from data_pipeline.text import train_tiny_tokenizer
    from emollm_jax.experiment import _record_texts

    data, hf = tmp_path / "data" / "emobench", tmp_path / "ckpt" / "llava-1.5-7b-hf"
    mini_emobench.generate(data, seed=0, sizes={t: (6, 2) for t in mini_emobench.DEFAULT_SIZES})
    tok = train_tiny_tokenizer(_record_texts(str(data), "train"), hf)
    tiny_llava(hf, tok.vocab_size, tok.image_token_id)
    face = next(r["image"] for r in map(json.loads, (data / "test.jsonl").read_text().splitlines())
                if r["task"] == "emo_c")

    script = readme_block()
    paths = {"/data/emobench_ar": f"{tmp_path}/data/emobench_ar", "/data/emobench": str(data),
             "/ckpt/llava-1.5-7b-hf": str(hf), "/ckpt/llava7b_jax": f"{tmp_path}/ckpt/llava7b_jax",
             "/runs/emollm7b": f"{tmp_path}/runs/emollm7b", "face.jpg": str(data / face),
             "configs/emobench.py:vicuna7b": f"{REPO}/configs/emobench.py:tiny {SHORT}"}
    assert all(old in script for old in paths), [old for old in paths if old not in script]
    pattern = "|".join(re.escape(old) for old in sorted(paths, key=len, reverse=True))
    script = re.sub(pattern, lambda m: paths[m.group()], script)  # one pass: no path replaced twice
    script = re.sub(r"^# (\d)\. ", r'echo "=== step \1"\n# \1. ', script, flags=re.M)
    env = dict(os.environ, JAX_PLATFORMS="cpu", TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(REPO),
               XLA_FLAGS="--xla_force_host_platform_device_count=1", PATH=f"{Path(sys.executable).parent}:"
               f"{os.environ['PATH']}")
    proc = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=3600)
    walk = proc.stdout + "\n--- stderr ---\n" + proc.stderr
    if os.environ.get("EMOLLM_README_WALK"):
        Path(os.environ["EMOLLM_README_WALK"]).write_text(f"$ bash <<'EOF'\n{script}EOF\n\n{walk}")
    assert proc.returncode == 0, walk[-6000:]
    steps = dict(re.findall(r"=== step (\d)\n(.*?)(?==== step|\Z)", proc.stdout, flags=re.S))
    assert re.search(r"^total\s+64\s+64\s+0$", steps["1"], re.M)                     # train + test: all ok
    assert "wrote 48 records to 16 shard(s)" in steps["2"]
    assert re.search(r"^predict-0: .*\[emo_o: ", steps["5"], re.M)
    workdir = tmp_path / "runs" / "emollm7b"
    assert "emobench_ar/train-*.array_record; samples:" in proc.stderr
    results = json.loads((workdir / "eval" / "results.json").read_text())
    assert results["splits"]["test"]["n"] == 16 and 0.0 <= results["emobench_mean"] <= 1.0

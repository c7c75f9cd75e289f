"""`python -m emollm_jax.emoprompt build --teacher DIR`: a tiny random HF LLaMA (saved here with a tokenizer)
writes the rationales; the same model converted with `python -m emollm_jax.convert` writes the same bank,
its tokenizer read from the HF directory it was converted from."""

import json
import shutil

import pytest

from tests import cli_setup


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """(records file, HF teacher dir with its tokenizer, work dir)."""
    import torch
    import transformers

    from data_pipeline.text import load_tokenizer, train_tiny_tokenizer
    from emollm_jax.experiment import _record_texts

    tmp = tmp_path_factory.mktemp("teacher")
    data = cli_setup.make_data(tmp / "data", train_per_task=1)
    hf = tmp / "hf"
    train_tiny_tokenizer(_record_texts(str(data), "train"), hf)  # tokenizer.json + tokenizer_config.json
    tok = load_tokenizer(hf)
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      eos_token_id=tok.eos_id, bos_token_id=tok.bos_id)
    transformers.LlamaForCausalLM(config).save_pretrained(hf)
    return data / "train.jsonl", hf, tmp


def _build(records, teacher, out, *extra, check=True):
    return cli_setup.run("emollm_jax.emoprompt", "build", "--records", records, "--out", out,
                         "--per-task", "1", "--teacher", teacher, "--max-new-tokens", "6", *extra,
                         cwd=out.parent, check=check)


@pytest.mark.slow
def test_teacher_from_an_hf_dir_and_from_its_converted_checkpoint(teacher):
    records, hf, tmp = teacher
    _build(records, hf, tmp / "bank_hf.json")
    bank = json.loads((tmp / "bank_hf.json").read_text())["tasks"]
    own = {r["id"]: r.get("rationale") for r in map(json.loads, records.read_text().splitlines())}
    assert len(bank) >= 6
    for items in bank.values():
        (item,) = items
        assert item["reasoning"] and item["reasoning"] != own[item["id"]]  # the teacher's words

    cli_setup.run("emollm_jax.convert", "--hf_dir", hf, "--out", tmp / "converted", cwd=tmp)
    assert not (tmp / "converted" / "tokenizer.json").exists()  # the tokenizer comes from the source dir
    _build(records, tmp / "converted", tmp / "bank_converted.json")
    assert json.loads((tmp / "bank_converted.json").read_text())["tasks"] == bank


@pytest.mark.slow
def test_teacher_without_a_tokenizer_is_refused_naming_the_option(teacher):
    records, hf, tmp = teacher
    bare = tmp / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(hf / name, bare / name)
    proc = _build(records, bare, tmp / "bank_bare.json", check=False)
    assert proc.returncode == 2 and "--teacher-tokenizer" in proc.stderr.splitlines()[-1]
    assert not (tmp / "bank_bare.json").exists()

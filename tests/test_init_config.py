"""Pretrained checkpoints bring their architecture: `config.init.llm` / `config.init.hf` fill the model blocks
from the checkpoint's own config (decoder kind included), given overrides win or are refused naming both
values; a converted LLaVA under another projector gives its towers, the projector starts fresh, and the log
says so (`python -m emollm_jax.main` end to end)."""

import json
import re

import numpy as np
import pytest
from flax import nnx

from emollm_jax import init_config
from emollm_jax.configuration import ConfigError, load_config
from tests import cli_setup
from tests.cli_setup import CONFIG

QWEN = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, tie_word_embeddings=True, max_position_embeddings=512, rope_theta=1e6)


def _qwen_config(path, vocab=96):
    import transformers

    transformers.Qwen2Config(vocab_size=vocab, **QWEN).save_pretrained(path)  # config.json only
    return path


def _llava_config(path, vocab=96, image_token=95):
    import transformers

    cfg = transformers.LlavaConfig(
        text_config=transformers.LlamaConfig(vocab_size=vocab, hidden_size=48, intermediate_size=96,
                                             num_hidden_layers=2, num_attention_heads=4,
                                             num_key_value_heads=4),
        vision_config=transformers.CLIPVisionConfig(image_size=64, patch_size=16, hidden_size=32,
                                                    intermediate_size=64, num_hidden_layers=2,
                                                    num_attention_heads=4),
        image_token_index=image_token)
    cfg.save_pretrained(path)
    return path


def test_init_llm_fills_the_decoder_block_from_its_config(tmp_path):
    qwen = _qwen_config(tmp_path / "qwen")
    for variant in ("tiny", "vicuna7b"):
        config = init_config.resolve(load_config(f"{CONFIG}:{variant}", [f"init.llm={qwen}"]))
        text = config.model.text
        assert (text.kind, text.attention_bias, text.tie_word_embeddings) == ("qwen2", True, True)
        assert (text.hidden_size, text.num_layers, text.num_kv_heads, text.vocab_size) == (32, 2, 2, 96)
        assert (text.rope_theta, text.max_position_embeddings) == (1e6, 512)
    assert (text.dtype, text.remat) == ("bfloat16", True)  # vicuna7b's run choices stay
    assert config.model.vision.hidden_size == 1024  # only the decoder came from the checkpoint


def test_init_hf_fills_both_towers_from_a_llava_or_converted_config(tmp_path):
    llava = _llava_config(tmp_path / "llava")
    converted = tmp_path / "converted"
    converted.mkdir()
    (converted / "hf_config.json").write_text((llava / "config.json").read_text())
    for path in (llava, converted):
        config = init_config.resolve(load_config(CONFIG, [f"init.hf={path}"]))
        assert (config.model.text.kind, config.model.text.hidden_size) == ("llama", 48)
        assert (config.model.vision.hidden_size, config.model.vision.image_size) == (32, 64)
        assert config.model.projector.kind == "mvp"  # the configured projector stays
    # --init_from counts as init.hf; a path without a config fills nothing
    assert init_config.resolve(load_config(CONFIG), init_from=str(llava)).model.text.hidden_size == 48
    plain = load_config(CONFIG, [f"init.hf={tmp_path}"])
    assert init_config.resolve(plain) is plain


def test_given_overrides_win_or_are_refused_naming_both_values(tmp_path, caplog):
    qwen = _qwen_config(tmp_path / "qwen")

    def resolve(*overrides):
        return init_config.resolve(load_config(CONFIG, [f"init.llm={qwen}", *overrides]))

    text = resolve("model.text.rope_theta=10000.0", "model.text.max_position_embeddings=256").model.text
    assert (text.rope_theta, text.max_position_embeddings) == (10000.0, 256)  # same shapes: given wins
    assert "config.model.text.rope_theta=10000.0 (given) replaces 1000000.0" in caplog.text
    assert resolve("model.text.hidden_size=32").model.text.hidden_size == 32  # agrees: fine
    refused = (("hidden_size=64", "hidden_size=64 (given) conflicts with hidden_size=32"),
               ("kind=llama", "kind='llama' (given) conflicts with kind='qwen2'"),
               ("vocab_size=32000", "vocab_size=32000 (given) conflicts with vocab_size=96"),
               ("tie_word_embeddings=False", "tie_word_embeddings=False (given) conflicts with "
                                             "tie_word_embeddings=True"))
    for override, names in refused:
        with pytest.raises(ConfigError, match=re.escape(f"config.model.text.{names}")) as e:
            resolve(f"model.text.{override}")
        assert str(qwen / "config.json") in str(e.value)


def test_values_set_in_code_are_defaults_the_checkpoint_replaces(tmp_path):
    qwen = _qwen_config(tmp_path / "qwen")
    config = load_config(CONFIG, [f"init.llm={qwen}"])
    config.model.text.hidden_size = 64  # not an override: apply_overrides did not record it
    assert "model.text.hidden_size" not in config.overrides
    assert init_config.resolve(config).model.text.hidden_size == 32


@pytest.mark.slow
def test_main_trains_from_a_converted_llava_tower_and_another_decoder(tmp_path):
    """`--config.init.hf=<converted LLaVA>` under the tiny config's MVP projector plus `--config.init.llm=<HF
    Qwen2>`: the tower is the LLaVA's, the decoder the Qwen2 (kind and sizes from its config.json), the
    projector fresh; a conflicting override is refused before any work."""
    import torch
    import transformers

    from data_pipeline.text import load_tokenizer, train_tiny_tokenizer
    from emollm_jax import experiment
    from emollm_jax.convert import load_hf
    from emollm_jax.convert.orbax_params import load_params
    from emollm_jax.experiment import _record_texts

    data = cli_setup.make_data(tmp_path / "data", train_per_task=2)
    train_tiny_tokenizer(_record_texts(str(data), "train"), tmp_path / "tok")
    tok = load_tokenizer(tmp_path / "tok")
    torch.manual_seed(0)
    llava_cfg = transformers.LlavaConfig.from_pretrained(
        _llava_config(tmp_path / "llava", tok.vocab_size, tok.image_token_id))
    transformers.LlavaForConditionalGeneration(llava_cfg).save_pretrained(tmp_path / "llava")
    transformers.Qwen2ForCausalLM(transformers.Qwen2Config.from_pretrained(
        _qwen_config(tmp_path / "qwen", tok.vocab_size))).save_pretrained(tmp_path / "qwen")
    cli_setup.run("emollm_jax.convert", "--hf_dir", tmp_path / "llava", "--out", tmp_path / "converted",
                  cwd=tmp_path)

    common = (f"--config.init.hf={tmp_path / 'converted'}", f"--config.init.llm={tmp_path / 'qwen'}",
              f"--config.data.root={data}", f"--config.data.tokenizer={tmp_path / 'tok'}")
    bad = cli_setup.main(tmp_path / "bad", *common, "--config.model.text.num_layers=4", check=False)
    assert bad.returncode == 2 and "num_layers=4 (given) conflicts with num_layers=2" in bad.stderr
    assert not (tmp_path / "bad").exists()

    proc = cli_setup.main(tmp_path / "work", "--mode=train", *common, "--config.stage_order=('emotional',)",
                          "--config.stages.emotional.steps=1", "--config.stages.emotional.batch_size=8",
                          "--config.stages.emotional.trainable=('projector',)")
    # the LLaVA has an mlp2x_gelu projector and no audio parts: its tower loads, the configured MVP
    # projector (and audio parts) start fresh
    assert re.search(r"holds other projector .*\(projector mlp2x_gelu[^)]*\): loading vision, the configured "
                     r"ones start fresh", proc.stderr), proc.stderr[-3000:]
    written = json.loads((tmp_path / "work" / "config.json").read_text())["model"]
    assert (written["text"]["kind"], written["text"]["hidden_size"], written["vision"]["hidden_size"]) == (
        "qwen2", 32, 32)
    model, _ = experiment.load_run(tmp_path / "work")  # the trained checkpoint: towers as loaded
    for ours, theirs in ((model.llm, load_hf(tmp_path / "qwen")),
                         (model.vision, load_params(tmp_path / "converted").vision)):
        for (p, a), (q, b) in zip(nnx.to_flat_state(nnx.state(ours, nnx.Param)),
                                  nnx.to_flat_state(nnx.state(theirs, nnx.Param)), strict=True):
            assert p == q
            np.testing.assert_array_equal(np.asarray(a.get_value()), np.asarray(b.get_value()))

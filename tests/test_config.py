"""configs/emobench.py: variants build; overrides are parsed and typed; the typed sections and validate_config
refuse each kind of nonsense naming the key; `main` reports a config error in one line."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from emollm_jax.configuration import ConfigError, apply_overrides, load_config
from emollm_jax.run_config import parse_sections, validate_config

ROOT = Path(__file__).resolve().parents[1]
_PATH = ROOT / "configs" / "emobench.py"


def _config(variant="tiny"):
    return load_config(f"{_PATH}:{variant}")


def _vicuna_ready():
    c = _config("vicuna7b")
    c.data.root = "/data/emobench"
    c.init.llm, c.init.vision = "/w/vicuna", "/w/clip"
    return c


@pytest.mark.parametrize("variant", ["tiny", "mid"])
def test_variants_validate_on_1_and_8_devices(variant):
    c = _config(variant)
    assert validate_config(c, 1) == {"data": 1, "fsdp": 1, "tensor": 1}
    assert validate_config(c, 8) == {"data": 8, "fsdp": 1, "tensor": 1}


def test_default_is_tiny_and_stages_follow_the_recipe():
    c = load_config(_PATH)
    assert c.variant == "tiny"
    assert list(c.stage_order) == ["objective", "emotional"]
    assert tuple(c.stages.objective.trainable) == ("projector",)
    assert set(c.stages.objective.tasks) == {"caption", "vqa"}
    assert {"emo_c", "emo_o", "intent", "hate", "humor", "sarcasm"} <= set(c.stages.emotional.tasks)
    v = _vicuna_ready()
    assert validate_config(v, 8) == {"data": 1, "fsdp": 8, "tensor": 1}
    assert (v.stages.objective.lr, v.stages.objective.batch_size) == (1e-3, 256)
    assert (v.stages.emotional.lr, v.stages.emotional.batch_size) == (2e-5, 128)
    assert v.model.vision.image_size == 336 and v.model.vision.patch_size == 14
    assert (v.model.vision.image_size // v.model.vision.patch_size) ** 2 == 576
    assert v.data.max_len == 2048
    assert v.model.text.dtype == "bfloat16" and v.model.text.param_dtype == "float32"


def test_unknown_variant():
    with pytest.raises(ValueError, match="unknown variant 'huge'"):
        load_config(f"{_PATH}:huge")


def _refuse(config, key, devices=8):
    with pytest.raises(ValueError, match=rf"config\.{key}"):
        validate_config(config, devices)


def test_mesh_not_dividing_devices():
    c = _config()
    c.mesh.update(data=-1, fsdp=3)
    _refuse(c, r"mesh\.data")
    c.mesh.update(data=2, fsdp=2, tensor=1)
    _refuse(c, "mesh")
    c.mesh.update(data=-1, fsdp=-1)
    _refuse(c, r"mesh\.fsdp")
    c.mesh.update(data=0, fsdp=1)
    _refuse(c, r"mesh\.data")


def test_unknown_mesh_axis():
    c = _config()
    c.mesh.pipeline = 2
    _refuse(c, r"mesh\.pipeline")


def test_batch_not_divisible_by_data_parallel():
    c = _config()
    c.stages.emotional.batch_size = 12
    _refuse(c, r"stages\.emotional\.batch_size")
    validate_config(c, 4)  # 12 splits over 4


def test_grad_accum_must_split_the_batch():
    c = _config()
    c.stages.objective.grad_accum = 3
    _refuse(c, r"stages\.objective\.grad_accum", devices=1)


def test_unknown_stage_group_and_task_and_stage():
    c = _config()
    c.stages.objective.trainable = ("projector", "decoder")
    _refuse(c, r"stages\.objective\.trainable")
    c = _config()
    c.stages.emotional.tasks = ("emo_c", "poetry")
    _refuse(c, r"stages\.emotional\.tasks")
    c = _config()
    c.stage_order = ("objective", "finetune")
    _refuse(c, "stage_order")
    c = _config()
    c.stages.objective.trainable = ("lora",)
    _refuse(c, r"stages\.objective\.trainable")  # lora without a rank


def test_unknown_template_projector_schedule_dtype():
    for key, value, where in [
        ("data.template", "alpaca", r"data\.template"),
        ("model.projector.kind", "qformer", r"model\.projector\.kind"),
        ("model.text.dtype", "int8", r"model\.text\.dtype"),
        ("stages.emotional.schedule", "linear", r"stages\.emotional\.schedule"),
        ("model.video_pooling", "max", r"model\.video_pooling"),
    ]:
        c = _config()
        section, _, leaf = key.rpartition(".")
        node = c
        for part in section.split("."):
            node = node[part]
        node[leaf] = value
        _refuse(c, where)


def test_shape_consistency():
    c = _config()
    c.model.text.num_kv_heads = 3
    _refuse(c, r"model\.text\.num_kv_heads")
    c = _config()
    c.model.vision.image_size = 70
    _refuse(c, r"model\.vision\.image_size")
    c = _config()
    c.model.projector.levels = (-1, -9)
    _refuse(c, r"model\.projector\.levels")
    c = _config()
    c.stages.objective.update(steps=0, epochs=0.0)
    _refuse(c, r"stages\.objective\.steps")


def test_vicuna7b_requires_paths():
    c = _config("vicuna7b")
    _refuse(c, r"data\.root")
    c.data.root = "/data/emobench"
    _refuse(c, r"data\.tokenizer")
    c.data.tokenizer = "/w/vicuna"
    _refuse(c, r"init\.llm")
    c.init.llm = "/w/vicuna"
    _refuse(c, r"init\.llm")  # the vision tower is still missing
    c.init.vision = "/w/clip"
    validate_config(c, 8)


def _vicuna_like_tokenizer_dir(directory: Path) -> Path:
    """A Vicuna-style HF tokenizer (bos/eos, no <image> token) of 300 entries."""
    import tokenizers
    from tokenizers import models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = tokenizers.Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    corpus = ["the person looks happy and calm", "what emotion is shown in the image", "yes no maybe"] * 20
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"])
    tok.train_from_iterator(corpus, trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(directory)
    return directory


def test_vicuna_tokenizer_keeps_its_vocab_and_marks_images_outside_it(tmp_path):
    from emollm_jax import experiment

    tok_dir = _vicuna_like_tokenizer_dir(tmp_path / "vicuna")
    c = _vicuna_ready()
    c.init.llm = str(tok_dir)
    setup = experiment.prepare_data(c, tmp_path / "work")
    tokenizer = experiment.load_tokenizer(setup)
    base_vocab = experiment.load_tokenizer(experiment.DataSetup(setup.root, str(tok_dir))).vocab_size - 1
    assert tokenizer.image_token_id == -200
    assert tokenizer.vocab_size == base_vocab  # nothing appended: the checkpoint's embedding still fits
    c.model.text.vocab_size = tokenizer.vocab_size
    cfg = experiment.model_config(c, vocab_size=tokenizer.vocab_size, image_token_id=tokenizer.image_token_id)
    assert cfg.image_token_id == -200 and cfg.text.vocab_size == base_vocab


def test_load_config_reads_a_variant_from_the_file():
    mid = load_config(f"{_PATH}:mid")
    assert mid.variant == "mid" and mid.model.text.hidden_size == 512
    assert load_config(_PATH).variant == "tiny"


def test_field_ranges_are_checked_by_their_sections():
    for key, value in [
        ("train.max_to_keep", 0),
        ("train.checkpoint_every", 0),
        ("train.log_every", -1),
        ("stages.emotional.lr", -1.0),
        ("stages.emotional.warmup_ratio", 1.0),
        ("stages.objective.batch_size", 0),
        ("data.max_len", 0),
        ("data.seq_buckets", (160, 128)),
        ("eval.batch_size", 0),
        ("plan.device_memory_gb", 0.0),
        ("lora.rank", -1),
        ("emoprompt.strategy", "random"),
    ]:
        c = apply_overrides(_config(), {key: value})
        with pytest.raises(ConfigError, match=rf"^config\.{key.replace('.', '[.]')}="):
            parse_sections(c)
    c = _config()
    c.train.bogus = 1
    with pytest.raises(ConfigError, match=r"config\.train\.bogus: unknown key"):
        parse_sections(c)


def test_string_overrides_take_the_type_of_the_key():
    c = load_config(_PATH, [
        "stages.emotional.lr=1",             # int -> float
        "stages.emotional.steps=400",
        "stage_order=('emotional',)",        # tuple literal
        "data.seq_buckets=(96, 160)",
        "data.mini_video_files=true",        # absl-style boolean
        "data.root=/data/emo bench",         # a path stays text
        "eval.control_split=123",            # a str key keeps digits as text
    ])
    assert c.stages.emotional.lr == 1.0 and isinstance(c.stages.emotional.lr, float)
    assert c.stages.emotional.steps == 400
    assert tuple(c.stage_order) == ("emotional",) and tuple(c.data.seq_buckets) == (96, 160)
    assert c.data.mini_video_files is True
    assert c.data.root == "/data/emo bench" and c.eval.control_split == "123"
    mapped = load_config(_PATH, {"stages.emotional.batch_size": "32", "mesh.fsdp": 2})
    assert mapped.stages.emotional.batch_size == 32 and mapped.mesh.fsdp == 2
    with pytest.raises(ConfigError, match=r"^config\.stages\.emotional\.steps='many': expected int, got str"):
        load_config(_PATH, ["stages.emotional.steps=many"])
    with pytest.raises(ConfigError, match=r"config\.train\.log_every=0\.5: expected int"):
        load_config(_PATH, {"train.log_every": 0.5})


def test_none_keys_take_any_type_and_typed_placeholders_their_own():
    import ml_collections
    from ml_collections import config_dict

    c = ml_collections.ConfigDict({"free": None, "count": config_dict.placeholder(int)})
    out = apply_overrides(c, ["free=('a', 1)", "count=3"])
    assert out.free == ("a", 1) and out.count == 3 and c.count is None  # `c` itself is untouched
    assert apply_overrides(out, ["count=None"]).count is None
    with pytest.raises(ConfigError, match=r"config\.count='x': expected int"):
        apply_overrides(c, ["count=x"])


def test_unknown_override_key_is_one_line_naming_it():
    with pytest.raises(ConfigError) as e:
        load_config(_PATH, ["stages.emotional.lrate=1e-4"])
    message = str(e.value)
    assert "\n" not in message
    assert message.startswith("config.stages.emotional.lrate: unknown key; config.stages.emotional has ")
    assert "batch_size, " in message and ", warmup_ratio" in message  # the keys that do exist
    with pytest.raises(ConfigError, match=r"^config\.stagez\.emotional\.lr: unknown key; config has "):
        load_config(_PATH, ["stagez.emotional.lr=1"])


def _main(*args):
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", "emollm_jax.main", *args], capture_output=True, text=True,
                          env=env, cwd=ROOT.parent, timeout=300)


def test_main_reports_a_config_error_in_one_line_and_exits_2(tmp_path):
    out = _main("--config.train.bogus=1", f"--workdir={tmp_path / 'w'}")
    assert out.returncode == 2, out.stderr
    assert out.stderr.splitlines() == [
        "error: config.train.bogus: unknown key; config.train has checkpoint_every, log_every, loss_chunk, "
        "max_to_keep, profile_steps"]
    assert not (tmp_path / "w").exists()  # refused before anything was written
    out = _main(f"--config={_PATH}:tiny", "--config.stages.emotional.lr", "-1", f"--workdir={tmp_path / 'w'}")
    assert out.returncode == 2 and out.stderr.splitlines() == [
        "error: config.stages.emotional.lr=-1.0: must be positive"], out.stderr
    verbose = _main("--config.train.bogus=1", "--verbosity=1", f"--workdir={tmp_path / 'w'}")
    assert verbose.returncode == 2 and "Traceback" in verbose.stderr

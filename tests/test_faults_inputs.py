"""Bad inputs to `python -m emollm_jax.main` are refused in one line naming the key or flag, before anything
is written: no config.json, no generated mini-EmoBench, no tokenizer."""

from pathlib import Path

import pytest

from tests.faults_cli import error_lines, main_cmd, make_small_data, run


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    return make_small_data(tmp_path_factory.mktemp("data"))


def _refused(proc, workdir: Path, *named: str) -> str:
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = error_lines(proc.stderr)
    assert len(lines) == 1, proc.stderr[-3000:]
    for text in named:
        assert text in lines[0], lines[0]
    written = sorted(p.name for p in workdir.iterdir()) if workdir.exists() else []
    assert written == [], written  # neither config.json nor data/ nor tokenizer/ nor a lock
    return lines[0]


def test_missing_data_root_is_named_before_anything_is_written(tmp_path):
    work = tmp_path / "work"
    proc = run(main_cmd(work, None, f"--config.data.root={tmp_path / 'nope'}"))
    _refused(proc, work, f"config.data.root={tmp_path / 'nope'}", "no such directory")


def test_missing_init_hf_is_named_before_mini_emobench_is_generated(tmp_path):
    work = tmp_path / "work"
    proc = run(main_cmd(work, None, f"--config.init.hf={tmp_path / 'llava'}"))
    _refused(proc, work, f"config.init.hf={tmp_path / 'llava'}", "no such directory")


def test_missing_tokenizer_and_init_from_are_named(tmp_path, small_data):
    work = tmp_path / "work"
    data = (small_data[0], tmp_path / "tok")
    _refused(run(main_cmd(work, data)), work, f"config.data.tokenizer={tmp_path / 'tok'}")
    proc = run(main_cmd(work, small_data, f"--init_from={tmp_path / 'ckpt'}", mode="eval"))
    _refused(proc, work, f"--init_from={tmp_path / 'ckpt'}")


def test_empty_question_is_refused_naming_the_flag(tmp_path, small_data):
    work = tmp_path / "work"
    for question in ("", "   \n"):
        proc = run(main_cmd(work, small_data, f"--question={question}", mode="predict"))
        _refused(proc, work, "--question", "empty")
    proc = run(main_cmd(work, small_data, "--question=Why?", f"--image={tmp_path / 'face.png'}",
                        mode="predict"))
    _refused(proc, work, f"--image {tmp_path / 'face.png'}: no such file")


def test_config_errors_stay_one_line(tmp_path):
    work = tmp_path / "work"
    _refused(run(main_cmd(work, None, "--config.train.no_such_key=1")), work, "config.train.no_such_key")
    proc = run(main_cmd(work, None, "--config.train.max_to_keep=0"))
    line = _refused(proc, work, "config.train.max_to_keep")
    assert "positive" in line


def test_prepare_data_names_the_path_it_reads(tmp_path):
    """From Python too: a data root the tiny tokenizer would be trained on is named by its key."""
    from emollm_jax import experiment
    from emollm_jax.configuration import ConfigError, load_config
    from tests.faults_cli import CONFIG

    config = load_config(CONFIG)
    config.data.root = str(tmp_path / "nope")
    with pytest.raises(ConfigError, match=r"^config\.data\.root=.*nope: no such directory$"):
        experiment.prepare_data(config, tmp_path / "work")
    config.data.root, config.init.hf = "", str(tmp_path / "llava")
    with pytest.raises(ConfigError, match=r"^config\.init\.hf=.*llava: no such directory$"):
        experiment.prepare_data(config, tmp_path / "work")
    assert not (tmp_path / "work").exists()

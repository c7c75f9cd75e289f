"""Data from the config, through `python -m emollm_jax.main`: `config.data.sources.<split>` names the records
(ArrayRecord shards, a JSON list whose records carry no task, a TFDS builder directory) that training and
evaluation read in place; stage mixtures with task weights; the console a person reads."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
EMOTION = ("emo_c", "emo_o", "intent", "hate", "humor", "sarcasm")


def main(workdir: Path, *args: str, timeout: int = 1500) -> subprocess.CompletedProcess:
    env = dict(os.environ, JAX_PLATFORMS="cpu", TOKENIZERS_PARALLELISM="false",
               XLA_FLAGS="--xla_force_host_platform_device_count=1")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, "-m", "emollm_jax.main", "--config", str(REPO / "configs" / "emobench.py"),
           f"--workdir={workdir}", *args]
    return subprocess.run(cmd, cwd=workdir.parent, env=env, capture_output=True, text=True, timeout=timeout)


def records(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


@pytest.fixture
def bench(tmp_path):
    from data_pipeline import mini_emobench

    root = tmp_path / "emobench"
    mini_emobench.generate(root, seed=0, sizes={t: (3, 2) for t in mini_emobench.DEFAULT_SIZES})
    return root


@pytest.mark.slow
def test_training_and_evaluation_read_the_configured_sources(bench, tmp_path):
    """Train: ArrayRecord shards (step 2 of the README) at weight 3 and a LLaVA-style JSON list without
    tasks (default task vqa, its own media root) at weight 1; test: a TFDS builder directory. No data root,
    no copy of the records anywhere in the workdir."""
    import tensorflow_datasets as tfds

    from data_pipeline import tfds_emobench

    shards = tmp_path / "shards" / "train"
    cmd = [sys.executable, "-m", "data_pipeline.convert_arrayrecord", str(bench / "train.jsonl"),
           "--data-root", str(bench), "--out", str(shards), "--num-shards", "2"]
    convert = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert convert.returncode == 0, convert.stderr
    llava = [{k: v for k, v in r.items() if k not in ("task", "label", "options", "rationale")}
             | {"id": f"llava-{i}", "model": ""}
             for i, r in enumerate(records(bench / "train.jsonl")) if r["task"] == "vqa"]
    (tmp_path / "llava.json").write_text(json.dumps(llava))
    builder = tfds_emobench.EmoBench(data_dir=str(tmp_path / "tfds"))
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(bench)),
                                 file_format="array_record")
    tfds_dir = Path(builder.data_dir)
    assert (tfds_dir / "dataset_info.json").is_file()

    train = (f"({{'path': '{shards}-*.array_record', 'weight': 3.0}}, {{'path': '{tmp_path / 'llava.json'}', "
             f"'task': 'vqa', 'weight': 1.0, 'root': '{bench}'}})")
    workdir = tmp_path / "work"
    proc = main(workdir, "--mode=all", f"--config.data.sources.train={train}",
                f"--config.data.sources.test=('{tfds_dir}',)", "--config.stages.objective.steps=2",
                "--config.stages.emotional.steps=2", "--config.eval.batch_size=8")
    assert proc.returncode == 0, proc.stderr[-4000:]
    # shards: 3 caption + 3 vqa at a 3/4 share; the JSON list: 3 vqa at 1/4
    assert re.search(rf"stage objective: 9 records from {re.escape(str(shards))}-\*\.array_record, "
                     rf"{re.escape(str(tmp_path / 'llava.json'))}; samples: caption 37\.5%, vqa 62\.5%",
                     proc.stderr), proc.stderr[-4000:]
    assert "stage emotional: 18 records" in proc.stderr
    assert not (workdir / "data").exists() and not (workdir / "mixtures").exists()

    results = json.loads((workdir / "eval" / "results.json").read_text())
    assert results["control"] is None and list(results["splits"]) == ["test"]
    assert all(r["n"] == 2 for r in results["splits"]["test"]["tasks"].values())
    got = [json.loads(x)["id"] for x in (workdir / "eval" / "predictions.jsonl").read_text().splitlines()]
    assert sorted(got) == sorted(r["id"] for r in records(bench / "test.jsonl"))
    # the tokenizer learnt from the configured records: the JSON list's words are in it
    vocab = json.loads((workdir / "tokenizer" / "tokenizer.json").read_text())["model"]["vocab"]
    assert all(w in vocab for w in ("what", "shape", "square"))


@pytest.mark.slow
def test_stage_mixture_weights_and_a_console_a_person_can_read(bench, tmp_path):
    """Stage 2 replays caption and vqa at twice an emotional task's share; the console shows bars, one line
    per stage and per checkpoint, and the warning naming a skipped record; orbax's INFO lines go to
    run.log, and `--verbosity=1` brings them back."""
    rows = records(bench / "train.jsonl")
    rows.append(dict(rows[0], id="bad-label", label="not-an-option"))
    (bench / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    workdir = tmp_path / "work"
    tasks = str(EMOTION + ("caption", "vqa"))
    args = ["--mode=train", f"--config.data.root={bench}", "--config.stages.objective.steps=2",
            "--config.stages.emotional.steps=3", f"--config.stages.emotional.tasks={tasks}",
            "--config.stages.emotional.task_weights=(1, 1, 1, 1, 1, 1, 2, 2)",
            "--config.train.checkpoint_every=2", "--config.data.max_errors=1"]
    proc = main(workdir, *args)
    assert proc.returncode == 0, proc.stderr[-4000:]
    console = proc.stderr
    assert "stage emotional: 24 records from" in console
    shares = ", ".join(f"{t} 10.0%" for t in EMOTION) + ", caption 20.0%, vqa 20.0%"
    assert f"samples: {shares}" in console
    skipped = f"{bench / 'train.jsonl'}:{len(rows)}: label:"
    assert f"WARNING data_pipeline.pipeline: skipped invalid record: {skipped}" in console
    saved = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    lines = re.findall(r"checkpoint step (\d+) -> ", console)
    assert lines and len(lines) == len(set(lines)) and max(map(int, lines)) == 5 and saved[-1] == 5
    for noise in ("checkpoint_manager", "[process=0]", "orbax", "compiled in", "MFU peak"):
        assert noise not in console, noise
    assert not re.search(r"^[IW]\d{4} ", console, re.M)  # no absl-formatted lines
    log = (workdir / "run.log").read_text()
    assert "checkpoint_manager" in log and "compiled in" in log and "checkpoint step 5 -> " in log

    again = main(workdir, *args, "--verbosity=1")  # finished: restores the last checkpoint, trains nothing
    assert again.returncode == 0, again.stderr[-4000:]
    assert "orbax" in again.stderr or "checkpoint_manager" in again.stderr

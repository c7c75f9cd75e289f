"""The default job end to end: `python -m emollm_jax.main --config configs/emobench.py`, shrunk by overrides.

Runs the real entry point in a subprocess (fresh interpreter, one CPU device, absl flags as a user gives them)
on a small mini-EmoBench, both stages and the evaluation, and checks what it leaves in the workdir; only what
holds on a few-minute run is asserted there. The last test runs the shipped job unshrunk and asserts the
EmoBench mean the README states.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
EMOBENCH = ("emo_c", "emo_o", "intent", "hate", "humor", "sarcasm")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
OVERRIDES = (
    "--config.data.mini_train_per_task=48",
    "--config.data.mini_test_per_task=6",
    "--config.stages.objective.steps=4",
    "--config.stages.emotional.steps=30",
    "--config.train.log_every=2",
    "--config.eval.batch_size=16",
)


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """(workdir, completed process) of one reduced default run."""
    workdir = tmp_path_factory.mktemp("default_job") / "workdir"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one device, as a user's shell has
    env.update(JAX_PLATFORMS="cpu", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(
        [sys.executable, "-m", "emollm_jax.main", "--config", str(REPO / "configs" / "emobench.py"),
         f"--workdir={workdir}", *OVERRIDES],
        cwd=workdir.parent, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"default job failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}"
    return workdir, proc


@pytest.mark.slow
def test_default_job_leaves_checkpoint_metrics_plots_and_report(job):
    workdir, proc = job
    steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert steps and steps[-1] == 4 + 30, steps  # the final step of the last stage is always kept
    assert (workdir / "checkpoints" / str(steps[-1]) / "params").is_dir()

    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert {r["stage"] for r in records} == {"objective", "emotional"}
    assert all(r["loss"] > 0 and r["tokens_per_s"] > 0 for r in records)
    for stage in ("objective", "emotional"):
        assert (workdir / f"loss_{stage}.png").read_bytes()[:8] == PNG_MAGIC

    results = json.loads((workdir / "eval" / "results.json").read_text())
    assert results["splits"]["test"]["emobench_tasks"] == list(EMOBENCH)
    for task in EMOBENCH:
        scores = results["splits"]["test"]["tasks"][task]
        assert scores["n"] == (12 if task in ("emo_c", "sarcasm") else 6)  # 6 per task, 6 voices in two
        assert results["accuracy"][task] == pytest.approx(scores["correct"] / scores["n"])
    assert 0.0 <= results["emobench_mean"] <= 1.0
    assert results["control"]["split"] == "test_blank"
    assert results["audio_control"]["split"] == "test_silent"  # the job reads sound: voices and their control
    assert {k: v["n"] for k, v in results["splits"]["test"]["tasks"]["emo_c"]["by_media"].items()} == {
        "image": 6, "audio": 6}
    report = (workdir / "eval" / "report.md").read_text()
    assert "EmoBench mean" in report and all(f"| {t} |" in report for t in EMOBENCH)
    assert "| sarcasm | audio | 6 |" in report and "| sarcasm | audio | 6 |" in proc.stdout
    assert "EmoBench mean accuracy" in proc.stderr
    assert "| emo_c |" in proc.stdout and "EmoBench mean" in proc.stdout  # the table is printed


@pytest.mark.slow
def test_default_job_learns(job):
    """Thirty steps already cut the answer-token loss well below its start (random init: ~log V)."""
    workdir, _ = job
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    emotional = [r for r in map(json.loads, lines) if r["stage"] == "emotional"]
    first, last = emotional[0]["loss"], sum(r["loss"] for r in emotional[-3:]) / 3
    assert last < 0.75 * first, (first, last)  # measured: 5.45 -> 3.16


@pytest.mark.slow
def test_the_shipped_default_job_reaches_the_mean_the_readme_states(tmp_path):
    """The README's first command exactly (nothing shrunk): its stage 2 reads the six EmoBench tasks only, in
    their natural proportions (voices included), and the EmoBench mean reaches the 0.90 the README states."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(JAX_PLATFORMS="cpu", TOKENIZERS_PARALLELISM="false")
    workdir = tmp_path / "workdir"
    cmd = [sys.executable, "-m", "emollm_jax.main", "--config", str(REPO / "configs" / "emobench.py"),
           f"--workdir={workdir}"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=4 * 3600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    train = [json.loads(line) for line in (workdir / "data" / "train.jsonl").read_text().splitlines()]
    counts = {t: sum(r["task"] == t for r in train) for t in EMOBENCH}
    total = sum(counts.values())  # natural proportions: voice records make emo_c and sarcasm larger
    shares = ", ".join(f"{t} {100 * n / total:.1f}%" for t, n in counts.items())
    assert f"stage emotional: {total} records from {workdir / 'data' / 'train.jsonl'}; samples: {shares}\n" \
        in proc.stderr
    results = json.loads((workdir / "eval" / "results.json").read_text())
    assert results["splits"]["test"]["emobench_tasks"] == list(EMOBENCH)
    assert results["emobench_mean"] >= 0.90, results["accuracy"]

"""Exact resume: SIGKILL `python -m emollm_jax.main --mode=train` after a checkpoint, rerun the same command,
and the per-step losses after the resume point equal an uninterrupted run's (fp32, CPU)."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from emollm_jax.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[1]
STEPS = (3, 16)  # objective, emotional


def _cmd(workdir: Path, data: Path) -> list[str]:
    return [sys.executable, "-m", "emollm_jax.main", f"--workdir={workdir}", "--mode=train",
            f"--config={ROOT / 'configs' / 'emobench.py'}:tiny", f"--config.data.root={data}",
            f"--config.data.tokenizer={data.parent / 'tokenizer'}",
            f"--config.stages.objective.steps={STEPS[0]}", f"--config.stages.emotional.steps={STEPS[1]}",
            "--config.stages.objective.batch_size=8", "--config.stages.emotional.batch_size=8",
            "--config.data.max_len=160", "--config.train.log_every=1", "--config.train.checkpoint_every=4"]


def _env() -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _losses(workdir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(workdir / "metrics.jsonl")}


@pytest.mark.slow
def test_sigkill_and_resume_matches_uninterrupted(tmp_path):
    from data_pipeline import mini_emobench
    from data_pipeline.text import train_tiny_tokenizer
    from emollm_jax.experiment import _record_texts

    data = tmp_path / "data"
    sizes = {task: (12, 2) for task in mini_emobench.DEFAULT_SIZES}
    mini_emobench.generate(data, seed=0, sizes=sizes)
    train_tiny_tokenizer(_record_texts(str(data), "train"), tmp_path / "tokenizer")

    full = tmp_path / "full"
    subprocess.run(_cmd(full, data), env=_env(), check=True, capture_output=True, timeout=900)
    reference = _losses(full)
    assert sorted(reference) == list(range(1, sum(STEPS) + 1))

    killed = tmp_path / "killed"
    proc = subprocess.Popen(_cmd(killed, data), env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    target = 10  # past the checkpoint at global step 8, before the next at 12
    deadline = time.time() + 900
    while time.time() < deadline:
        done = _losses(killed) if (killed / "metrics.jsonl").exists() else {}
        if max(done, default=0) >= target:
            break
        assert proc.poll() is None, "training exited before it could be killed"
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    steps = sorted(int(p.name) for p in (killed / "checkpoints").iterdir() if p.name.isdigit())
    assert steps and max(steps) < sum(STEPS), steps
    resumed_from = max(steps)

    subprocess.run(_cmd(killed, data), env=_env(), check=True, capture_output=True, timeout=900)
    after = _losses(killed)
    for step in range(resumed_from + 1, sum(STEPS) + 1):
        assert after[step] == pytest.approx(reference[step], rel=1e-6, abs=1e-6), step

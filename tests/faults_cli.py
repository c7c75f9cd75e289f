"""Shared by the test_faults_* files: a small mini-EmoBench and its tokenizer, made once per session, and the
`python -m emollm_jax.main` commands that train a shrunken tiny model on them in a subprocess."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from tests.cli_setup import pod_env

ROOT = Path(__file__).resolve().parents[1]
CONFIG = f"{ROOT / 'configs' / 'emobench.py'}:tiny"
SMALL = [  # the tiny variant, shrunk further: these tests are about state on disk, not about learning
    "--config.model.text.hidden_size=32", "--config.model.text.intermediate_size=64",
    "--config.model.text.num_layers=1", "--config.model.text.num_heads=2",
    "--config.model.text.num_kv_heads=1",
    "--config.model.vision.hidden_size=32", "--config.model.vision.intermediate_size=64",
    "--config.model.vision.num_heads=2", "--config.data.max_len=160", "--config.train.log_every=1",
    "--config.stages.objective.batch_size=8", "--config.stages.emotional.batch_size=8",
    "--config.eval.batch_size=8", "--config.eval.max_new_tokens=4",
]


def make_small_data(tmp: Path) -> tuple[Path, Path]:
    """(data root, tokenizer dir) under `tmp`: mini-EmoBench with 12 train / 2 test records per task."""
    from data_pipeline import mini_emobench
    from data_pipeline.text import train_tiny_tokenizer
    from emollm_jax.experiment import _record_texts

    sizes = {task: (12, 2) for task in mini_emobench.DEFAULT_SIZES}
    mini_emobench.generate(tmp / "data", seed=0, sizes=sizes)
    train_tiny_tokenizer(_record_texts(str(tmp / "data"), "train"), tmp / "tokenizer")
    return tmp / "data", tmp / "tokenizer"


def main_cmd(workdir: Path, data: tuple[Path, Path] | None, *extra: str, mode: str = "train",
             steps: tuple[int, int] = (2, 3)) -> list[str]:
    """`python -m emollm_jax.main` on the small model; `data` None leaves data.root/tokenizer unset."""
    cmd = [sys.executable, "-m", "emollm_jax.main", f"--config={CONFIG}", f"--workdir={workdir}",
           f"--mode={mode}", *SMALL, f"--config.stages.objective.steps={steps[0]}",
           f"--config.stages.emotional.steps={steps[1]}"]
    if data is not None:
        cmd += [f"--config.data.root={data[0]}", f"--config.data.tokenizer={data[1]}"]
    return cmd + list(extra)


def env(devices: int = 1) -> dict[str, str]:
    return pod_env(devices)


def run(cmd: list[str], timeout: float = 600, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=timeout, **kwargs)


def losses(workdir: Path) -> dict[int, float]:
    path = workdir / "metrics.jsonl"
    if not path.exists():
        return {}
    return {r["step"]: r["loss"] for r in map(json.loads, path.read_text().splitlines()) if r}


def steps_on_disk(workdir: Path) -> list[int]:
    ckpt = workdir / "checkpoints"
    return sorted(int(p.name) for p in ckpt.iterdir() if p.name.isdigit()) if ckpt.exists() else []


def wait_for(condition: Callable[[], bool], proc: subprocess.Popen, what: str, timeout: float = 600) -> None:
    """Polls `condition` while `proc` runs; fails if `proc` exits first or time runs out."""
    deadline = time.time() + timeout
    while not condition():
        assert proc.poll() is None, f"the run exited ({proc.returncode}) before {what}"
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error: ")]

"""Shared by the tests that go through the command line: run `python -m <module>` as a user's shell does (a
fresh interpreter, one CPU device, this checkout on the path), and a small mini-EmoBench to run it on."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIG = str(REPO / "configs" / "emobench.py")
# A tiny run: one short stage, small batches, one eval record per task, short answers.
FAST = (
    "--config.stage_order=('emotional',)",
    "--config.stages.emotional.steps=2",
    "--config.stages.emotional.batch_size=8",
    "--config.stages.emotional.warmup_ratio=0.0",
    "--config.train.log_every=1",
    "--config.eval.batch_size=8",
    "--config.eval.max_new_tokens=3",
    "--config.eval.max_examples=8",
    "--config.eval.control_split=none",  # no such split: the blank-image control is not evaluated
)


def env() -> dict[str, str]:
    out = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one device, as a user's shell has
    out.update(JAX_PLATFORMS="cpu", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return out


# The test session's compilation cache (tests/conftest.py), the only JAX_* settings a pod's processes keep.
_CACHE_VARS = ("JAX_COMPILATION_CACHE_", "JAX_PERSISTENT_CACHE_")


def pod_env(devices: int, **extra: str) -> dict[str, str]:
    """A process of a simulated pod: `devices` CPU devices and none of the JAX_ / SLURM_ / XLA_ settings of
    this shell (the coordinator comes from flags), but the session's compilation cache."""
    out = {k: v for k, v in os.environ.items()
           if k.startswith(_CACHE_VARS) or not k.startswith(("JAX_", "SLURM_", "XLA_"))}
    out.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu",
               TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""), **extra)
    return out


def run(module: str, *args: str, cwd: Path, timeout: int = 900,
        check: bool = True) -> subprocess.CompletedProcess:
    """`python -m module args...`; with `check`, a non-zero exit fails the test showing stderr's tail."""
    proc = subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=cwd, env=env(),
                          capture_output=True, text=True, timeout=timeout)
    if check:
        assert proc.returncode == 0, f"{module} {' '.join(map(str, args))} failed (rc {proc.returncode}):\n" \
                                     f"{proc.stderr[-5000:]}"
    return proc


def main(workdir: Path, *args: str, **kw) -> subprocess.CompletedProcess:
    """`python -m emollm_jax.main --config configs/emobench.py --workdir W args...` in W's parent."""
    return run("emollm_jax.main", "--config", CONFIG, f"--workdir={workdir}", *args, cwd=workdir.parent, **kw)


def make_data(root: Path, train_per_task: int = 4, test_per_task: int = 1) -> Path:
    """mini-EmoBench with a few records per task and video files (PyAV) for emo_o."""
    from data_pipeline import mini_emobench

    sizes = {task: (train_per_task, test_per_task) for task in mini_emobench.DEFAULT_SIZES}
    mini_emobench.generate(root, seed=0, sizes=sizes, video_files=True)
    return root

"""Packing through the entry point: `python -m emollm_jax.main --config.data.packing=True` trains the tiny
variant on packed rows, and a run resumed from a mid-stage checkpoint (its data state: the stream just before
the record carried over to the next batch) makes the same per-step losses as the uninterrupted run."""

import json
import shutil

import pytest
from cli_setup import main

from emollm_jax.metrics import read_metrics

ARGS = ("--mode=train", "--config.data.packing=True", "--config.data.mini_train_per_task=8",
        "--config.data.mini_test_per_task=1", "--config.stage_order=('emotional',)",
        "--config.stages.emotional.steps=6", "--config.stages.emotional.batch_size=4",
        "--config.train.log_every=1", "--config.train.checkpoint_every=3", "--config.train.max_to_keep=5")


def _losses(workdir):
    return {r["step"]: r["loss"] for r in read_metrics(workdir / "metrics.jsonl")}


@pytest.mark.slow
def test_main_trains_packed_rows_and_resumes_exactly(tmp_path):
    full = tmp_path / "full"
    main(full, *ARGS)
    reference = _losses(full)
    assert sorted(reference) == list(range(1, 7))
    log = (full / "run.log").read_text()
    per_row = float(log.split("packed ~")[1].split()[0])
    assert per_row > 1.2, per_row  # rows hold several records
    assert "batch (4, 160) compiled" in log  # one shape: rows of max_len

    resumed = tmp_path / "resumed"
    shutil.copytree(full, resumed)
    for step in (resumed / "checkpoints").iterdir():
        if step.name.isdigit() and int(step.name) > 3:
            shutil.rmtree(step)
    lines = (resumed / "metrics.jsonl").read_text().splitlines()
    (resumed / "metrics.jsonl").write_text("".join(f"{x}\n" for x in lines if json.loads(x)["step"] <= 3))
    main(resumed, *ARGS)
    assert "resumed from checkpoint 3 (stage emotional, step 3/6)" in (resumed / "run.log").read_text()
    after = _losses(resumed)
    for step in (4, 5, 6):
        assert after[step] == pytest.approx(reference[step], rel=1e-6, abs=1e-6), step

"""Pods: evaluation split over processes and gathered; each process's own data-iterator state (error-budget
count included) saved and restored. The end-to-end tests run `python -m emollm_jax.main` as 2 processes x 4
CPU devices (jax.distributed + gloo), as tests/test_multihost_train.py does."""

import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.cli_setup import pod_env

REPO = Path(__file__).resolve().parents[1]
SMALL_MODEL = [
    "--config.model.text.hidden_size=32", "--config.model.text.intermediate_size=64",
    "--config.model.text.num_layers=1", "--config.model.text.num_heads=2",
    "--config.model.text.num_kv_heads=1",
    "--config.model.vision.hidden_size=32", "--config.model.vision.intermediate_size=64",
    "--config.model.vision.num_heads=2",
]


def test_the_data_item_holds_every_process_state(tmp_path):
    """One process: the item is {"process_count": 1, "processes": [state]} and restores to the state; a
    checkpoint holding a single bare state and no checksum record (as once written) still restores it."""
    import jax.numpy as jnp

    from emollm_jax.checkpoint import Checkpointer

    params, opt = {"w": jnp.ones((2,))}, {"m": jnp.zeros((2,))}
    state = {"pipeline": {"next_index": 7}, "errors": {"skipped": 2, "by_field": {"label": 2}}}
    with Checkpointer(tmp_path / "ckpt") as ckpt:
        assert ckpt.save(3, params=params, opt_state=opt, meta={}, data_state=state, force=True)
    item = json.loads((tmp_path / "ckpt" / "3" / "data" / "metadata").read_text())
    assert item == {"process_count": 1, "processes": [state]}
    with Checkpointer(tmp_path / "ckpt") as ckpt:
        assert ckpt.restore(3, abstract_params=params, abstract_opt_state=opt)[3] == state
    (tmp_path / "ckpt" / "3" / "data" / "metadata").write_text(json.dumps(state["pipeline"]))
    shutil.rmtree(tmp_path / "ckpt" / "3" / "integrity")  # such checkpoints also predate checksum records
    with Checkpointer(tmp_path / "ckpt") as ckpt:
        assert ckpt.restore(3, abstract_params=params, abstract_opt_state=opt)[3] == state["pipeline"]


# ------------------------------------------------------------------------------------------ end to end


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _env(devices: int) -> dict:
    return pod_env(devices)


def _main(workdir: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "emollm_jax.main", "--config", str(REPO / "configs" / "emobench.py"),
            f"--workdir={workdir}", *SMALL_MODEL, *args]


def _run(tmp_path: Path, name: str, workdir: Path, args: list[str], processes: int) -> None:
    """`main` with `args` as `processes` processes over 8 CPU devices in all; fails with the log's tail."""
    port = _free_port()
    logs, procs = [], []
    for i in range(processes):
        extra = ([f"--coordinator_address=localhost:{port}", f"--num_processes={processes}",
                  f"--process_id={i}"] if processes > 1 else [])
        logs.append(open(tmp_path / f"{name}.p{i}.log", "w"))
        procs.append(subprocess.Popen(_main(workdir, *args, *extra), env=_env(8 // processes), cwd=tmp_path,
                                      stdout=logs[-1], stderr=subprocess.STDOUT))
    try:
        for p in procs:
            p.wait(timeout=900)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        for f in logs:
            f.close()
    for i, p in enumerate(procs):
        assert p.returncode == 0, (tmp_path / f"{name}.p{i}.log").read_text()[-4000:]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """mini-EmoBench (3 train / 3 test records per task, + blank control) and its tiny tokenizer."""
    from data_pipeline import mini_emobench
    from data_pipeline.text import train_tiny_tokenizer
    from emollm_jax.experiment import _record_texts

    tmp = tmp_path_factory.mktemp("pods")
    root = tmp / "data"
    mini_emobench.generate(root, seed=0, sizes={t: (3, 3) for t in mini_emobench.DEFAULT_SIZES})
    train_tiny_tokenizer(_record_texts(str(root), "train"), tmp / "tokenizer")
    return root, tmp / "tokenizer"


@pytest.mark.slow
def test_evaluation_on_two_processes_gives_the_results_of_one(data, tmp_path):
    """`--mode=eval` of one checkpoint: 2 processes (each generating for half the records, answers gathered)
    write the results.json and predictions.jsonl that 1 process writes."""
    import jax
    from flax import nnx

    from emollm_jax import experiment
    from emollm_jax.checkpoint import Checkpointer
    from emollm_jax.configuration import load_config

    root, tok = data
    args = [f"--config.data.root={root}", f"--config.data.tokenizer={tok}", "--config.eval.batch_size=16",
            "--mode=eval"]
    overrides = [a[len("--config."):] for a in SMALL_MODEL + args[:2]]
    config = load_config(REPO / "configs" / "emobench.py", overrides)
    tokenizer = experiment.load_tokenizer(experiment.prepare_data(config, tmp_path / "unused"))
    cfg = experiment.model_config(config, vocab_size=tokenizer.vocab_size,
                                  image_token_id=tokenizer.image_token_id)
    params = nnx.state(experiment.new_model(cfg, 3), nnx.Param)
    one, two = tmp_path / "one", tmp_path / "two"
    with Checkpointer(one / "checkpoints") as ckpt:
        ckpt.save(1, params=params, opt_state={"count": jax.numpy.zeros(())}, meta={}, force=True)
    shutil.copytree(one / "checkpoints", two / "checkpoints")

    _run(tmp_path, "one", one, args, processes=1)
    _run(tmp_path, "two", two, args, processes=2)
    results = [json.loads((w / "eval" / "results.json").read_text()) for w in (one, two)]
    for r in results:
        r.pop("checkpoint")
    assert results[0] == results[1]
    assert results[0]["splits"]["test"]["n"] == 24 and results[0]["control"]["split"] == "test_blank"
    predictions = [(w / "eval" / "predictions.jsonl").read_text() for w in (one, two)]
    assert predictions[0] == predictions[1] and len(predictions[0].splitlines()) == 48
    # each process generated for its half of each split, and only for it
    for i in range(2):
        log = (two / ("run.log" if i == 0 else f"run.process_{i}.log")).read_text()
        assert f"eval test: 24 records, 12 of them on process {i} of 2" in log
        assert f"eval test_blank: 24 records, 12 of them on process {i} of 2" in log
    assert "eval test: 24 records, 24 of them on process 0 of 1" in (one / "run.log").read_text()


@pytest.mark.slow
def test_each_process_resumes_from_its_own_data_state(data, tmp_path):
    """Lazy validation skips invalid records where each process meets them, so the processes' iterators
    drift apart. A run resumed from a mid-stage checkpoint restores each process's own state (and
    error count) and continues with the losses of the uninterrupted run."""
    from emollm_jax.metrics import read_metrics

    root, tok = data
    rows = [json.loads(x) for x in (root / "train.jsonl").read_text().splitlines()]
    seen: set[str] = set()
    for r in rows:  # one invalid record per emotional task: an unknown field
        if r["task"] not in ("caption", "vqa") and r["task"] not in seen:
            seen.add(r["task"])
            r["note"] = "not a record field"
    bad_root = tmp_path / "data"
    shutil.copytree(root, bad_root)
    (bad_root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    workdir = tmp_path / "run"
    args = [f"--config.data.root={bad_root}", f"--config.data.tokenizer={tok}", "--mode=train",
            "--config.data.validate=lazy", "--config.data.max_errors=1000",
            "--config.stages.objective.steps=2", "--config.stages.emotional.steps=4",
            "--config.train.checkpoint_every=4", "--config.train.max_to_keep=9", "--config.train.log_every=1",
            "--config.mesh.data=1", "--config.mesh.fsdp=8"]
    _run(tmp_path, "full", workdir, args, processes=2)
    reference = {r["step"]: r["loss"] for r in read_metrics(workdir / "metrics.jsonl")}
    assert sorted(reference) == list(range(1, 7))

    item = json.loads((workdir / "checkpoints" / "4" / "data" / "metadata").read_text())
    assert item["process_count"] == 2
    states = item["processes"]
    assert states[0] != states[1]  # the processes met different numbers of invalid records
    assert {s["errors"]["skipped"] for s in states} != {0} and all("pipeline" in s for s in states)

    for step in (p for p in (workdir / "checkpoints").iterdir() if p.name.isdigit() and int(p.name) > 4):
        shutil.rmtree(step)
    _run(tmp_path, "resumed", workdir, args, processes=2)
    resumed = {r["step"]: r["loss"] for r in read_metrics(workdir / "metrics.jsonl")}
    np.testing.assert_allclose([resumed[s] for s in (5, 6)], [reference[s] for s in (5, 6)], rtol=1e-6)
    assert "resumed from checkpoint 4" in (tmp_path / "resumed.p0.log").read_text()

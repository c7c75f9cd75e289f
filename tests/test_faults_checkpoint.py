"""Checkpoint integrity through `python -m emollm_jax.main`: changed or truncated bytes are detected, reported
in one line naming the step and file, and the newest good step is used instead; evaluation never runs on
damaged weights; the non-finite stop leaves only checkpoints whose weights gave a finite loss."""

import json
import shutil

import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from emollm_jax import checkpoint as ckpt
from tests.faults_cli import error_lines, losses, main_cmd, make_small_data, run, steps_on_disk

TRAIN = ("--config.train.checkpoint_every=2", "--config.train.max_to_keep=3")


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    return make_small_data(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, small_data):
    """A finished small run: steps 2 + 3, checkpoints kept at steps 2, 4 and 5."""
    work = tmp_path_factory.mktemp("trained") / "work"
    proc = run(main_cmd(work, small_data, *TRAIN))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert steps_on_disk(work) == [2, 4, 5]
    return work


def _copy(trained, tmp_path):
    work = tmp_path / "work"
    shutil.copytree(trained, work)
    return work


def _data_file(step_dir, item="params"):
    """The largest array data file of an item (orbax OCDBT layout)."""
    return max((p for p in (step_dir / item).rglob("d/*") if p.is_file()), key=lambda p: p.stat().st_size)


def _overwrite_bytes(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2: len(data) // 2 + 16] = b"\x7f" * 16
    path.write_bytes(bytes(data))


@pytest.mark.slow
def test_eval_skips_a_checkpoint_whose_bytes_changed(trained, tmp_path, small_data):
    work = _copy(trained, tmp_path)
    _overwrite_bytes(_data_file(work / "checkpoints" / "5"))
    proc = run(main_cmd(work, small_data, *TRAIN, mode="eval"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    damaged = [line for line in proc.stderr.splitlines() if "checkpoint step 5 is damaged" in line]
    assert len(damaged) == 1 and str(work / "checkpoints" / "5" / "params") in damaged[0], proc.stderr[-3000:]
    assert "does not match its checksum" in damaged[0]
    results = json.loads((work / "eval" / "results.json").read_text())
    assert results["checkpoint"].endswith("step 4")


@pytest.mark.slow
def test_eval_on_damaged_checkpoints_fails_naming_step_and_file(trained, tmp_path, small_data):
    work = _copy(trained, tmp_path)
    for step in (2, 4, 5):
        _overwrite_bytes(_data_file(work / "checkpoints" / str(step)))
    proc = run(main_cmd(work, small_data, *TRAIN, mode="eval"))
    assert proc.returncode == 1, proc.stderr[-3000:]
    (line,) = error_lines(proc.stderr)
    assert "checkpoint step 2 is damaged" in line and str(work / "checkpoints" / "2" / "params") in line
    assert not (work / "eval" / "results.json").exists()


@pytest.mark.slow
def test_truncated_latest_step_is_set_aside_and_training_resumes_from_the_previous(trained, tmp_path,
                                                                                    small_data):
    work = _copy(trained, tmp_path)
    first = losses(work)
    f = _data_file(work / "checkpoints" / "5", "opt_state")
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    proc = run(main_cmd(work, small_data, *TRAIN))  # the same command
    assert proc.returncode == 0, proc.stderr[-3000:]
    damaged = [line for line in proc.stderr.splitlines() if "checkpoint step 5 is damaged" in line]
    assert len(damaged) == 1, proc.stderr[-3000:]
    assert str(work / "checkpoints" / "5" / "opt_state") in damaged[0] and "moved to" in damaged[0]
    assert "resumed from checkpoint 4" in proc.stderr
    assert (work / "checkpoints" / "5.damaged").is_dir() and steps_on_disk(work) == [2, 4, 5]
    records = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
    step5 = [r["loss"] for r in records if r["step"] == 5]
    assert len(step5) == 2 and step5[1] == pytest.approx(first[5], rel=1e-6, abs=1e-6)  # retrained exactly


@pytest.mark.slow
def test_non_finite_stop_keeps_only_checkpoints_with_usable_weights(tmp_path, small_data):
    """lr=1e12 in stage 2: its first update leaves weights of ~1e12 (finite), saved at global step 3; the
    loss computed from them at step 4 is NaN. That checkpoint is moved aside; stage 1's end (step 2) stays."""
    work = tmp_path / "work"
    proc = run(main_cmd(work, small_data, "--config.train.checkpoint_every=1",
                        "--config.stages.emotional.lr=1e12", "--config.stages.emotional.warmup_ratio=0"))
    assert proc.returncode == 1, proc.stderr[-3000:]
    (line,) = error_lines(proc.stderr)
    assert "global step 4" in line and "loss=nan" in line and "last good checkpoint (step 2)" in line
    assert steps_on_disk(work) == [2] and (work / "checkpoints" / "3.nonfinite").is_dir()  # max_to_keep 2
    for step in steps_on_disk(work):
        with ocp.StandardCheckpointer() as c:
            params = c.restore(work / "checkpoints" / str(step) / "params")
        for x in jax.tree.leaves(params):
            assert np.all(np.isfinite(x)) and np.max(np.abs(x)) < 1e3, step


# ------------------------------------------------------------------------- the Checkpointer, from Python


def _state(scale=1.0):
    w = np.random.RandomState(0).randn(256, 8).astype(np.float32)  # random: stored uncompressed
    params = {"w": jax.numpy.asarray(w * scale), "b": jax.numpy.zeros((8,))}
    tx = optax.adam(1e-3)
    return params, tx.init(params), tx


def _restore(c, step=None):
    params, opt, tx = _state()
    return c.restore(step, abstract_params=params, abstract_opt_state=opt)


def test_max_to_keep_below_one_is_refused(tmp_path):
    with pytest.raises(ValueError, match="max_to_keep=0: must be >= 1"):
        ckpt.Checkpointer(tmp_path, max_to_keep=0)
    assert not any(tmp_path.iterdir())


def test_non_finite_arrays_are_never_saved(tmp_path):
    params, opt, _ = _state()
    bad = dict(params, w=params["w"].at[3, 1].set(jax.numpy.nan))
    with ckpt.Checkpointer(tmp_path) as c:
        with pytest.raises(ckpt.NonFiniteCheckpointError, match="step 1 not saved.*'w'"):
            c.save(1, params=bad, opt_state=opt, meta={})
        assert c.all_steps() == []
    with pytest.raises(ckpt.NonFiniteCheckpointError):
        ckpt.save_params(tmp_path / "p", bad)
    assert not (tmp_path / "p").exists()


def test_restore_verifies_and_falls_back(tmp_path, caplog):
    params, opt, _ = _state()
    with ckpt.Checkpointer(tmp_path / "c") as c:
        for step in (1, 2):
            c.save(step, params=jax.tree.map(lambda x, s=step: x * s, params), opt_state=opt,
                   meta={"s": step}, data_state={"i": step})
    _overwrite_bytes(tmp_path / "c" / "2" / "meta" / "metadata")
    with ckpt.Checkpointer(tmp_path / "c") as c:
        with pytest.raises(ckpt.CheckpointDamaged, match=r"checkpoint step 2 is damaged: .*2/meta"):
            _restore(c, 2)
        p, _, meta, data = _restore(c)
        assert meta["s"] == 1 and data == {"i": 1}
        np.testing.assert_array_equal(p["w"], params["w"])
        assert c.all_steps() == [1]
    assert (tmp_path / "c" / "2.damaged").is_dir()
    assert any("checkpoint step 2 is damaged" in r.getMessage() for r in caplog.records)


def test_params_only_checkpoint_is_verified(tmp_path):
    params, _, _ = _state(0.5)
    ckpt.save_params(tmp_path / "p", params)
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), params)
    np.testing.assert_array_equal(ckpt.restore_params(tmp_path / "p", target)["w"], params["w"])
    with pytest.raises(FileExistsError, match="overwrite=True"):
        ckpt.save_params(tmp_path / "p", params)
    _overwrite_bytes(_data_file(tmp_path, "p"))
    with pytest.raises(ckpt.CheckpointDamaged, match="array 'w' does not match its checksum"):
        ckpt.restore_params(tmp_path / "p", target)

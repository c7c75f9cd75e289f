"""Preemption: SIGTERM to `python -m emollm_jax.main --mode=train` saves a checkpoint of the step in flight
(on every process, the same step), exits with status 75, and the same command resumes exactly: the per-step
losses after the resume point equal an uninterrupted run's."""

import signal
import socket
import subprocess

import pytest

from tests.faults_cli import env, losses, main_cmd, make_small_data, run, steps_on_disk, wait_for

STEPS = (3, 12)
EXTRA = ("--config.train.checkpoint_every=100",)  # regular saves: only the first step and stage ends
REGULAR = {1, STEPS[0], sum(STEPS)}


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    return make_small_data(tmp_path_factory.mktemp("data"))


@pytest.mark.slow
def test_sigterm_saves_the_step_in_flight_and_the_same_command_resumes_exactly(tmp_path, small_data):
    ref = tmp_path / "ref"
    assert run(main_cmd(ref, small_data, *EXTRA, steps=STEPS)).returncode == 0
    reference = losses(ref)
    assert sorted(reference) == list(range(1, sum(STEPS) + 1))

    work = tmp_path / "work"
    with open(tmp_path / "log", "w") as log:  # a file, not a pipe: nobody reads while it trains
        proc = subprocess.Popen(main_cmd(work, small_data, *EXTRA, steps=STEPS), env=env(),
                                stdout=subprocess.DEVNULL, stderr=log)
        wait_for(lambda: max(losses(work), default=0) >= 6, proc, "step 6")
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=600)
    stderr = (tmp_path / "log").read_text()
    assert proc.returncode == 75, stderr[-3000:]
    saved = max(steps_on_disk(work))
    assert saved == max(losses(work)) and saved not in REGULAR  # the step in flight, not a regular save
    assert f"preempted: checkpoint of step {saved} saved" in stderr

    again = run(main_cmd(work, small_data, *EXTRA, steps=STEPS))  # the same command
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resumed from checkpoint {saved}" in again.stderr
    after = losses(work)
    for step in range(saved + 1, sum(STEPS) + 1):
        assert after[step] == pytest.approx(reference[step], rel=1e-6, abs=1e-6), step


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _two_processes(work, small_data, log_dir):
    port = _free_port()
    logs = [open(log_dir / f"p{i}.log", "w") for i in range(2)]
    procs = [subprocess.Popen(main_cmd(work, small_data, *EXTRA, f"--coordinator_address=localhost:{port}",
                                       "--num_processes=2", f"--process_id={i}", steps=STEPS),
                              env=env(4), stdout=logs[i], stderr=subprocess.STDOUT) for i in range(2)]
    return procs, logs


def _finish(procs, logs, log_dir):
    try:
        for p in procs:
            p.wait(timeout=600)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        for f in logs:
            f.close()
    return [p.returncode for p in procs], [(log_dir / f"p{i}.log").read_text() for i in range(2)]


@pytest.mark.slow
def test_sigterm_to_one_of_two_processes_saves_the_same_step_on_both(tmp_path, small_data):
    """JAX's preemption service spreads the notice: both processes stop after the same step, each having
    written its shards of that step. Resumed, the run continues like a one-process run on 8 devices
    (rtol 2e-5: the two differ only in reduction order, as in tests/test_multihost_train.py)."""
    ref = tmp_path / "ref"
    proc = subprocess.run(main_cmd(ref, small_data, *EXTRA, steps=STEPS), env=env(8), capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    reference = losses(ref)

    work = tmp_path / "work"
    procs, logs = _two_processes(work, small_data, tmp_path)
    wait_for(lambda: max(losses(work), default=0) >= 5, procs[0], "step 5")
    procs[1].send_signal(signal.SIGTERM)  # process 1 only
    codes, out = _finish(procs, logs, tmp_path)
    assert codes == [75, 75], out[0][-3000:] + out[1][-3000:]
    saved = max(steps_on_disk(work))
    assert saved not in REGULAR and all(f"preempted: checkpoint of step {saved} saved" in o for o in out)
    for item in ("params", "opt_state"):
        shards = {p.name for p in (work / "checkpoints" / str(saved) / item).glob("ocdbt.process_*")}
        assert shards == {"ocdbt.process_0", "ocdbt.process_1"}, item

    procs, logs = _two_processes(work, small_data, tmp_path)
    codes, out = _finish(procs, logs, tmp_path)
    assert codes == [0, 0], out[0][-3000:] + out[1][-3000:]
    after = losses(work)
    for step in range(saved + 1, sum(STEPS) + 1):
        assert after[step] == pytest.approx(reference[step], rel=2e-5), step

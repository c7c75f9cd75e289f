"""The workdir lock: a second run on a workdir in use is refused at once naming the holder; a stale lock (its
process killed, or another host's heartbeat gone) is taken over, by exactly one of several starters."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from emollm_jax import workdir as wd
from tests.faults_cli import ROOT, env, error_lines, losses, main_cmd, make_small_data, run, wait_for


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    return make_small_data(tmp_path_factory.mktemp("data"))


@pytest.mark.slow
def test_second_run_is_refused_and_a_killed_runs_lock_is_taken_over(tmp_path, small_data):
    work = tmp_path / "work"
    first = subprocess.Popen(main_cmd(work, small_data, "--config.seed=0", steps=(2, 5000)), env=env(),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: max(losses(work), default=0) >= 3, first, "the first run trains")
        config = (work / "config.json").read_text()
        holder = json.loads((work / "run.lock").read_text())
        assert holder["pid"] == first.pid and holder["mode"] == "train"

        t0 = time.time()
        second = run(main_cmd(work, small_data, "--config.seed=1", "--config.stages.emotional.lr=1e-3"))
        assert second.returncode == 1, second.stderr[-3000:]
        (line,) = error_lines(second.stderr)
        assert f"pid {first.pid} on host {socket.gethostname()}" in line and "in use" in line
        assert time.time() - t0 < 120  # refused before any training (startup only)
        assert first.poll() is None  # the first run goes on, untouched
        assert (work / "config.json").read_text() == config
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()

    assert json.loads((work / "run.lock").read_text())["pid"] == first.pid  # left behind by the kill
    third = run(main_cmd(work, small_data, "--question=How does she feel?", mode="predict", steps=(2, 5000)))
    assert third.returncode == 0, third.stderr[-3000:]
    assert f"took over the stale lock of pid {first.pid}" in third.stderr
    assert f"process {first.pid} is not running" in third.stderr
    assert not (work / "run.lock").exists()  # released at exit


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_live_holder_on_this_host_is_respected(tmp_path):
    with wd.acquire(tmp_path, "train") as lock:
        assert json.loads((tmp_path / "run.lock").read_text())["nonce"] == lock.holder.nonce
        with pytest.raises(wd.WorkdirBusy, match=f"pid {os.getpid()} on host {socket.gethostname()}"):
            wd.acquire(tmp_path, "eval")
    assert not (tmp_path / "run.lock").exists()


def test_dead_or_reused_pid_is_stale(tmp_path, caplog):
    dead = _dead_pid()
    (tmp_path / "run.lock").write_text(json.dumps(dict(host=socket.gethostname(), pid=dead, started="1",
                                                       mode="train", since="t", nonce="n1")))
    wd.acquire(tmp_path, "train").release()
    assert f"process {dead} is not running" in caplog.text
    # A live pid whose start time differs from the recorded one is another process that reused the pid.
    (tmp_path / "run.lock").write_text(json.dumps(dict(host=socket.gethostname(), pid=os.getppid(),
                                                       started="1", mode="train", since="t", nonce="n2")))
    wd.acquire(tmp_path, "train").release()


def test_other_host_is_judged_by_its_heartbeat(tmp_path):
    lock = tmp_path / "run.lock"
    lock.write_text(json.dumps(dict(host="elsewhere", pid=1, started="", mode="train", since="t", nonce="n")))
    with pytest.raises(wd.WorkdirBusy, match="pid 1 on host elsewhere"):
        wd.acquire(tmp_path, "train")
    old = time.time() - wd.STALE_AFTER_S - 60
    os.utime(lock, (old, old))
    held = wd.acquire(tmp_path, "train")
    assert json.loads(lock.read_text())["host"] == socket.gethostname()
    held.release()


def test_heartbeat_keeps_the_lock_fresh(tmp_path, monkeypatch):
    monkeypatch.setattr(wd, "HEARTBEAT_S", 0.05)
    with wd.acquire(tmp_path, "train"):
        old = time.time() - 1000
        os.utime(tmp_path / "run.lock", (old, old))
        time.sleep(0.5)
        assert time.time() - (tmp_path / "run.lock").stat().st_mtime < 10


_STARTER = """
import sys, time
from emollm_jax import workdir as wd
while time.time() < float(sys.argv[2]):
    time.sleep(0.001)
try:
    lock = wd.acquire(sys.argv[1], "train")
except wd.WorkdirBusy:
    print("busy")
else:
    print("won")
    time.sleep(3)
    lock.release()
"""


def test_one_of_many_simultaneous_starters_takes_over_a_stale_lock(tmp_path):
    (tmp_path / "run.lock").write_text(json.dumps(dict(host=socket.gethostname(), pid=_dead_pid(), started="",
                                                       mode="train", since="t", nonce="stale")))
    start = time.time() + 8  # all started and importing, then all at once
    e = dict(env(), PYTHONPATH=str(ROOT))
    procs = [subprocess.Popen([sys.executable, "-c", _STARTER, str(tmp_path), str(start)], env=e,
                              stdout=subprocess.PIPE, text=True) for _ in range(8)]
    outcomes = sorted(p.communicate(timeout=120)[0].strip() for p in procs)
    assert outcomes == ["busy"] * 7 + ["won"], outcomes
    assert not list(tmp_path.glob("*takeover*")) and not (tmp_path / "run.lock").exists()

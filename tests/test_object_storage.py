"""A workdir, data and initial weights on an object store (`gs://...` on a pod), through the same code a
bucket goes through: `etils.epath` over fsspec, orbax for checkpoints, an if-not-exists create for the lock.
The store here is `tests.objstore` (`emotest://bucket/...`); every test also checks that nothing was written
to a local path made from the URL."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from data_pipeline import storage
from tests import objstore
from tests.cli_setup import env as cli_env
from tests.faults_cli import CONFIG, SMALL

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def store(tmp_path, monkeypatch):
    """The store's backing directory; the working directory is an empty one that must stay empty."""
    root = tmp_path / "store"
    root.mkdir()
    monkeypatch.setenv(objstore.ROOT_ENV, str(root))
    monkeypatch.setattr(storage, "_COPIES", {})
    objstore.install()
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    yield root
    assert not list(cwd.iterdir()), "something was written to a local path"


def test_atomic_write_exclusive_create_and_copies(store):
    url = "emotest://bucket/run"
    assert storage.is_remote(url) and not storage.is_remote("/tmp/x") and not storage.is_remote("file:///x")
    assert storage.absolute(url + "/") == url
    storage.write_text(url + "/config.json", "{}\n")
    assert (store / "bucket/run/config.json").read_text() == "{}\n"
    storage.atomic_write(url + "/a.png", lambda f: f.write(b"\x89PNG"), binary=True)
    assert storage.read_bytes(url + "/a.png") == b"\x89PNG" and storage.size(url + "/a.png") == 4
    assert storage.create_exclusive(url + "/run.lock", b"first")
    assert not storage.create_exclusive(url + "/run.lock", b"second")
    assert (store / "bucket/run/run.lock").read_bytes() == b"first"
    def half(f):
        f.write("half")
        raise RuntimeError("render failed")

    with pytest.raises(RuntimeError):  # a failed render uploads nothing
        storage.atomic_write(url + "/b.txt", half)
    assert not (store / "bucket/run/b.txt").exists()
    local = storage.local_copy(url)
    assert Path(local, "config.json").read_text() == "{}\n" and storage.local_copy(url) == local


def test_mirror_keeps_what_the_store_holds_and_uploads_whole(store):
    url = "emotest://bucket/run/metrics.jsonl"
    storage.write_text(url, '{"step": 1}\n')
    mirror = storage.Mirror(url, interval=3600)
    with open(mirror.local, "a") as f:
        f.write('{"step": 2}\n')
    mirror.push()  # the first push uploads
    assert storage.path(url).read_text() == '{"step": 1}\n{"step": 2}\n'
    with open(mirror.local, "a") as f:
        f.write('{"step": 3}\n')
    mirror.push()  # within the interval: not yet
    assert storage.path(url).read_text() == '{"step": 1}\n{"step": 2}\n'
    mirror.close()
    assert storage.path(url).read_text() == '{"step": 1}\n{"step": 2}\n{"step": 3}\n'
    assert not os.path.exists(mirror.local)


def test_lock_on_the_store_refuses_a_second_run_and_judges_another_host_by_its_heartbeat(store):
    from emollm_jax import workdir as wd

    url = "emotest://bucket/run"
    backing = store / "bucket/run/run.lock"
    with wd.acquire(url, "train") as lock:
        assert json.loads(backing.read_text())["nonce"] == lock.holder.nonce
        with pytest.raises(wd.WorkdirBusy, match=f"pid {os.getpid()} on host {socket.gethostname()}"):
            wd.acquire(url, "eval")
    assert not backing.exists()

    other = dict(host="elsewhere", pid=1, started="", mode="train", since="t", nonce="n")
    backing.write_text(json.dumps(other))
    with pytest.raises(wd.WorkdirBusy, match="pid 1 on host elsewhere"):
        wd.acquire(url, "train")
    old = time.time() - wd.STALE_AFTER_S - 60
    os.utime(backing, (old, old))
    held = wd.acquire(url, "train")
    assert json.loads(backing.read_text())["host"] == socket.gethostname()
    held.release()
    assert not list(backing.parent.glob("*takeover*")) and not backing.exists()


def test_heartbeat_on_the_store_never_overwrites_a_lock_another_run_took(store, monkeypatch):
    from emollm_jax import workdir as wd

    monkeypatch.setattr(wd, "HEARTBEAT_S", 0.05)
    backing = store / "bucket/run/run.lock"
    lock = wd.acquire("emotest://bucket/run", "train")
    try:
        old = time.time() - 1000
        os.utime(backing, (old, old))
        time.sleep(0.6)
        assert time.time() - backing.stat().st_mtime < 10  # the heartbeat uploaded it again
        other = json.dumps(dict(host="elsewhere", pid=1, started="", mode="train", since="t", nonce="other"))
        backing.write_text(other)
        os.utime(backing, (old, old))
        time.sleep(0.6)
        assert backing.read_text() == other and backing.stat().st_mtime == pytest.approx(old)
    finally:
        lock.release()
    assert backing.read_text() == other  # release leaves another run's lock alone


_STARTER = """
import sys, time
from tests import objstore
objstore.install()
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


def test_one_of_many_simultaneous_starters_takes_the_lock_on_the_store(store):
    backing = store / "bucket/run/run.lock"
    backing.parent.mkdir(parents=True)
    backing.write_text(json.dumps(dict(host=socket.gethostname(), pid=_dead_pid(), started="", mode="train",
                                       since="t", nonce="stale")))
    start = time.time() + 8
    e = dict(cli_env(), **{objstore.ROOT_ENV: str(store)})
    procs = [subprocess.Popen([sys.executable, "-c", _STARTER, "emotest://bucket/run", str(start)], env=e,
                              cwd=os.getcwd(), stdout=subprocess.PIPE, text=True) for _ in range(6)]
    outcomes = sorted(p.communicate(timeout=120)[0].strip() for p in procs)
    assert outcomes == ["busy"] * 5 + ["won"], outcomes
    assert not list(backing.parent.glob("*takeover*")) and not backing.exists()


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_records_images_videos_and_sound_read_from_the_store(store, tmp_path):
    from data_pipeline import audio, mini_emobench
    from data_pipeline.media import load_media
    from data_pipeline.sources import JsonRecordSource

    local = tmp_path / "data"
    sizes = {task: (2, 1) for task in mini_emobench.DEFAULT_SIZES}
    mini_emobench.generate(local, seed=0, sizes=sizes, sound_sizes={"emo_c": (2, 1)}, video_files=True)
    url = "emotest://bucket/data"
    storage.copy_tree(local, url)
    here, there = JsonRecordSource(local / "train.jsonl"), JsonRecordSource(f"{url}/train.jsonl")
    assert len(there) == len(here) > 0
    kinds = set()
    for i in range(len(here)):
        record = here[i]["record"]
        assert there[i]["record"] == record
        frames = load_media(record, url, image_size=32, num_frames=2)
        np.testing.assert_array_equal(frames, load_media(record, local, image_size=32, num_frames=2))
        if record.get("audio"):
            np.testing.assert_array_equal(audio.record_sound(record, url), audio.record_sound(record, local))
            kinds.add("sound")
        kinds.update(k for k in ("image", "video") if record.get(k))
    assert kinds == {"image", "video", "sound"}, kinds
    bad = {"id": "x", "image": "../../elsewhere.png"}
    with pytest.raises(ValueError, match="outside the data root"):
        load_media(bad, url, image_size=32, num_frames=2)


def test_output_directory_on_the_store_is_uploaded_with_its_marker_last(store):
    from emollm_jax.outdir import MARKER, AtomicDir, OutputDirError

    url = "emotest://bucket/converted"
    with AtomicDir(url, writer="test") as tmp:
        (tmp / "weights.bin").write_bytes(b"w1")
    assert (store / "bucket/converted/weights.bin").read_bytes() == b"w1"
    assert (store / "bucket/converted" / MARKER).is_file()
    with pytest.raises(OutputDirError, match="not empty"):
        with AtomicDir(url, writer="test"):
            pass
    with AtomicDir(url, writer="test", overwrite=True) as tmp:
        (tmp / "other.bin").write_bytes(b"w2")
    assert sorted(p.name for p in (store / "bucket/converted").iterdir()) == sorted([MARKER, "other.bin"])
    (store / "bucket/converted" / MARKER).unlink()  # an interrupted upload: no marker
    with pytest.raises(OutputDirError, match="not written by emollm_jax"):
        with AtomicDir(url, writer="test", overwrite=True):
            pass


# ------------------------------------------------------------------------------------------ the command line

_RUN = [*SMALL, "--config.stage_order=('emotional',)", "--config.stages.emotional.steps=4",
        "--config.stages.emotional.warmup_ratio=0.0", "--config.train.checkpoint_every=2",
        "--config.train.max_to_keep=3", "--config.eval.max_examples=8",
        "--config.data.mini_train_per_task=4", "--config.data.mini_test_per_task=1",
        "--config.data.mini_video_files=True"]


def _main(store: Path, cwd: Path, tmpdir: Path, workdir: str, *args: str) -> subprocess.CompletedProcess:
    """`python -m emollm_jax.main` with the store registered (`python -m tests.objstore`), in an empty
    working directory, with its own TMPDIR."""
    e = dict(cli_env(), TMPDIR=str(tmpdir), **{objstore.ROOT_ENV: str(store)})
    cmd = [sys.executable, "-m", "tests.objstore", "emollm_jax.main", f"--config={CONFIG}",
           f"--workdir={workdir}", *_RUN, *args]
    proc = subprocess.run(cmd, cwd=cwd, env=e, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-5000:]
    assert not list(cwd.iterdir()), f"written to a local path: {list(cwd.iterdir())}"
    assert not [p for p in tmpdir.iterdir() if p.name.startswith("emollm_jax-")], list(tmpdir.iterdir())
    return proc


def _losses(store: Path) -> dict[int, float]:
    from emollm_jax.metrics import read_metrics

    return {r["step"]: r["loss"] for r in read_metrics(store / "bucket/run/metrics.jsonl")}


@pytest.mark.slow
def test_train_resume_and_eval_with_workdir_data_and_weights_on_the_store(tmp_path):
    store, cwd, tmpdir = tmp_path / "store", tmp_path / "cwd", tmp_path / "tmp"
    for d in (store, cwd, tmpdir):
        d.mkdir()
    run = store / "bucket/run"
    _main(store, cwd, tmpdir, "emotest://bucket/run", "--mode=train")
    first = _losses(store)
    assert sorted(first) == [1, 2, 3, 4]
    for name in ("config.json", "run.log", "metrics.jsonl", "data/card.json", "data/train.jsonl",
                 "tokenizer/tokenizer.json", "checkpoints/2/data", "checkpoints/4/params"):
        assert (run / name).exists(), name
    assert (run / "loss_emotional.png").read_bytes().startswith(b"\x89PNG")
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert any(p.suffix == ".mp4" for p in (run / "data").rglob("*")), "the data has video files"
    assert not (run / "run.lock").exists()

    shutil.rmtree(run / "checkpoints/4")  # as if the run had been killed after step 3
    log_before = (run / "run.log").read_text()
    _main(store, cwd, tmpdir, "emotest://bucket/run", "--mode=train")
    resumed = _losses(store)
    assert sorted(resumed) == [1, 2, 3, 4]  # steps 1-2 kept from the first run's lines, 3-4 appended
    for step in (3, 4):  # params, optimizer state and data-iterator state all came back from the store
        assert resumed[step] == pytest.approx(first[step], rel=1e-6, abs=1e-6), step
    assert (run / "run.log").read_text().startswith(log_before)
    assert (run / "checkpoints/4/params").is_dir()

    _main(store, cwd, tmpdir, "emotest://bucket/run", "--mode=eval")
    results = json.loads((run / "eval/results.json").read_text())
    assert results["checkpoint"].startswith("emotest://bucket/run/checkpoints")
    for name in ("report.md", "predictions.jsonl", "confusion_emo_c.png"):
        assert (run / "eval" / name).is_file(), name
    assert "EmoBench mean accuracy" in (run / "run.log").read_text()  # the log's last lines were uploaded

    # Another workdir evaluating the same weights from the store: data root, tokenizer and weights by URL.
    _main(store, cwd, tmpdir, "emotest://bucket/eval", "--mode=eval",
          "--init_from=emotest://bucket/run/checkpoints/4", "--config.data.root=emotest://bucket/run/data",
          "--config.data.tokenizer=emotest://bucket/run/tokenizer")
    other = json.loads((store / "bucket/eval/eval/results.json").read_text())
    assert other["splits"] == results["splits"]
    assert not (store / "bucket/eval/data").exists()  # the given data root was used, nothing generated

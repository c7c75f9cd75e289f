"""JsonRecordSource reads the file it indexed: replaced paths, reopened copies, closed fds, threads."""

import json
import os
import pickle
from concurrent.futures import ThreadPoolExecutor

import pytest

from data_pipeline import sources


def _write(path, prefix, n, pad):
    """`n` JSONL records `<prefix>-<i>`, line lengths varying with `pad` (offsets differ per file)."""
    records = [{"id": f"{prefix}-{i}", "task": "emo_c", "pad": "x" * ((i * pad) % 31)} for i in range(n)]
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    os.replace(tmp, path)  # as train.stage_records rewrites a stage mixture: a new file at the same path
    return records


def test_reads_the_indexed_file_after_the_path_is_replaced(tmp_path):
    path = tmp_path / "mix.jsonl"
    old = _write(path, "old", 50, 7)
    src = sources.JsonRecordSource(path, validate="none")
    _write(path, "new", 80, 3)  # replaced before the first read
    got = [src[i] for i in range(len(src))]
    assert [e["errors"] for e in got] == [[]] * len(old)
    assert [e["record"] for e in got] == old


def test_pickled_copy_refuses_a_changed_file_and_reopens_an_unchanged_one(tmp_path):
    path = tmp_path / "mix.jsonl"
    old = _write(path, "old", 20, 5)
    src = sources.JsonRecordSource(path, validate="none")
    same = pickle.loads(pickle.dumps(src))
    assert same[7]["record"] == old[7]
    _write(path, "new", 20, 5)
    stale = pickle.loads(pickle.dumps(src))
    with pytest.raises(RuntimeError, match=f"{path}: the file changed after it was indexed"):
        stale[0]
    assert src[3]["record"] == old[3]  # the original still holds the indexed file


def test_closed_source_never_reads_a_reused_descriptor(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    rec_a, _ = _write(a, "a", 10, 5), _write(b, "b", 10, 9)
    src = sources.JsonRecordSource(a, validate="none")
    fd = src._fileno()
    src.close()
    src.close()  # idempotent: the descriptor is released exactly once
    other = os.open(b, os.O_RDONLY)  # takes the lowest free number: the one `src` released
    try:
        assert other == fd
        assert src[4]["record"] == rec_a[4]  # reopened a.jsonl, not the reused number
    finally:
        os.close(other)


def test_concurrent_first_reads_open_one_descriptor(tmp_path):
    path = tmp_path / "mix.jsonl"
    recs = _write(path, "r", 400, 11)
    src = sources.JsonRecordSource(path, validate="none")
    src.close()
    before = len(os.listdir("/proc/self/fd"))
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda i: src[i]["record"], range(len(src))))
    assert got == recs
    assert len(os.listdir("/proc/self/fd")) == before + 1  # the threads shared one reopened file

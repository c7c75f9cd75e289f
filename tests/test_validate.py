"""`python -m data_pipeline.validate` as a user runs it: exit codes, problem lines, per-task table."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def run(*args):
    proc = subprocess.run([sys.executable, "-m", "data_pipeline.validate", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    return proc.returncode, proc.stdout


def rec(i, task="emo_c", image="images/a.png", label="joy", human="<image>\nEmotion? [joy, anger]"):
    r = {"id": f"r{i}", "task": task, "image": image, "label": label, "options": ["joy", "anger"],
         "conversations": [{"from": "human", "value": human}, {"from": "gpt", "value": label}]}
    return json.dumps(r)


def table_row(out, task):
    """(records, ok, bad) from the summary table's row for `task`."""
    for line in out.splitlines():
        parts = line.split()
        if parts and parts[0] == task and len(parts) == 4:
            return tuple(int(x) for x in parts[1:])
    raise AssertionError(f"no row for {task!r} in:\n{out}")


def make_root(tmp_path):
    (tmp_path / "images").mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "images" / "a.png")
    return tmp_path


def test_good_file_exits_zero(tmp_path):
    root = make_root(tmp_path)
    path = root / "good.jsonl"
    path.write_text("\n".join([rec(1), rec(2), rec(3, task="humor")]) + "\n")
    code, out = run(path)
    assert code == 0, out
    assert out.splitlines()[0].split() == ["task", "records", "ok", "bad"]
    assert table_row(out, "emo_c") == (2, 2, 0) and table_row(out, "humor") == (1, 1, 0)
    assert table_row(out, "total") == (3, 3, 0)


def test_bad_file_reports_every_problem_and_exits_one(tmp_path):
    root = make_root(tmp_path)
    path = root / "bad.jsonl"
    lines = [
        rec(1),
        rec(2, label="sad"),  # label not among options
        '{"id": "r3", "task": ',  # malformed JSON
        rec(4, image="images/missing.png"),
        rec(5, task="gossip", human="Emotion?"),  # unknown task + marker count
        rec(6, task="hate"),
    ]
    path.write_text("\n".join(lines) + "\n")
    code, out = run(path)
    assert code == 1
    problems = [line for line in out.splitlines() if line.startswith(f"{path}:")]
    assert f"{path}:2: label: 'sad' is not among the options ['joy', 'anger']" in problems
    assert any(p.startswith(f"{path}:3: json: malformed JSON") for p in problems)
    assert any(p.startswith(f"{path}:4: image: images/missing.png: file not found") for p in problems)
    assert any(p.startswith(f"{path}:5: task: unknown task 'gossip'") for p in problems)
    assert any(p.startswith(f"{path}:5: conversations: found 0 <image>") for p in problems)
    assert len(problems) == 5, out
    assert table_row(out, "emo_c") == (3, 1, 2)
    assert table_row(out, "gossip") == (1, 0, 1)
    assert table_row(out, "hate") == (1, 1, 0)
    assert table_row(out, "(unparsed)") == (1, 0, 1)
    assert table_row(out, "total") == (6, 2, 4)


def test_options_data_root_frames_and_text_length(tmp_path):
    root = make_root(tmp_path / "root")
    (tmp_path / "lists").mkdir()
    frames = root / "clip"
    frames.mkdir()
    for t in range(3):
        Image.fromarray(np.full((8, 8, 3), t, np.uint8)).save(frames / f"{t}.png")
    conv = [{"from": "human", "value": "<video>\nEmotion?"}, {"from": "gpt", "value": "joy"}]
    video = {"id": "v", "task": "emo_o", "video": "clip", "label": "joy", "conversations": conv}
    path = tmp_path / "lists" / "records.json"  # a JSON list: line = record number
    path.write_text(json.dumps([json.loads(rec(1)), video]))
    assert run(path)[0] == 1  # media resolve next to the file by default: not found there
    code, out = run(path, "--data-root", root, "--num-frames", "3")
    assert code == 0, out
    code, out = run(path, "--data-root", root, "--num-frames", "4")
    assert code == 1 and f"{path}:2: video: clip: has 3 frames, fewer than the 4 frames asked for" in out
    code, out = run(path, "--data-root", root, "--max-text-chars", "20")
    assert code == 1 and f"{path}:1: conversations: text is" in out and "truncated" in out
    code, out = run(tmp_path / "nope.jsonl")
    assert code == 1 and "nope.jsonl:0: file: not found" in out

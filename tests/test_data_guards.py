"""Media and text guards, each through the command a user types: `python -m data_pipeline.validate`,
`python -m data_pipeline.convert_arrayrecord` and `python -m emollm_jax.main`.

Media: every file (each frame of a frame directory included) must stay inside the data root after its
symlinks are followed; an image over the pixel limit is an error naming it; the validator decodes images
fully. Text: a line that is not UTF-8 is named by file and line and the rest of the file is still read;
duplicate ids are errors; the tiny tokenizer learns only from records training would accept; the training
error budget is `config.data.max_errors` and its messages name the user's file and line.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
PIXELS_OVER = 12000 * 12000


def run(module: str, *args, timeout: int = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, JAX_PLATFORMS="cpu", TOKENIZERS_PARALLELISM="false",
               XLA_FLAGS="--xla_force_host_platform_device_count=1")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def write(path: Path, records: list) -> None:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))


@pytest.fixture
def bench(tmp_path):
    """A small mini-EmoBench (2 train records per task) under tmp/root, and a file outside the root."""
    from data_pipeline import mini_emobench

    root = tmp_path / "root"
    mini_emobench.generate(root, seed=0, sizes={t: (2, 1) for t in mini_emobench.DEFAULT_SIZES})
    secret = tmp_path / "outside" / "secret.png"
    secret.parent.mkdir()
    Image.fromarray(np.full((64, 64, 3), 7, np.uint8)).save(secret)
    return root, secret


def _frame_symlink(root: Path, secret: Path) -> tuple[int, str]:
    """Replaces the first frame of the first frame-directory video with a symlink to `secret`; returns the
    record's line in train.jsonl and its video directory."""
    for line, rec in enumerate(lines(root / "train.jsonl"), start=1):
        video = rec.get("video")
        if isinstance(video, str) and (root / video).is_dir():
            first = sorted((root / video).iterdir())[0]
            first.unlink()
            first.symlink_to(secret)
            return line, video
    raise AssertionError("no frame-directory video in the bench")


def test_a_frame_linking_outside_the_root_is_refused_by_validator_and_converter(bench, tmp_path):
    root, secret = bench
    line, video = _frame_symlink(root, secret)
    proc = run("data_pipeline.validate", root / "train.jsonl", "--data-root", root)
    assert proc.returncode == 1, proc.stdout
    assert f"{root / 'train.jsonl'}:{line}: video: {video}: frame " in proc.stdout
    assert f"resolves to {secret}, outside the data root" in proc.stdout

    out = tmp_path / "shards" / "train"
    proc = run("data_pipeline.convert_arrayrecord", root / "train.jsonl", "--data-root", root, "--out", out)
    assert proc.returncode == 1
    assert f"{root / 'train.jsonl'}:{line}: media:" in proc.stderr and "outside the data root" in proc.stderr
    assert not out.parent.exists() or not list(out.parent.iterdir())  # nothing written, no secret copied


def test_an_image_over_the_pixel_limit_is_an_error_naming_it(bench):
    root, _ = bench
    records = lines(root / "train.jsonl")
    line = next(i for i, r in enumerate(records, start=1) if isinstance(r.get("image"), str))
    path = root / records[line - 1]["image"]
    Image.new("1", (12000, 12000)).save(path)  # a few KB on disk, 432 MB as RGB pixels
    assert path.stat().st_size < 1_000_000
    proc = run("data_pipeline.validate", root / "train.jsonl", "--data-root", root)
    assert proc.returncode == 1
    assert (f"{root / 'train.jsonl'}:{line}: image: {records[line - 1]['image']}: 12000x12000 = "
            f"{PIXELS_OVER} pixels, over the limit of {64 * 64 * 4096}") in proc.stdout
    # the limit is a flag: 64 x 64 images pass a 4096-pixel limit and fail a 4095-pixel one
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(path)
    assert run("data_pipeline.validate", root / "train.jsonl", "--max-image-pixels", 4096).returncode == 0
    proc = run("data_pipeline.validate", root / "train.jsonl", "--max-image-pixels", 4095)
    assert proc.returncode == 1 and "64x64 = 4096 pixels, over the limit of 4095" in proc.stdout


def test_the_validator_decodes_images_fully(bench):
    """A truncated JPEG opens (its header is whole) but does not decode: refused here, not in training."""
    root, _ = bench
    records = lines(root / "train.jsonl")
    k = next(i for i, r in enumerate(records) if isinstance(r.get("image"), str))
    jpeg = root / "images" / "truncated.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)).save(jpeg, quality=95)
    jpeg.write_bytes(jpeg.read_bytes()[: jpeg.stat().st_size // 2])
    with Image.open(jpeg) as im:
        im.verify()  # what a header check accepts
    records[k]["image"] = "images/truncated.jpg"
    write(root / "train.jsonl", records)
    proc = run("data_pipeline.validate", root / "train.jsonl")
    assert proc.returncode == 1
    assert f"{root / 'train.jsonl'}:{k + 1}: image: images/truncated.jpg: unreadable image" in proc.stdout


def test_non_utf8_lines_are_named_and_every_other_record_is_checked(bench):
    root, _ = bench
    raw = (root / "train.jsonl").read_bytes().splitlines(keepends=True)
    n = len(raw)
    raw[2] = raw[2].replace(b'"id": "', b'"id": "\xff', 1)
    (root / "train.jsonl").write_bytes(b"".join(raw))
    column = raw[2].index(b"\xff") + 1
    proc = run("data_pipeline.validate", root / "train.jsonl")
    assert proc.returncode == 1
    problems = [x for x in proc.stdout.splitlines() if x.startswith(str(root))]
    assert problems == [f"{root / 'train.jsonl'}:3: encoding: not UTF-8: byte 0xff at column {column}; "
                        "re-save the file as UTF-8"], proc.stdout
    total = [x.split() for x in proc.stdout.splitlines() if x.startswith("total")][0]
    assert total[1:] == [str(n), str(n - 1), "1"]  # every line counted: none skipped quietly


def test_duplicate_ids_are_an_error(bench):
    root, _ = bench
    records = lines(root / "train.jsonl")
    records.append(dict(records[0]))
    write(root / "train.jsonl", records)
    proc = run("data_pipeline.validate", root / "train.jsonl")
    assert proc.returncode == 1
    assert (f"{root / 'train.jsonl'}:{len(records)}: id: duplicate id {records[0]['id']!r}; first used at "
            f"{root / 'train.jsonl'}:1") in proc.stdout


# ----------------------------------------------------------------------------------------- training


def train(workdir: Path, root: Path, *extra: str, timeout: int = 900) -> subprocess.CompletedProcess:
    return run("emollm_jax.main", "--config", REPO / "configs" / "emobench.py", f"--workdir={workdir}",
               "--mode=train", f"--config.data.root={root}", "--config.stages.objective.steps=1",
               "--config.stages.emotional.steps=1", *extra, timeout=timeout)


def test_training_names_the_users_file_and_line_against_data_max_errors(bench, tmp_path):
    """Three bad lines, a budget of two: the run stops before any step, listing all three by file and line
    (the training file itself, not a copy), and no record was dropped quietly."""
    root, _ = bench
    path = root / "train.jsonl"
    raw = path.read_bytes().splitlines(keepends=True)
    raw[1] = raw[1].replace(b'"id": "', b'"id": "\xfe', 1)                  # line 2: not UTF-8
    raw.insert(3, b"{broken\n")                                                # line 4: not JSON
    dup = next(i for i, x in enumerate(raw) if i > 3 and json.loads(x)["task"] == "humor")
    raw.append(raw[dup])                                                       # last: a duplicate id
    path.write_bytes(b"".join(raw))
    dup_id = json.loads(raw[dup])["id"]
    proc = train(tmp_path / "w", root, "--config.stage_order=('emotional',)", "--config.data.max_errors=2")
    assert proc.returncode != 0
    assert "3 invalid records skipped (budget 2)" in proc.stderr, proc.stderr[-3000:]
    assert f"{path}:2: encoding: not UTF-8: byte 0xfe" in proc.stderr
    assert f"{path}:4: json: malformed JSON" in proc.stderr
    assert f"{path}:{len(raw)}: id: duplicate id {dup_id!r}; first used at {path}:{dup + 1}" in proc.stderr
    assert "UnicodeDecodeError" not in proc.stderr
    assert not (tmp_path / "w" / "mixtures").exists()
    assert not list((tmp_path / "w").glob("checkpoints/[0-9]*"))


def test_training_refuses_media_outside_the_root_and_over_the_pixel_limit(bench, tmp_path):
    root, secret = bench
    line, video = _frame_symlink(root, secret)
    records = lines(root / "train.jsonl")
    big = next(i for i, r in enumerate(records, start=1) if r["task"] == "emo_c")
    Image.new("1", (12000, 12000)).save(root / records[big - 1]["image"])
    proc = train(tmp_path / "w", root, "--config.stage_order=('emotional',)", "--config.data.max_errors=1")
    assert proc.returncode != 0
    path = root / "train.jsonl"
    assert "2 invalid records skipped (budget 1)" in proc.stderr, proc.stderr[-3000:]
    assert f"{path}:{line}: encode: " in proc.stderr
    assert f"resolves to {secret}, outside the data root" in proc.stderr
    assert f"{path}:{big}: encode: " in proc.stderr and f"12000x12000 = {PIXELS_OVER} pixels" in proc.stderr


def test_a_rejected_record_never_reaches_the_tokenizer(bench, tmp_path):
    """A 1 MB record of 150,000 distinct words: training rejects it (longer than any bucket), and the tiny
    tokenizer trained before it never learnt its words."""
    root, _ = bench
    records = lines(root / "train.jsonl")
    long = dict(records[0], id="emo_c-long")
    words = " ".join(f"w{i:06d}" for i in range(150_000))
    long["conversations"] = [dict(records[0]["conversations"][0], value="<image>\n" + words),
                             records[0]["conversations"][1]]
    write(root / "train.jsonl", [*records, long])
    assert (root / "train.jsonl").stat().st_size > 1_000_000
    proc = train(tmp_path / "w", root, "--config.stage_order=('emotional',)")
    assert proc.returncode != 0
    assert f"{root / 'train.jsonl'}:{len(records) + 1}: encode: " in proc.stderr, proc.stderr[-3000:]
    assert "tokens > the largest seq bucket" in proc.stderr
    vocab = json.loads((tmp_path / "w" / "tokenizer" / "tokenizer.json").read_text())["model"]["vocab"]
    assert len(vocab) < 1000 and "w000000" not in vocab and "w149999" not in vocab
    assert f"longer than 160 tokens ({root / 'train.jsonl'}:{len(records) + 1})" in proc.stderr

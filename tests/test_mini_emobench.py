"""mini-EmoBench generator: determinism, coverage, label rules, caption balance, blank control, validity."""

import collections
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_pipeline import mini_emobench as mb
from data_pipeline.media import load_video
from data_pipeline.records import TASKS
from data_pipeline.validate import validate_files

REPO = Path(__file__).resolve().parents[1]
SMALL = {t: (24, 12) for t in mb.DEFAULT_SIZES}
CAPTION_TASKS = ("hate", "humor", "sarcasm")
LABELLED = ("emo_c", "emo_o", "intent", *CAPTION_TASKS)


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    """The default-size dataset (what training uses)."""
    out = tmp_path_factory.mktemp("full")
    card = mb.generate(out, seed=0)
    return out, card


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    out = tmp_path_factory.mktemp("small")
    mb.generate(out, seed=3, sizes=SMALL, video_files=True)
    return out


def read(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def snapshot(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_gives_byte_identical_files(tmp_path):
    mb.generate(tmp_path / "a", seed=7, sizes=SMALL, video_files=True)
    mb.generate(tmp_path / "b", seed=7, sizes=SMALL, video_files=True)
    a, b = snapshot(tmp_path / "a"), snapshot(tmp_path / "b")
    assert a.keys() == b.keys() and any(k.endswith(".mp4") for k in a)
    assert [k for k in a if a[k] != b[k]] == []
    mb.generate(tmp_path / "c", seed=8, sizes=SMALL)
    assert (tmp_path / "c" / "train.jsonl").read_bytes() != a["train.jsonl"]


def test_regenerating_in_place_leaves_no_stale_media(tmp_path):
    mb.generate(tmp_path, seed=0, sizes={"emo_c": (10, 2)})
    mb.generate(tmp_path, seed=0, sizes={"emo_c": (4, 2)})
    assert len(list((tmp_path / "images").glob("emo_c-train-*.png"))) == 4


def test_every_task_with_the_requested_sizes(full):
    root, card = full
    for s_idx, split in enumerate(("train", "test")):
        counts = collections.Counter(r["task"] for r in read(root / f"{split}.jsonl"))
        assert set(counts) == set(TASKS)
        assert all(counts[t] == n[s_idx] for t, n in mb.DEFAULT_SIZES.items())
    ids = [r["id"] for s in ("train", "test") for r in read(root / f"{s}.jsonl")]
    assert len(ids) == len(set(ids))
    assert card["sizes"]["emo_c"] == {"train": 400, "test": 60}
    assert json.loads((root / "card.json").read_text())["rules"]["sarcasm"] == card["rules"]["sarcasm"]
    assert card["seconds"] < 30, card["seconds"]  # typically ~2 s


def test_labels_options_and_answers(full):
    root, _ = full
    for rec in read(root / "train.jsonl") + read(root / "test.jsonl"):
        answer = rec["conversations"][-1]["value"]
        assert rec["rationale"]
        if rec["task"] in LABELLED:
            assert rec["label"] == answer
        if "options" in rec:
            assert rec["label"] in rec["options"]
            if rec["task"] in ("emo_c", "intent"):  # listed in the question, EmoBench style
                assert "[" + ", ".join(rec["options"]) + "]" in rec["conversations"][0]["value"]
        if rec["task"] == "emo_o":
            assert "options" not in rec and rec["label"] in mb.EMOTIONS
    for task in LABELLED:
        counts = collections.Counter(r["label"] for r in read(root / "train.jsonl") if r["task"] == task)
        assert max(counts.values()) - min(counts.values()) <= 1, (task, counts)


def majority_accuracy(train, test, key) -> float:
    """Test accuracy of predicting each record's label as the train majority label of its `key(record)`,
    i.e. the best any model that sees only that feature can do."""
    by_key = collections.defaultdict(collections.Counter)
    for r in train:
        by_key[key(r)][r["label"]] += 1
    hits = [by_key[key(r)].most_common(1)[0][0] == r["label"] for r in test if key(r) in by_key]
    assert len(hits) == len(test), "a test value never seen in training"
    return float(np.mean(hits))


IMAGE_CUE = {  # the picture's half of each clash, as a binary feature
    "hate": lambda r: r["meta"]["face_colour"],
    "humor": lambda r: r["meta"]["image_scene"],
    "sarcasm": lambda r: r["meta"]["face_emotion"] == "joy",
}


def clash_split(root, task):
    return [[r for r in read(root / f"{s}.jsonl") if r["task"] == task] for s in ("train", "test")]


@pytest.mark.parametrize("task", CAPTION_TASKS)
def test_captions_alone_do_not_predict_the_label(full, task):
    train, test = clash_split(full[0], task)
    by_caption = collections.defaultdict(collections.Counter)
    for r in train:
        by_caption[r["meta"]["caption"]][r["label"]] += 1
    for caption, c in by_caption.items():
        assert 0.4 <= c["yes"] / (c["yes"] + c["no"]) <= 0.6, (caption, c)
    # A text-only model at its best: the majority label of the exact question text seen in training.
    text = lambda r: r["conversations"][0]["value"]  # noqa: E731
    seen = {text(r) for r in train}
    assert sum(text(r) in seen for r in test) > 30
    assert majority_accuracy(train, [r for r in test if text(r) in seen], text) <= 0.65


@pytest.mark.parametrize("task", CAPTION_TASKS)
def test_image_cue_alone_is_informative_but_not_enough(full, task):
    """The image carries marginal signal (so a model can start from it) but the caption is still needed."""
    train, test = clash_split(full[0], task)
    assert len({IMAGE_CUE[task](r) for r in train}) == 2
    assert 0.6 <= majority_accuracy(train, test, IMAGE_CUE[task]) <= 0.85
    assert 0.6 <= majority_accuracy(train, train, IMAGE_CUE[task]) <= 0.85


@pytest.mark.parametrize("task", CAPTION_TASKS)
def test_caption_and_image_together_determine_the_label(full, task):
    train, test = clash_split(full[0], task)
    labels = collections.defaultdict(set)
    for r in train + test:
        labels[(r["meta"]["caption"], IMAGE_CUE[task](r))].add(r["label"])
    assert all(len(v) == 1 for v in labels.values()), labels
    both = lambda r: (r["meta"]["caption"], IMAGE_CUE[task](r))  # noqa: E731
    assert majority_accuracy(train, test, both) == 1.0


def test_hate_face_colour_is_drawn(full):
    root, _ = full
    for r in read(root / "test.jsonl"):
        if r["task"] == "hate":
            pixel = np.asarray(Image.open(root / r["image"]))[34, 32]
            assert tuple(pixel) == mb.GROUP_COLOURS[r["meta"]["face_colour"]], r["id"]


def ink_features(root, recs):
    """Dark-stroke masks: the face parts (brows, eyes, mouth) are the only near-black pixels."""
    return np.stack([(np.asarray(Image.open(root / r["image"]).convert("L")) < 60).ravel() for r in recs])


def test_emotion_cues_are_visible_and_the_blank_control_removes_them(full):
    root, _ = full
    train = [r for r in read(root / "train.jsonl") if r["task"] == "emo_c"]
    test = [r for r in read(root / "test.jsonl") if r["task"] == "emo_c"]
    blank = [r for r in read(root / "test_blank.jsonl") if r["task"] == "emo_c"]
    x, y = ink_features(root, train).astype(np.float32), np.array([r["label"] for r in train])
    centroids = np.stack([x[y == e].mean(0) for e in mb.EMOTIONS])

    def accuracy(recs):
        f = ink_features(root, recs).astype(np.float32)
        pred = np.array(mb.EMOTIONS)[((f[:, None] - centroids[None]) ** 2).sum(-1).argmin(1)]
        return np.mean(pred == np.array([r["label"] for r in recs]))

    assert accuracy(test) >= 0.9  # a nearest-centroid classifier on stroke masks: cues are large and clear
    assert accuracy(blank) <= 1 / 6 + 0.05  # identical grey inputs: one class for all, i.e. chance


def test_blank_control_has_the_same_records_with_grey_media(full):
    root, _ = full
    test, blank = read(root / "test.jsonl"), read(root / "test_blank.jsonl")
    assert [r["id"] for r in blank] == [r["id"] for r in test]
    for a, b in zip(test, blank, strict=True):
        assert {k: v for k, v in a.items() if k not in ("image", "video")} == \
               {k: v for k, v in b.items() if k not in ("image", "video")}
        assert ("image" in a) == ("image" in b) and ("video" in a) == ("video" in b)
    assert {r.get("image") or r.get("video") for r in blank} == {"images/blank.png", "videos/blank"}
    grey = np.asarray(Image.open(root / "images" / "blank.png"))
    assert grey.shape == (64, 64, 3) and np.all(grey == 128)
    assert load_video(root / "videos" / "blank", 4).shape == (4, 64, 64, 3)


def test_videos_show_the_expression_after_a_neutral_frame(small):
    recs = [r for r in read(small / "train.jsonl") + read(small / "test.jsonl") if "video" in r]
    assert recs and all(r["task"] == "emo_o" and r["conversations"][0]["value"].startswith("<video>\n")
                        for r in recs)
    mp4 = [r for r in recs if r["video"].endswith(".mp4")]
    assert mp4 and len(mp4) < len(recs)
    for r in recs:
        frames = load_video(small / "videos" / r["id"], 4)
        assert frames.shape == (4, 64, 64, 3)
        ink = (frames.astype(int).sum(-1) < 180).reshape(4, -1).sum(1)
        assert not np.array_equal(frames[0], frames[1]) and ink[1] != ink[0]
    for r in mp4:  # the mp4 holds the frame directory's frames (lossless H.264 4:4:4; +-1 from YUV rounding)
        from_mp4 = load_video(small / r["video"], 4).astype(int)
        diff = np.abs(from_mp4 - load_video(small / "videos" / r["id"], 4))
        assert diff.max() <= 2, (r["id"], diff.max())


def test_validator_accepts_generated_files(small):
    paths = [small / f for f in ("train.jsonl", "test.jsonl", "test_blank.jsonl")]
    problems, table = validate_files(paths, num_frames=mb.NUM_FRAMES)
    assert problems == []
    assert set(table) == set(TASKS) and all(c["bad"] == 0 for c in table.values())


def test_cli(tmp_path):
    out = tmp_path / "cli"
    cmd = [sys.executable, "-m", "data_pipeline.mini_emobench", "--out", str(out), "--seed", "1",
           "--scale", "0.05", "--no-blank-control"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "150 train and 24 test records" in proc.stdout
    assert (out / "train.jsonl").exists() and not (out / "test_blank.jsonl").exists()
    with pytest.raises(ValueError, match="unknown tasks"):
        mb.generate(tmp_path / "x", sizes={"emotion": (1, 1)})

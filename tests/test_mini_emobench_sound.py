"""mini-EmoBench with sound: voice records whose prosody carries the emotion, voice sarcasm where the tone
clashes with the words, the silent-audio control, determinism, validity and the CLI."""

import collections
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from data_pipeline import mini_emobench as mb
from data_pipeline import mini_emobench_voice as voice
from data_pipeline.audio import load_audio, log_mel_spectrogram
from data_pipeline.validate import validate_files

REPO = Path(__file__).resolve().parents[1]
SMALL = {t: (6, 2) for t in mb.DEFAULT_SIZES}
SOUND = {"emo_c": (60, 30), "sarcasm": (80, 20)}  # 80: two whole cycles of the skewed sentences


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("sound")
    card = mb.generate(out, seed=0, sizes=SMALL, sound_sizes=SOUND)
    return out, card


def read(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def voices(root, split, task):
    return [r for r in read(root / f"{split}.jsonl") if r["task"] == task and "audio" in r]


def test_voice_records_have_their_sizes_files_and_markers(data):
    root, card = data
    assert card["sound_sizes"] == {"emo_c": {"train": 60, "test": 30}, "sarcasm": {"train": 80, "test": 20}}
    assert card["silent_control"] and "emo_c (voice)" in card["rules"]
    for split, idx in (("train", 0), ("test", 1)):
        for task, sizes in SOUND.items():
            recs = voices(root, split, task)
            assert len(recs) == sizes[idx]
            assert all(r["id"].startswith(f"{task}-voice-{split}-") for r in recs)
            assert all(r["conversations"][0]["value"].startswith("<audio>\n") for r in recs)
            assert "image" not in recs[0] and "video" not in recs[0]
        # the picture records are still there, as before
        assert sum(r["task"] == "emo_c" and "image" in r for r in read(root / f"{split}.jsonl")) == SMALL[
            "emo_c"][idx]
    wave = load_audio(root / voices(root, "test", "emo_c")[0]["audio"])
    assert wave.shape == (round(voice.CLIP_SECONDS * 16_000),) and np.abs(wave).max() > 0.01
    labels = collections.Counter(r["label"] for r in voices(root, "train", "emo_c"))
    assert set(labels) == set(mb.EMOTIONS) and max(labels.values()) - min(labels.values()) <= 1


def _features(root, recs):
    """Per mel bin, the mean and the spread over time of a 16-bin, 2 s log-mel: pitch, loudness, tempo."""
    rows = []
    for r in recs:
        mel = log_mel_spectrogram(load_audio(root / r["audio"]), 16, window_seconds=2.0)
        rows.append(np.concatenate([mel.mean(1), mel.std(1)]))
    return np.stack(rows)


def test_prosody_says_the_emotion_and_the_silent_control_removes_it(data):
    root, _ = data
    train = voices(root, "train", "emo_c")
    x, y = _features(root, train), np.array([r["label"] for r in train])
    centroids = np.stack([x[y == e].mean(0) for e in mb.EMOTIONS])

    def accuracy(recs):
        f = _features(root, recs)
        pred = np.array(mb.EMOTIONS)[((f[:, None] - centroids[None]) ** 2).sum(-1).argmin(1)]
        return np.mean(pred == np.array([r["label"] for r in recs]))

    assert accuracy(voices(root, "test", "emo_c")) >= 0.8  # nearest centroid on coarse summaries
    silent = voices(root, "test_silent", "emo_c")
    assert {r["audio"] for r in silent} == {mb.SILENT}
    assert accuracy(silent) <= 1 / 6 + 0.05  # one input for all: chance
    assert not load_audio(root / mb.SILENT).any()


def test_voice_sarcasm_needs_the_words_and_the_tone(data):
    root, _ = data
    train, test = voices(root, "train", "sarcasm"), voices(root, "test", "sarcasm")
    for r in train + test:
        positive_voice = r["meta"]["voice_emotion"] == "joy"
        assert (r["label"] == "yes") == (positive_voice != (r["meta"]["caption_tone"] == "positive"))
        assert f'"{r["meta"]["caption"]}"' in r["conversations"][0]["value"]
    by_caption = collections.defaultdict(collections.Counter)
    for r in train:
        by_caption[r["meta"]["caption"]][r["label"]] += 1
    assert all(c["yes"] == c["no"] for c in by_caption.values()), by_caption  # the words alone: chance
    tone = [r["meta"]["voice_emotion"] == "joy" for r in train]
    voice_alone = np.mean([t == (r["label"] == "no") for t, r in zip(tone, train, strict=True)])
    assert 0.75 <= voice_alone <= 0.85  # the 4:1 skew: the tone alone gives 80%
    assert {r["meta"]["voice_emotion"] for r in train} == {"joy", *mb.NEGATIVE_VOICES}


def test_controls_change_one_kind_of_input_each(data):
    root, _ = data
    test, blank, silent = (read(root / f"{s}.jsonl") for s in ("test", "test_blank", "test_silent"))
    assert [r["id"] for r in silent] == [r["id"] for r in test] == [r["id"] for r in blank]
    for a, b, c in zip(test, blank, silent, strict=True):
        assert {k: v for k, v in a.items() if k != "audio"} == {k: v for k, v in c.items() if k != "audio"}
        assert ("audio" in a) == ("audio" in c) and (c.get("audio") in (None, mb.SILENT))
        assert a.get("audio") == b.get("audio")  # the blank control keeps the voices


def test_same_seed_same_sound_files(tmp_path):
    sound = {"emo_c": (4, 2), "sarcasm": (5, 2)}
    for name in ("a", "b"):
        mb.generate(tmp_path / name, seed=5, sizes={"emo_c": (2, 1)}, sound_sizes=sound)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.wav"))
    assert len(files) == 4 + 5 + 2 + 2 + 1  # train, test and the silent clip
    assert all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files)
    mb.generate(tmp_path / "a", seed=5, sizes={"emo_c": (2, 1)})  # regenerated without sound: no stale voices
    assert not (tmp_path / "a" / "audio").exists() and not (tmp_path / "a" / "test_silent.jsonl").exists()
    with pytest.raises(ValueError, match="sound_sizes: unknown tasks"):
        mb.generate(tmp_path / "x", sound_sizes={"hate": (1, 1)})


def test_validator_accepts_the_files_with_sound(data):
    root, _ = data
    paths = [root / f for f in ("train.jsonl", "test.jsonl", "test_blank.jsonl", "test_silent.jsonl")]
    problems, table = validate_files(paths, num_frames=mb.NUM_FRAMES)
    assert problems == []
    assert table["emo_c"]["ok"] == (6 + 60) + 3 * (2 + 30)  # train; test and its two controls


def test_cli_with_sound(tmp_path):
    out = tmp_path / "cli"
    cmd = [sys.executable, "-m", "data_pipeline.mini_emobench", "--out", str(out), "--scale", "0.05",
           "--sound"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "180 train and 30 test records" in proc.stdout  # 150 + 2 x 15 voices; 24 + 2 x 3
    assert (out / "test_silent.jsonl").exists() and (out / mb.SILENT).exists()

"""Records with sound: the `audio` field (a file or "from_video") and the `<audio>` marker, checked by the
validator (one test per bad case, and through `python -m data_pipeline.validate`); the pipeline decodes and
featurises the sound in its workers, batches it with a mask and resumes exactly; audio-only, image + audio
and video + audio records all arrive, and a model without an audio tower refuses sound."""

import dataclasses
import json
import subprocess
import sys
import wave
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from data_pipeline import mini_emobench_voice as voice
from data_pipeline import pipeline
from data_pipeline.audio import AudioError, record_sound
from data_pipeline.records import ErrorBudgetExceeded, validate_record
from data_pipeline.text import train_tiny_tokenizer

REPO = Path(__file__).resolve().parents[1]
RATE = 16_000


def _wav(path: Path, samples: np.ndarray, rate: int = RATE) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(np.round(np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes())


def _mp4(path: Path, frames: int = 6, sound: np.ndarray | None = None) -> None:
    """A 64x64 video (frame t is grey level 20 t), with `sound` as an AAC track when given."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w", format="mp4") as c:
        v = c.add_stream("mpeg4", rate=4)
        v.width = v.height = 64
        v.pix_fmt = "yuv420p"
        a = None
        if sound is not None:
            a = c.add_stream("aac", rate=RATE, layout="mono")
        for t in range(frames):
            img = np.full((64, 64, 3), 20 * t, np.uint8)
            for p in v.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                c.mux(p)
        for p in v.encode():
            c.mux(p)
        if a is not None:
            pcm = np.round(sound * 32767).astype(np.int16)
            for start in range(0, len(pcm), 1024):
                frame = av.AudioFrame.from_ndarray(pcm[None, start:start + 1024], format="s16", layout="mono")
                frame.sample_rate = RATE
                for p in a.encode(frame):
                    c.mux(p)
            for p in a.encode():
                c.mux(p)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """A data root with good and bad sound files, an image, videos with and without a sound track."""
    root = tmp_path_factory.mktemp("audio_root")
    rng = np.random.default_rng(0)
    _wav(root / "audio" / "joy.wav", voice.synthesise("joy", rng))
    _wav(root / "audio" / "sad.wav", voice.synthesise("sadness", rng))
    _wav(root / "audio" / "long.wav", np.tile(voice.synthesise("anger", rng), 3))  # 6 s: three 2 s windows
    (root / "audio" / "empty.wav").write_bytes(b"")
    (root / "audio" / "corrupt.wav").write_bytes(b"RIFF\x10\x00\x00\x00WAVEjunk" + bytes(range(200)))
    _wav(root / "audio" / "no_samples.wav", np.zeros(0, np.float32))
    _wav(root / "audio" / "rate_4k.wav", np.zeros(4000, np.float32), rate=4000)
    Image.new("RGB", (64, 64), (200, 30, 30)).save(root / "face.png")
    _mp4(root / "videos" / "talk.mp4", sound=voice.synthesise("fear", rng, seconds=1.8))  # one 2 s window
    _mp4(root / "videos" / "silent_film.mp4")
    (root / "videos" / "frames").mkdir(parents=True)
    for t in range(4):
        Image.new("RGB", (64, 64), (t * 40, 0, 0)).save(root / "videos" / "frames" / f"{t:03d}.png")
    return root


def rec(rid="r1", *, audio="audio/joy.wav", question="<audio>\nHow does the speaker feel?", **media):
    out = {"id": rid, "task": "emo_o", "conversations": [{"from": "human", "value": question},
                                                         {"from": "gpt", "value": "joy"}], **media}
    if audio is not None:
        out["audio"] = audio
    return out


def problems(record, root):
    return [str(e) for e in validate_record(record, source="f.jsonl", line=7, data_root=root, num_frames=4)]


GOOD = {
    "audio only": rec(),
    "image + audio": rec(image="face.png", question="<image>\n<audio>\nHow does she feel?"),
    "video + its own sound": rec(video="videos/talk.mp4", audio="from_video",
                                 question="<video>\n<audio>\nHow does she feel?"),
    "video + another sound": rec(video="videos/silent_film.mp4", audio="audio/sad.wav",
                                 question="<video><audio>How does she feel?"),
}


@pytest.mark.parametrize("name", list(GOOD))
def test_good_records_with_sound_validate(root, name):
    assert problems(GOOD[name], root) == []


BAD = {  # name -> (record, the error it must give)
    "missing file": (rec(audio="audio/nope.wav"), "f.jsonl:7: audio: audio/nope.wav: file not found"),
    "empty file": (rec(audio="audio/empty.wav"), "f.jsonl:7: audio: audio/empty.wav: empty file (0 bytes)"),
    "corrupt file": (rec(audio="audio/corrupt.wav"),
                     "f.jsonl:7: audio: audio/corrupt.wav: cannot decode audio"),
    "no samples": (rec(audio="audio/no_samples.wav"),
                   "audio/no_samples.wav: the audio track holds no samples"),
    "unsupported rate": (rec(audio="audio/rate_4k.wav"), "sample rate 4000 Hz is not supported"),
    "not a sound file": (rec(audio="face.png"), "f.jsonl:7: audio: face.png: "),
    "outside the root": (rec(audio="../x.wav"), "f.jsonl:7: audio: path '../x.wav' resolves to"),
    "absolute path": (rec(audio="/tmp/x.wav"), "f.jsonl:7: audio: absolute path '/tmp/x.wav' refused"),
    "a list": (rec(audio=["audio/joy.wav", "audio/sad.wav"]),
               "audio: must be a path or 'from_video' (one sound"),
    "from_video, film without a track": (
        rec(video="videos/silent_film.mp4", audio="from_video", question="<video>\n<audio>\nQ?"),
        "f.jsonl:7: audio: videos/silent_film.mp4: no audio track (streams: video) (from_video)"),
    "from_video, frame directory": (
        rec(video="videos/frames", audio="from_video", question="<video>\n<audio>\nQ?"),
        "audio: videos/frames: is a frame directory, which has no sound track (from_video)"),
    "from_video, frame list": (
        rec(video=[f"videos/frames/{t:03d}.png" for t in range(4)], audio="from_video",
            question="<video>\n<audio>\nQ?"),
        "'from_video' takes the sound track of the record's video file, and it has a frame list"),
    "from_video, an image": (rec(image="face.png", audio="from_video", question="<image>\n<audio>\nQ?"),
                             "and it has no video file (image)"),
    "from_video, no media": (rec(audio="from_video"), "and it has no video file (no media)"),
    "no marker": (rec(question="How does the speaker feel?"),
                  "conversations: found 0 <audio> markers but the record has a sound ('audio'); expected 1"),
    "two markers": (rec(question="<audio><audio>Q?"), "found 2 <audio> markers"),
    "marker without sound": (rec(audio=None), "found 1 <audio> markers but the record has no sound"),
    "marker in the answer": (
        {**rec(), "conversations": [{"from": "human", "value": "<audio>Q?"},
                                    {"from": "gpt", "value": "<audio>"}]},
        "conversations[1].value: media markers may appear only in human turns"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_each_bad_sound_is_named_with_file_line_and_field(root, name):
    record, want = BAD[name]
    got = problems(record, root)
    assert any(want in p for p in got), got


def test_schema_checks_without_opening_files(root):
    """check_media=False: paths and markers are still checked, files are not opened."""
    record = rec(audio="audio/corrupt.wav")
    assert validate_record(record, source="f", line=1, data_root=root, check_media=False) == []
    assert validate_record(rec(audio="../x.wav"), source="f", line=1, data_root=root, check_media=False)


def test_validate_cli_reports_every_bad_sound(root, tmp_path):
    path = root / "records.jsonl"
    lines = [GOOD["audio only"], BAD["empty file"][0], BAD["from_video, film without a track"][0]]
    path.write_text("".join(json.dumps({**r, "id": f"r{i}"}) + "\n" for i, r in enumerate(lines)))
    proc = subprocess.run([sys.executable, "-m", "data_pipeline.validate", str(path)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert f"{path}:2: audio: audio/empty.wav: empty file (0 bytes)" in proc.stdout
    assert f"{path}:3: audio: videos/silent_film.mp4: no audio track" in proc.stdout
    assert "emo_o" in proc.stdout and ":1:" not in proc.stdout


def test_record_sound_reads_a_file_or_the_video_track(root):
    joy = record_sound(GOOD["audio only"], root)
    assert joy.dtype == np.float32 and joy.shape == (2 * RATE,)
    track = record_sound(GOOD["video + its own sound"], root)
    assert 1.8 * RATE <= len(track) <= 1.8 * RATE + 2 * 1024  # AAC adds priming and pads its last frame
    embedded = {**GOOD["video + its own sound"], "video_bytes": (root / "videos" / "talk.mp4").read_bytes()}
    np.testing.assert_array_equal(record_sound(embedded, None), track)
    with pytest.raises(AudioError, match="record r1: .*silent_film.mp4: no audio track"):
        record_sound(BAD["from_video, film without a track"][0], root)


# ----------------------------------------------------------------------------------------------- pipeline


@pytest.fixture(scope="module")
def setup(root):
    """A record file with every kind of sound record, a tokenizer, and a tiny audio model's spec."""
    from emollm_jax.configuration import load_config
    from emollm_jax.experiment import model_config

    records = [
        {**GOOD["audio only"], "id": "a0"},
        {**GOOD["image + audio"], "id": "a1"},
        {**GOOD["video + its own sound"], "id": "a2"},
        {**rec(audio="audio/long.wav"), "id": "a3"},
        {**GOOD["video + another sound"], "id": "a4"},
        {**rec(audio=None, image="face.png", question="<image>\nHow does she feel?"), "id": "a5"},
    ]
    path = root / "mixed.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    tok = train_tiny_tokenizer([t["value"] for r in records for t in r["conversations"]], root / "tok")
    tok.audio_token_id = -201  # what the run's tokenizer carries (experiment.load_tokenizer)
    config = load_config(f"{REPO / 'configs' / 'emobench.py'}:tiny")
    config.data.audio_windows = 2
    cfg = model_config(config, vocab_size=tok.vocab_size, image_token_id=tok.image_token_id)
    return config, cfg, tok, path, records


def _spec(setup, **kw):
    from emollm_jax import data

    config, cfg, tok, path, _ = setup
    kw.setdefault("training", False)
    if not kw["training"]:
        kw.setdefault("seq_buckets", (256,))
    kw.setdefault("batch_size", 3 if kw["training"] else 6)
    return data.pipeline_spec(config, cfg, sources=(str(path),), tokenizer=tok, data_root=str(path.parent),
                              **kw)


def test_eval_batches_carry_sound_with_a_mask(setup):
    from emollm_jax.models.emollm import check_audio_tokens, check_media_tokens

    _, cfg, tok, _, records = setup
    spec = _spec(setup)
    assert (spec.audio_mels, spec.audio_window_seconds, spec.audio_windows) == (16, 2.0, 2)
    batch, metas = next(iter(pipeline.make_eval_batches(spec, tokenizer=tok)))
    assert batch["audio_features"].shape == (6, 2, 16, 200) and batch["audio_media"].dtype == np.int32
    np.testing.assert_array_equal(batch["audio_media"], [[0, -1], [0, -1], [0, -1], [0, 0], [0, -1],
                                                         [-1, -1]])
    assert [m["media"] for m in metas] == ["audio", "image+audio", "video+audio", "audio", "video+audio",
                                           "image"]
    np.testing.assert_array_equal(batch["audio_features"][5], 0.0)  # no sound: an empty slot
    assert batch["audio_features"][0, 0].std() > 0.1  # a voice, not padding
    check_audio_tokens(cfg, batch["input_ids"], batch["audio_media"])  # every <audio> became its tokens
    check_media_tokens(cfg, batch["input_ids"], batch["frame_media"])
    k = cfg.audio_tokens_per_window
    assert [(row == -201).sum() for row in batch["input_ids"]] == [k, k, k, 2 * k, k, 0]
    # the video's own track and the separate file give different features
    assert not np.allclose(batch["audio_features"][2, 0], batch["audio_features"][4, 0])


def test_training_batches_in_worker_processes_resume_exactly(setup):
    spec = _spec(setup, training=True)
    inproc = pipeline.make_train_iterator(spec, process_index=0, process_count=1)
    first = [next(inproc) for _ in range(4)]
    assert set(first[0]) >= {"audio_features", "audio_media"}
    assert first[0]["audio_features"].shape == (3, 2, 16, 200)
    state = inproc.get_state()
    after = [next(inproc) for _ in range(2)]
    workers = pipeline.make_train_iterator(dataclasses.replace(spec, worker_count=2),
                                           process_index=0, process_count=1)
    for want in first:
        got = next(workers)
        for key in ("input_ids", "audio_features", "audio_media", "pixel_values"):
            np.testing.assert_array_equal(got[key], want[key])
    resumed = pipeline.make_train_iterator(spec, process_index=0, process_count=1)
    resumed.set_state(state)
    for want in after:
        got = next(resumed)
        np.testing.assert_array_equal(got["audio_features"], want["audio_features"])
        np.testing.assert_array_equal(got["input_ids"], want["input_ids"])


def test_a_model_without_an_audio_tower_refuses_sound(setup):

    config, cfg, tok, path, _ = setup
    deaf = dataclasses.replace(_spec(setup), audio_mels=0, audio_tokens_fn=None, max_errors=0)
    with pytest.raises(ErrorBudgetExceeded, match="record a0 has sound, and the model has no audio tower"):
        next(iter(pipeline.make_eval_batches(deaf, tokenizer=tok)))
    text_only = dataclasses.replace(deaf, max_errors=10)
    batch, metas = next(iter(pipeline.make_eval_batches(text_only, tokenizer=tok)))
    assert [m["id"] for m in metas] == ["a5"] and "audio_features" not in batch

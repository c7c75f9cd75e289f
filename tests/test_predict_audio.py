"""predict with sound: `--audio FILE` alone or beside an image, `--video FILE` with its own sound track, the
JSONL form, and the `python -m emollm_jax.main --mode=predict --audio` entry point."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_audio_records import _mp4, _wav

from data_pipeline import mini_emobench_voice as voice
from emollm_jax import predict

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("predict_sound")
    rng = np.random.default_rng(0)
    _wav(tmp / "clips" / "angry.wav", voice.synthesise("anger", rng))
    _mp4(tmp / "clips" / "talk.mp4", sound=voice.synthesise("joy", rng, seconds=1.8))
    _mp4(tmp / "clips" / "mute.mp4")
    Image.new("RGB", (64, 64), (10, 200, 10)).save(tmp / "face.png")
    return tmp


def test_make_record_with_sound():
    r = predict.make_record("How does she feel?", image="face.png", audio="a.wav", task="emo_o")
    assert r["conversations"][0]["value"] == "<image>\n<audio>\nHow does she feel?"
    assert (r["image"], r["audio"]) == ("face.png", "a.wav")
    v = predict.make_record("<video><audio>Q?", video="v.mp4", audio="from_video")
    assert v["conversations"][0]["value"] == "<video><audio>Q?" and v["audio"] == "from_video"
    with pytest.raises(ValueError, match="'from_video' needs a video"):
        predict.make_record("Q?", audio="from_video")


def test_a_video_brings_its_sound_to_a_model_that_hears(files):
    talk, _ = predict._question_record("Q?", image=None, video=str(files / "clips" / "talk.mp4"), audio=None,
                                       task=None, hears=True)
    assert talk["audio"] == "from_video" and talk["conversations"][0]["value"] == "<video>\n<audio>\nQ?"
    mute, _ = predict._question_record("Q?", image=None, video=str(files / "clips" / "mute.mp4"), audio=None,
                                       task=None, hears=True)
    assert "audio" not in mute  # no track: the frames alone
    deaf, _ = predict._question_record("Q?", image=None, video=str(files / "clips" / "talk.mp4"), audio=None,
                                       task=None, hears=False)
    assert "audio" not in deaf
    both, root = predict._question_record("Q?", image=str(files / "face.png"), video=None,
                                          audio=str(files / "clips" / "angry.wav"), task=None, hears=True)
    assert root == files and (both["image"], both["audio"]) == ("face.png", "clips/angry.wav")
    with pytest.raises(ValueError, match="--audio, but the model has no audio tower"):
        predict._question_record("Q?", image=None, video=None, audio=str(files / "clips" / "angry.wav"),
                                 task=None, hears=False)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from tests.tiny_eval_setup import make_data, random_model, tiny_config

    tmp = tmp_path_factory.mktemp("tiny_predict_sound")
    data, tok_path, tok = make_data(tmp, per_task_test=1)
    config = tiny_config(data, tok_path)
    tok.audio_token_id = int(config.model.audio_token_id)  # as experiment.load_tokenizer gives it
    return config, tok, random_model(config, tok), tmp


def _heard(monkeypatch):
    """Records the sound each generation call receives."""
    from emollm_jax import generate

    heard = []
    real = generate.generate

    def spy(model, ids, mask, **kw):
        heard.append((kw.get("audio_features"), kw.get("audio_media"), kw.get("frame_media")))
        return real(model, ids, mask, **kw)

    monkeypatch.setattr(generate, "generate", spy)
    return heard


def test_predict_hears_an_audio_file_and_a_videos_track(tiny, files, monkeypatch, capsys):
    config, tok, model, tmp = tiny
    heard = _heard(monkeypatch)
    rows = predict.run_predict(config, tmp / "work", audio=str(files / "clips" / "angry.wav"),
                               question="Which emotion does the voice express?", task="emo_o", model=model,
                               tokenizer=tok)
    assert len(rows) == 1 and rows[0]["question"].startswith("<audio>\n")
    features, media, _ = heard[-1]
    assert np.asarray(media)[0].tolist() == [0] and np.asarray(features)[0, 0].std() > 0.1
    predict.run_predict(config, tmp / "work", video=str(files / "clips" / "talk.mp4"), question="Q?",
                        model=model, tokenizer=tok)
    features, media, frames = heard[-1]
    assert np.asarray(media)[0].tolist() == [0] and (np.asarray(frames)[0] == 0).sum() == 4
    assert "predict-0: " in capsys.readouterr().out
    req = tmp / "requests.jsonl"
    req.write_text(json.dumps({"id": "s", "question": "Q?", "audio": "clips/angry.wav"}) + "\n")
    shutil.copytree(files / "clips", tmp / "clips")  # a link out of the data root would be refused
    rows = predict.run_predict(config, tmp / "work", jsonl=str(req), model=model, tokenizer=tok)
    assert [r["id"] for r in rows] == ["s"] and np.asarray(heard[-1][1])[0].tolist() == [0]


@pytest.mark.slow
def test_main_predict_with_audio_and_video(tiny, files):
    """`python -m emollm_jax.main --mode=predict --audio FILE` and `--video FILE` on a saved checkpoint."""
    from flax import nnx

    from emollm_jax.checkpoint import Checkpointer

    config, tok, model, tmp = tiny
    work = tmp / "main_work"
    with Checkpointer(work / "checkpoints") as ckpt:
        ckpt.save(3, params=nnx.state(model, nnx.Param), opt_state={"count": np.zeros((), np.int32)},
                  meta={"note": "test"}, force=True)
        ckpt.wait()
    shrink = [f"--config.data.root={config.data.root}", f"--config.data.tokenizer={config.data.tokenizer}",
              "--config.model.text.hidden_size=32", "--config.model.text.intermediate_size=64",
              "--config.model.text.num_layers=1", "--config.model.text.num_heads=2",
              "--config.model.text.num_kv_heads=1", "--config.model.vision.hidden_size=32",
              "--config.model.vision.intermediate_size=64", "--config.model.vision.num_heads=2",
              "--config.eval.max_new_tokens=4"]
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(JAX_PLATFORMS="cpu")
    for media in (["--audio", str(files / "clips" / "angry.wav")],
                  ["--video", str(files / "clips" / "talk.mp4")]):
        cmd = [sys.executable, "-m", "emollm_jax.main", "--config", str(REPO / "configs" / "emobench.py"),
               f"--workdir={work}", "--mode=predict", *media, "--question", "Which emotion is it?", "--task",
               "emo_o", *shrink]
        proc = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "predict-0: " in proc.stdout and "[emo_o: " in proc.stdout

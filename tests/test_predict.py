"""predict: request parsing, single-image and JSONL modes on a tiny random model, checkpoint loading."""

import json

import numpy as np
import pytest

from emollm_jax import predict


def test_make_record_adds_marker_and_refuses_two_media():
    r = predict.make_record("How does she feel?", image="face.png", task="emo_o")
    assert r["conversations"] == [{"from": "human", "value": "<image>\nHow does she feel?"}]
    assert r["image"] == "face.png" and r["task"] == "emo_o"
    video = predict.make_record("<video>\nWhat?", video="clip")
    assert video["conversations"][0]["value"] == "<video>\nWhat?"
    assert predict.make_record("Hi")["task"] == "free" and "image" not in predict.make_record("Hi")
    with pytest.raises(ValueError, match="not both"):
        predict.make_record("q", image="a.png", video="b.mp4")


def test_read_requests_errors_name_line(tmp_path):
    path = tmp_path / "req.jsonl"
    path.write_text('{"question": "ok?", "image": "a.png"}\n\n{"image": "b.png"}\n')
    with pytest.raises(ValueError, match=r"req.jsonl:3: needs a 'question'"):
        predict.read_requests(path)
    path.write_text('{"question": "ok?", "image": "a.png", "id": "x"}\n'
                    '{"question": "no media", "task": "humor"}\n')
    reqs = predict.read_requests(path)
    assert [r["id"] for r in reqs] == ["x", "req-2"]
    assert reqs[0]["conversations"][0]["value"].startswith("<image>\n")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from tests.tiny_eval_setup import make_data, random_model, tiny_config

    tmp = tmp_path_factory.mktemp("tiny_predict")
    data, tok_path, tok = make_data(tmp, per_task_test=1)
    config = tiny_config(data, tok_path)
    return config, tok, random_model(config, tok), data, tmp


def test_single_image_and_jsonl_modes(tiny, capsys):
    config, tok, model, data, tmp = tiny
    record = json.loads((data / "test.jsonl").read_text().splitlines()[0])       # an emo_c record
    rows = predict.run_predict(config, tmp / "work", image=str(data / record["image"]),
                               question="Which emotion? Options: [anger, joy].", task="emo_c", model=model,
                               tokenizer=tok)
    assert len(rows) == 1 and rows[0]["task"] == "emo_c" and isinstance(rows[0]["answer"], str)
    assert rows[0]["parsed"] in (None, "anger", "joy")
    assert "predict-0: " in capsys.readouterr().out

    req = tmp / "requests.jsonl"
    lines = [json.loads(line) for line in (data / "test.jsonl").read_text().splitlines()[:3]]
    free = {"id": "free-q", "question": "Describe it.", "image": lines[0]["image"]}
    req.write_text("".join(json.dumps(r) + "\n" for r in [*lines, free]))
    (tmp / "images").symlink_to(data / "images")                       # paths relative to the JSONL's dir
    (tmp / "videos").symlink_to(data / "videos")
    rows = predict.run_predict(config, tmp / "work", jsonl=str(req), model=model, tokenizer=tok)
    assert [r["id"] for r in rows] == [r["id"] for r in lines] + ["free-q"]
    out = (tmp / "work" / "predict" / "outputs.jsonl").read_text().splitlines()
    written = [json.loads(line) for line in out]
    assert written == rows
    assert written[-1]["task"] == "free" and written[-1]["parsed"] is None


def test_predict_needs_a_checkpoint_or_init_from(tiny):
    config, tok, _, _, tmp = tiny
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        predict.run_predict(config, tmp / "empty_work", question="Hi?", tokenizer=tok)


@pytest.mark.slow
def test_predict_loads_latest_checkpoint(tiny):
    """Weights saved as a training checkpoint are the ones predict uses (same answers as the model)."""
    from flax import nnx

    from emollm_jax.checkpoint import Checkpointer
    from tests.tiny_eval_setup import random_model

    config, tok, _, data, tmp = tiny
    model = random_model(config, tok, seed=3)
    work = tmp / "ckpt_work"
    with Checkpointer(work / "checkpoints") as ckpt:
        ckpt.save(7, params=nnx.state(model, nnx.Param), opt_state={"count": np.zeros((), np.int32)},
                  meta={"note": "test"}, force=True)
        ckpt.wait()
    record = json.loads((data / "test.jsonl").read_text().splitlines()[0])
    kwargs = dict(image=str(data / record["image"]), question=record["conversations"][0]["value"],
                  task="emo_c", tokenizer=tok)
    loaded = predict.run_predict(config, work, **kwargs)
    direct = predict.run_predict(config, work, model=model, **kwargs)
    assert loaded[0]["answer"] == direct[0]["answer"]

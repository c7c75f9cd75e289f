"""Evaluation: metric functions on hand-made cases, scoring/report files, and an end-to-end run."""

import json
import math

import numpy as np
import pytest

from emollm_jax import evaluate
from emollm_jax.evaluate import Prediction, accuracy, confusion_matrix, macro_f1

# ------------------------------------------------------------------------------ metrics, by hand

LABELS = ["anger", "joy", "sadness"]
GOLDS = ["joy", "joy", "anger", "sadness", "joy", "anger"]
PREDS = ["joy", "anger", "anger", None, "joy", "fear"]


def test_accuracy_by_hand():
    # correct: idx 0, 2, 4 -> 3 of 6; None and the off-label "fear" are wrong.
    assert accuracy(PREDS, GOLDS) == pytest.approx(0.5)
    assert accuracy([None, None], ["a", "b"]) == 0.0
    assert math.isnan(accuracy([], []))
    with pytest.raises(ValueError, match="2 predictions vs 1"):
        accuracy(["a", "b"], ["a"])


def test_confusion_by_hand():
    expected = np.array([
        # anger joy sadness none
        [1, 0, 0, 1],   # gold anger: idx2 -> anger, idx5 -> fear (off-label -> none)
        [1, 2, 0, 0],   # gold joy: idx0 joy, idx1 anger, idx4 joy
        [0, 0, 0, 1],   # gold sadness: idx3 unparseable
    ])
    np.testing.assert_array_equal(confusion_matrix(PREDS, GOLDS, LABELS), expected)
    with pytest.raises(ValueError, match="'surprise'"):
        confusion_matrix(["joy"], ["surprise"], LABELS)


def test_macro_f1_by_hand():
    # anger: TP=1, FP=1 (idx1), FN=1 (idx5) -> 2/(2+1+1) = 0.5
    # joy:   TP=2, FP=0, FN=1 (idx1)        -> 4/(4+0+1) = 0.8
    # sadness: TP=0, FP=0, FN=1             -> 0
    assert macro_f1(PREDS, GOLDS, LABELS) == pytest.approx((0.5 + 0.8 + 0.0) / 3)
    # a class that is neither gold nor predicted is not averaged in: only "joy" occurs, perfectly.
    assert macro_f1(["joy", "joy"], ["joy", "joy"], LABELS) == pytest.approx(1.0)
    # a class only predicted (never gold) counts with F1 = 0: joy 2/(2+0+1)... by hand:
    # joy: TP=1, FP=0, FN=1 -> 2/3; anger: TP=0, FP=1, FN=0 -> 0.
    assert macro_f1(["joy", "anger"], ["joy", "joy"], LABELS) == pytest.approx((2 / 3 + 0) / 2)


# ------------------------------------------------------------------------------ scoring and files


def _pred(i, task, answer, parsed, gold, split="test", options=()):
    return Prediction(id=f"{task}-{i}", task=task, prompt=f"q{i}", answer=answer, parsed=parsed, gold=gold,
                      split=split, options=tuple(options))


def _predictions(split="test", humor_right=True):
    return [
        _pred(0, "emo_c", "joy", "joy", "joy", split, ("anger", "joy")),
        _pred(1, "emo_c", "anger", "anger", "joy", split, ("anger", "joy")),
        _pred(2, "sarcasm", "yes", "yes", "yes", split, ("yes", "no")),
        _pred(3, "sarcasm", "banana bread", None, "no", split, ("yes", "no")),
        _pred(4, "humor", "no", "no" if humor_right else "yes", "no", split, ("yes", "no")),
        _pred(5, "vqa", "red", "red", "red", split),
    ]


def test_score_by_hand():
    s = evaluate.score(_predictions())
    assert list(s["tasks"]) == ["emo_c", "humor", "sarcasm", "vqa"]       # paper order, objective last
    assert s["tasks"]["emo_c"]["accuracy"] == pytest.approx(0.5)
    assert s["tasks"]["sarcasm"]["unparseable"] == 1
    assert s["tasks"]["sarcasm"]["labels"] == ["no", "yes"]
    assert s["tasks"]["sarcasm"]["confusion"] == [[0, 0, 1], [0, 1, 0]]
    # mean over the EmoBench tasks present only: (0.5 + 1.0 + 0.5) / 3; vqa (objective) excluded.
    assert s["emobench_mean"] == pytest.approx(2.0 / 3)
    assert s["emobench_tasks"] == ["emo_c", "humor", "sarcasm"]
    assert s["emobench_missing"] == ["emo_o", "intent", "hate"]
    assert s["tasks"]["vqa"]["objective"] is True


def test_parse_predictions_open_set_uses_task_labels():
    metas = [{"id": "a", "task": "emo_o", "label": "joy"}, {"id": "b", "task": "emo_o", "label": "sadness"},
             {"id": "c", "task": "emo_c", "label": "joy", "options": ["anger", "joy"]}]
    preds = evaluate.parse_predictions(metas, ["She is happy", "She is terrified", "glad"], split="test")
    assert [p.parsed for p in preds] == ["joy", None, "joy"]  # "fear" is not an emo_o label here


def test_write_outputs_structure(tmp_path):
    main = evaluate.score(_predictions("test"))
    blank = evaluate.score(_predictions("test_blank", humor_right=False))
    results = evaluate.assemble_results({"test": main, "test_blank": blank}, "test", "test_blank")
    preds = _predictions("test") + _predictions("test_blank", humor_right=False)
    evaluate.write_outputs(tmp_path, results, preds)

    got = json.loads((tmp_path / "results.json").read_text())
    assert got["emobench_mean"] == pytest.approx(2.0 / 3)
    assert got["control"]["drop"]["humor"] == pytest.approx(1.0)             # 1.0 -> 0.0
    assert got["control"]["drop"]["emobench_mean"] == pytest.approx(1.0 / 3)
    rows = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 12
    assert set(rows[0]) == {"id", "task", "prompt", "answer", "parsed", "gold", "split"}
    report = (tmp_path / "report.md").read_text()
    assert "| sarcasm | 2 | 50.0 | " in report
    assert "**66.7**" in report
    assert "## Unparseable answers (2)" in report and "banana bread" in report
    for task in ("emo_c", "humor", "sarcasm", "vqa"):
        assert (tmp_path / f"confusion_{task}.png").read_bytes()[:4] == b"\x89PNG"
    assert not list(tmp_path.glob(".*.tmp"))


# ------------------------------------------------------------------------------ end to end, tiny random model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from tests.tiny_eval_setup import make_data, random_model, tiny_config

    tmp = tmp_path_factory.mktemp("tiny_eval")
    data, tok_path, tok = make_data(tmp)
    config = tiny_config(data, tok_path)
    return config, tok, random_model(config, tok), tmp


def test_run_eval_end_to_end_on_a_random_model(tiny):
    config, tok, model, tmp = tiny
    work = tmp / "work"
    results = evaluate.run_eval(config, work, model=model, tokenizer=tok, progress=False)
    out = work / "eval"
    assert set(results["splits"]) == {"test", "test_blank"}
    tasks = ["emo_c", "emo_o", "intent", "hate", "humor", "sarcasm", "caption", "vqa"]
    assert list(results["accuracy"]) == tasks
    assert results["control"]["split"] == "test_blank"
    assert set(results["control"]["drop"]) == set(results["accuracy"]) | {"emobench_mean"}
    for r in results["splits"]["test"]["tasks"].values():
        assert r["n"] == 2 and 0.0 <= r["accuracy"] <= 1.0
        assert sum(map(sum, r["confusion"])) == 2

    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 2 * 16                                     # 8 tasks x 2 records x 2 splits
    assert {r["split"] for r in rows} == {"test", "test_blank"}
    vqa = [r for r in rows if r["task"] == "vqa"]
    assert all(r["gold"] for r in vqa)                              # gold from the answer turn (no label)
    assert all("<image>" in r["prompt"] or "<video>" in r["prompt"] for r in rows)
    # a random model mostly produces unparseable text: every such answer is listed, none dropped.
    report = (out / "report.md").read_text()
    bad = [r for r in rows if r["parsed"] is None]
    assert f"## Unparseable answers ({len(bad)})" in report
    for r in bad:
        assert f"| {r['split']} | {r['id']} | {r['task']} |" in report
    for task in results["accuracy"]:
        assert (out / f"confusion_{task}.png").stat().st_size > 0
    saved = json.loads((out / "results.json").read_text())
    assert saved["emobench_mean"] == pytest.approx(results["emobench_mean"])


@pytest.mark.slow
def test_run_eval_with_emoprompt_and_subset(tiny):
    config, tok, model, tmp = tiny
    config = config.copy_and_resolve_references()
    config.emoprompt.num_exemplars = 1
    config.eval.max_examples = 8                                     # 1 per task
    results = evaluate.run_eval(config, tmp / "work_m1", model=model, tokenizer=tok, splits=["test"],
                                progress=False)
    assert results["control"] is None
    assert all(r["n"] == 1 for r in results["splits"]["test"]["tasks"].values())
    lines = (tmp / "work_m1" / "eval" / "predictions.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    assert all(r["prompt"].startswith("Example: ") and "\nAnswer: " in r["prompt"] for r in rows)
    assert (tmp / "work_m1" / "emoprompt_bank.json").exists()

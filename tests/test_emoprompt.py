"""EmoPrompt bank: file format, selection, rendering, the pipeline hook and the build CLI."""

import json

import pytest

from emollm_jax import emoprompt
from emollm_jax.emoprompt import Exemplar, load_bank, prefix_fn, render, save_bank, select


def _bank():
    return {
        "emo_c": [
            Exemplar("c1", "<image>\nWhich emotion does the red face show?", "Frowning brows.", "anger"),
            Exemplar("c2", "Which emotion does the smiling face show?", "The mouth curves up.", "joy"),
            Exemplar("c3", "What emotion is shown by the crying face with tears?", "Tears run down.",
                     "sadness"),
        ],
        "sarcasm": [Exemplar("s1", "Is this caption sarcastic?", "Text praises a rainy day.", "yes")],
    }


def test_save_load_roundtrip_and_format(tmp_path):
    path = tmp_path / "sub" / "bank.json"
    save_bank(_bank(), path)
    raw = json.loads(path.read_text())
    assert raw["version"] == 1
    assert raw["tasks"]["sarcasm"] == [{"id": "s1", "question": "Is this caption sarcastic?",
                                        "reasoning": "Text praises a rainy day.", "answer": "yes"}]
    assert load_bank(path) == _bank()
    assert [p.name for p in path.parent.iterdir()] == ["bank.json"]  # no temp file left behind


@pytest.mark.parametrize("data, match", [
    ({"version": 2, "tasks": {}}, "version"),
    ({"version": 1, "tasks": []}, "'tasks'"),
    ({"version": 1, "tasks": {"emo_c": [{"id": "a", "question": "q", "answer": "joy"}]}},
     r"tasks.emo_c\[0\]: key 'reasoning'"),
])
def test_load_bank_errors_name_the_place(tmp_path, data, match):
    path = tmp_path / "bank.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=match) as e:
        load_bank(path)
    assert str(path) in str(e.value)


def test_select_fixed_and_exclude_self():
    bank = _bank()
    assert [e.id for e in select(bank, "emo_c", 2)] == ["c1", "c2"]
    assert [e.id for e in select(bank, "emo_c", 2, exclude_id="c1")] == ["c2", "c3"]
    assert [e.id for e in select(bank, "emo_c", 10)] == ["c1", "c2", "c3"]
    assert select(bank, "emo_c", 0) == []
    assert select(bank, "intent", 3) == []          # task absent from the bank
    with pytest.raises(ValueError, match="strategy"):
        select(bank, "emo_c", 1, strategy="random")


def test_select_similar_ranks_by_word_overlap_deterministically():
    bank = _bank()
    got = select(bank, "emo_c", 3, strategy="similar", query_text="A crying face: what emotion, tears?")
    assert got[0].id == "c3"
    # "smiling" only occurs in c2, so it ranks first; c1 and c3 share no rare word and keep bank order.
    got = select(bank, "emo_c", 3, strategy="similar", query_text="smiling")
    assert [e.id for e in got] == ["c2", "c1", "c3"]
    with pytest.raises(ValueError, match="query_text"):
        select(bank, "emo_c", 1, strategy="similar")


def test_render_strips_media_markers():
    text = render(select(_bank(), "emo_c", 2))
    assert text == ("Example: Which emotion does the red face show?\nReasoning: Frowning brows.\n"
                    "Answer: anger\n\n"
                    "Example: Which emotion does the smiling face show?\nReasoning: The mouth curves up.\n"
                    "Answer: joy\n\n")
    assert "<image>" not in text
    assert render([]) == ""


def test_prefix_fn_for_the_pipeline():
    record = {"id": "c2", "task": "emo_c",
              "conversations": [{"from": "human", "value": "<image>\nWhich emotion?"},
                                {"from": "gpt", "value": "j"}]}
    fn = prefix_fn(_bank(), 1)
    assert fn(record) == render([_bank()["emo_c"][0]])
    record_c1 = dict(record, id="c1")
    # its own exemplar is skipped
    assert fn(record_c1).startswith("Example: Which emotion does the smiling face show?")
    assert prefix_fn(_bank(), 0)(record) == ""
    assert prefix_fn(_bank(), 2)(dict(record, task="hate")) == ""


def _record(i, task, label, rationale):
    r = {"id": f"{task}-{i}", "task": task, "label": label, "options": ["anger", "joy"],
         "conversations": [{"from": "human", "value": f"<image>\nQuestion {i}?"},
                           {"from": "gpt", "value": label}]}
    if rationale is not None:
        r["rationale"] = rationale
    return r


def test_build_cli_from_rationales(tmp_path, capsys):
    records = [_record(0, "emo_c", "joy", "Smile."), _record(1, "emo_c", "anger", None),
               _record(2, "emo_c", "anger", "Frown."), _record(3, "emo_c", "joy", "Smile  again."),
               _record(4, "humor", "yes", "Pun.")]
    src = tmp_path / "train.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "bank.json"
    assert emoprompt.main(["build", "--records", str(src), "--out", str(out), "--per-task", "2"]) == 0
    bank = load_bank(out)
    assert [e.id for e in bank["emo_c"]] == ["emo_c-0", "emo_c-2"]    # record without rationale skipped
    assert bank["emo_c"][1] == Exemplar("emo_c-2", "Question 2?", "Frown.", "anger")
    assert [e.id for e in bank["humor"]] == ["humor-4"]
    assert "emo_c: 2" in capsys.readouterr().out


def test_build_cli_without_rationales_fails_clearly(tmp_path, capsys):
    src = tmp_path / "train.jsonl"
    src.write_text(json.dumps(_record(0, "emo_c", "joy", None)) + "\n")
    out = tmp_path / "bank.json"
    assert emoprompt.main(["build", "--records", str(src), "--out", str(out)]) == 1
    assert not out.exists()
    assert "no record has a rationale" in capsys.readouterr().err


def test_build_with_teacher_callable():
    records = [_record(0, "emo_c", "joy", "own"), _record(1, "emo_c", "anger", None)]
    bank = emoprompt.build_from_records(records, 5, rationale=lambda r: f"because {r['label']}")
    got = [(e.id, e.reasoning) for e in bank["emo_c"]]
    assert got == [("emo_c-0", "because joy"), ("emo_c-1", "because anger")]
    assert "The correct answer is: anger." in emoprompt.teacher_prompt(records[1])


def test_from_config_builds_bank_once_and_respects_m(tmp_path):
    import ml_collections

    data = tmp_path / "data"
    data.mkdir()
    records = [_record(i, "emo_c", "joy", f"Smile {i}.") for i in range(3)]
    (data / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    config = ml_collections.ConfigDict({"emoprompt": {"bank": "", "num_exemplars": 0},
                                        "data": {"train_split": "train"}})
    assert emoprompt.from_config(config, data, tmp_path / "work") is None
    config.emoprompt.num_exemplars = 2
    fn = emoprompt.from_config(config, data, tmp_path / "work")
    assert (tmp_path / "work" / "emoprompt_bank.json").exists()
    assert fn(records[0]).count("Example:") == 2 and "Smile 0." not in fn(records[0])
    config.emoprompt.bank = str(tmp_path / "missing.json")
    with pytest.raises(FileNotFoundError, match="missing.json"):
        emoprompt.from_config(config, data, tmp_path / "work")


def test_prefix_fn_is_picklable_for_grain_workers():
    import pickle

    fn = pickle.loads(pickle.dumps(prefix_fn(_bank(), 2, "similar")))
    record = {"id": "x", "task": "emo_c", "conversations": [{"from": "human", "value": "crying tears?"}]}
    assert fn(record) == prefix_fn(_bank(), 2, "similar")(record)
    assert fn(record).startswith("Example: What emotion is shown by the crying face")

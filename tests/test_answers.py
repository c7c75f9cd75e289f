"""Answer -> label mapping: normalisation, close-set, binary, open-set, synonyms file."""

import json

import pytest

from emollm_jax.answers import AnswerParser, load_synonyms, normalize, parse_answer

EKMAN = ["anger", "disgust", "fear", "joy", "sadness", "surprise"]


@pytest.mark.parametrize("text, expected", [
    ("  The ANSWER is: Joy!! ", "answer is joy"),
    ("It isn't an apple.", "it isnt apple"),
    ("non-hateful", "non hateful"),
    ("", ""),
    ("...", ""),
])
def test_normalize(text, expected):
    assert normalize(text) == expected


@pytest.mark.parametrize("answer, expected", [
    ("Joy", "joy"),                                   # exact
    ("joy.", "joy"),
    ("The emotion is sadness.", "sadness"),           # single option named
    ("I think the person feels happy", "joy"),        # synonym
    ("sad", "sadness"),
    ("She looks scared.", "fear"),
    ("Surprised!", "surprise"),
    ("disgusted", "disgust"),
    ("angry", "anger"),
    ("joy or sadness", None),                         # two options -> ambiguous
    ("happy and sad", None),                          # two through synonyms
    ("not sad, rather angry", "anger"),               # negated option does not count
    ("enjoyment", None),                              # whole words only: no "joy" inside "enjoyment"
    ("banana", None),
    ("", None),
])
def test_close_set(answer, expected):
    assert parse_answer(answer, "emo_c", EKMAN) == expected


def test_close_set_returns_option_as_given_and_matches_synonym_options():
    assert parse_answer("anger", "emo_c", ["Anger", "Joy"]) == "Anger"
    # option "happiness" is matched by the answer "glad" since both map to joy.
    assert parse_answer("she is glad", "emo_c", ["happiness", "sadness"]) == "happiness"


def test_intent_multiword_options():
    options = ["express affection", "seek attention", "show affection to pets"]
    answer = "The intent is to show affection to pets."
    assert parse_answer(answer, "intent", options) == "show affection to pets"
    assert parse_answer("seek attention", "intent", options) == "seek attention"
    assert parse_answer("to express affection and seek attention", "intent", options) is None


@pytest.mark.parametrize("task, answer, expected", [
    ("sarcasm", "Yes", "yes"),
    ("sarcasm", "yeah, definitely", "yes"),
    ("sarcasm", "It is sarcastic.", "yes"),
    ("sarcasm", "It is not sarcastic.", "no"),
    ("sarcasm", "true", "yes"),
    ("sarcasm", "False", "no"),
    ("humor", "it is humorous", "yes"),
    ("humor", "Nope, it isn't funny", "no"),
    ("hate", "This meme does not contain hate.", "no"),
    ("hate", "hateful", "yes"),
    ("hate", "The picture shows a dog.", None),
])
def test_binary_yes_no_options(task, answer, expected):
    assert parse_answer(answer, task, ["yes", "no"]) == expected
    assert parse_answer(answer, task, None) == expected  # no options: canonical yes/no


def test_binary_maps_polarity_onto_named_options():
    options = ["hateful", "not hateful"]
    assert parse_answer("not hateful", "hate", options) == "not hateful"
    assert parse_answer("It is not hateful at all", "hate", options) == "not hateful"  # not read as "hateful"
    assert parse_answer("no", "hate", options) == "not hateful"
    assert parse_answer("yes", "hate", options) == "hateful"
    assert parse_answer("hateful or not hateful", "hate", options) is None


def test_open_set_with_and_without_label_space():
    space = ["joy", "sadness", "anger", "neutral"]
    assert parse_answer("The person seems happy.", "emo_o", label_space=space) == "joy"
    assert parse_answer("Anger", "emo_o", label_space=space) == "anger"
    assert parse_answer("fear", "emo_o", label_space=space) is None          # outside the label space
    assert parse_answer("happy but also sad", "emo_o", label_space=space) is None
    assert parse_answer("she looks terrified", "emo_o") == "fear"             # no space: table's canonical
    assert parse_answer("nostalgia", "emo_o") == "nostalgia"                  # one free word is kept
    assert parse_answer("some long rambling text", "emo_o") is None


def test_user_synonyms_extend_and_override(tmp_path):
    path = tmp_path / "syn.json"
    path.write_text(json.dumps({"Elated": "joy", "upset": "anger"}))
    table = load_synonyms(path)
    parser = AnswerParser(table)
    assert parse_answer("elated", "emo_c", EKMAN) is None                     # default table lacks it
    assert parse_answer("elated", "emo_c", EKMAN, parser=parser) == "joy"
    assert parse_answer("upset", "emo_c", EKMAN, parser=parser) == "anger"    # overrides sadness
    assert parse_answer("sad", "emo_c", EKMAN, parser=parser) == "sadness"    # defaults kept


@pytest.mark.parametrize("content, match", [
    ("[1, 2]", "JSON object"),
    ('{"glad": 3}', "'glad'"),
    ('{"glad": "joy",', "not valid JSON"),
])
def test_bad_synonym_file_names_file_and_key(tmp_path, content, match):
    path = tmp_path / "syn.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=match) as e:
        load_synonyms(path)
    assert str(path) in str(e.value)

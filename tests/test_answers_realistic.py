"""Answer -> label on answers phrased as chat models phrase them: one table per task, each row an answer and
the label it must map to (None: unparseable, which counts as wrong)."""

import pytest

from emollm_jax.answers import parse_answer

EKMAN = ["anger", "disgust", "fear", "joy", "sadness", "surprise"]
INTENTS = ["to be left alone", "to eat", "to get help", "to play", "to sleep"]
YES_NO = ["no", "yes"]
OPEN_SPACE = ["anger", "disgust", "fear", "joy", "sadness", "surprise", "neutral"]

EMO_C = [
    ("Joy", "joy"),
    ("joy.", "joy"),
    ("The person in the image shows sadness.", "sadness"),
    ("Based on the downturned mouth and drooping eyes, the emotion is sadness.", "sadness"),
    ("She looks happy.", "joy"),
    ("He appears to be furious.", "anger"),
    ("The man seems frightened by something outside the frame.", "fear"),
    ("Surprise - the raised eyebrows and open mouth give it away.", "surprise"),
    ("The expression is one of disgust: the nose is wrinkled.", "disgust"),
    ("mostly happy", "joy"),
    ("Mostly happy, I would say.", "joy"),
    ("It is not joy but sadness.", "sadness"),
    ("Not joy, rather sadness.", "sadness"),
    ("Sadness rather than joy.", "sadness"),
    ("She is definitely not happy; she is angry.", "anger"),
    ("The person doesn't look happy at all, they look disgusted.", "disgust"),
    ("He is not really sad, he is surprised.", "surprise"),
    ("I don't think the person feels fear; it is anger.", "anger"),
    ("Not happy.", None),
    ("Not angry at all.", None),
    ("Neither joy nor sadness.", None),
    ("could be anger or fear", None),
    ("It could be anger.", None),
    ("Maybe surprise.", None),
    ("I'm not sure, possibly fear.", None),
    ("Hard to tell from this image.", None),
    ("I can't say which emotion it is.", None),
    ("joy or sadness", None),
    ("A mix of joy and surprise.", None),
    ("Happy and sad at the same time.", None),
    ("The person is smiling.", None),
    ("Option D", None),
]

EMO_O = [
    ("Joy", "joy"),
    ("Happiness.", "joy"),
    ("The person in the video looks happy.", "joy"),
    ("mostly happy", "joy"),
    ("Sad.", "sadness"),
    ("The person seems upset and on the verge of tears.", "sadness"),
    ("Anger - the brows are pulled down and the jaw is clenched.", "anger"),
    ("They appear terrified.", "fear"),
    ("Disgusted.", "disgust"),
    ("The emotion is surprise.", "surprise"),
    ("Calm.", "neutral"),
    ("It is not joy but sadness.", "sadness"),
    ("She does not seem angry; she seems scared.", "fear"),
    ("Definitely not happy, more like disgusted.", "disgust"),
    ("could be anger or fear", None),
    ("Perhaps fear.", None),
    ("It's hard to tell.", None),
    ("Not sure.", None),
    ("happy but also sad", None),
    ("The person is walking down the street.", None),
]

INTENT = [
    ("to eat", "to eat"),
    ("To eat.", "to eat"),
    ("The person wants to eat.", "to eat"),
    ("The intention is to play with the ball.", "to play"),
    ("She is trying to get help.", "to get help"),
    ("He just wants to be left alone.", "to be left alone"),
    ("The child wants to sleep; the eyes are half closed.", "to sleep"),
    ("Eat.", "to eat"),
    ("Judging by the plate in her hand, she intends to eat.", "to eat"),
    ("The person does not want to eat, they want to sleep.", "to sleep"),
    ("Not to play but to get help.", "to get help"),
    ("They want to be left alone rather than to play.", "to be left alone"),
    ("To eat or to sleep.", None),
    ("Maybe to get help.", None),
    ("It's difficult to determine the intention.", None),
    ("She is holding a pillow.", None),
    ("The person wants to play and to eat.", None),
]

HATE = [
    ("Yes", "yes"),
    ("No.", "no"),
    ("Yes, the post is hateful.", "yes"),
    ("This post is hateful towards the group shown.", "yes"),
    ("The caption is derogatory and demeaning.", "yes"),
    ("It is offensive.", "yes"),
    ("No, it is not hateful.", "no"),
    ("The post is not hateful.", "no"),
    ("This meme does not contain hate speech.", "no"),
    ("There is nothing hateful about it.", "no"),
    ("It is definitely not hateful.", "no"),
    ("Not hateful at all; it is a harmless joke.", "no"),
    ("The caption is harmless.", "no"),
    ("Although the image looks aggressive, the post is harmless.", "no"),
    ("At first glance it seems harmless, but it is actually hateful.", "yes"),
    ("I don't think so.", "no"),
    ("Absolutely not.", "no"),
    ("Not really.", "no"),
    ("Hard to say without more context.", None),
    ("It might be offensive to some people.", None),
    ("It could be considered hateful.", None),
    ("I'm not sure.", None),
    ("The image shows a green figure with a caption.", None),
    ("Yes and no.", None),
]

HUMOR = [
    ("Yes", "yes"),
    ("yes, it is funny", "yes"),
    ("It's funny.", "yes"),
    ("Yes! The contrast between the caption and the image is hilarious.", "yes"),
    ("This is a joke about the weather.", "yes"),
    ("Definitely funny.", "yes"),
    ("No", "no"),
    ("Nope, it isn't funny.", "no"),
    ("It is not funny.", "no"),
    ("It is definitely not funny.", "no"),
    ("Not funny at all.", "no"),
    ("The post is serious, not humorous.", "no"),
    ("It's not a joke.", "no"),
    ("This is no joke.", "no"),
    ("Not at all.", "no"),
    ("It is not funny, it is sarcastic.", "no"),
    ("I think so.", "yes"),
    ("Of course it is funny.", "yes"),
    ("Of course not.", "no"),
    ("Maybe.", None),
    ("It depends on your sense of humor.", None),
    ("Hard to tell.", None),
    ("I can't say.", None),
    ("The image shows a beach.", None),
]

SARCASM = [
    ("Yes", "yes"),
    ("yes.", "yes"),
    ("Yes, the post is sarcastic.", "yes"),
    ("It is sarcastic.", "yes"),
    ("The post is clearly sarcastic: the words are positive but the face is angry.", "yes"),
    ("Definitely sarcastic.", "yes"),
    ("No doubt, it is sarcastic.", "yes"),
    ("The caption is ironic given the frown.", "yes"),
    ("yeah, definitely", "yes"),
    ("Correct.", "yes"),
    ("No", "no"),
    ("No, it is not sarcastic.", "no"),
    ("It is not sarcastic.", "no"),
    ("definitely not sarcastic", "no"),
    ("It is definitely not sarcastic.", "no"),
    ("The post isn't sarcastic at all; the person means it.", "no"),
    ("It doesn't seem to be sarcastic.", "no"),
    ("I don't think it is sarcastic.", "no"),
    ("The post is sincere.", "no"),
    ("The caption is genuine, not sarcastic.", "no"),
    ("It's funny, but not sarcastic.", "no"),
    ("It seems sincere, but it is actually sarcastic.", "yes"),
    ("Although the words sound positive, the post is sarcastic.", "yes"),
    ("False.", "no"),
    ("Never.", "no"),
    ("Not sure.", None),
    ("I'm not sure if it is sarcastic.", None),
    ("Hard to tell.", None),
    ("It's hard to tell whether the post is sarcastic.", None),
    ("I can't say for certain.", None),
    ("It could be sarcastic.", None),
    ("Possibly sarcastic.", None),
    ("The person is wearing a hat.", None),
]


@pytest.mark.parametrize("answer, label", EMO_C)
def test_emo_c(answer, label):
    assert parse_answer(answer, "emo_c", EKMAN) == label


@pytest.mark.parametrize("answer, label", EMO_O)
def test_emo_o(answer, label):
    assert parse_answer(answer, "emo_o", label_space=OPEN_SPACE) == label


@pytest.mark.parametrize("answer, label", INTENT)
def test_intent(answer, label):
    assert parse_answer(answer, "intent", INTENTS) == label


@pytest.mark.parametrize("task, answer, label",
                         [("hate", *c) for c in HATE] + [("humor", *c) for c in HUMOR]
                         + [("sarcasm", *c) for c in SARCASM])
def test_binary(task, answer, label):
    assert parse_answer(answer, task, YES_NO) == label
    assert parse_answer(answer, task, None) == label  # no options: canonical yes / no


def test_table_is_large_and_covers_every_task():
    tables = {"emo_c": EMO_C, "emo_o": EMO_O, "intent": INTENT, "hate": HATE, "humor": HUMOR,
              "sarcasm": SARCASM}
    assert sum(map(len, tables.values())) >= 140
    for task, rows in tables.items():
        labels = [label for _, label in rows]
        assert None in labels and len(set(labels)) >= 3, task  # both parsed and unparseable answers


def test_open_set_without_label_space_keeps_hedges_unparseable():
    assert parse_answer("mostly happy", "emo_o") == "joy"
    assert parse_answer("Unsure.", "emo_o") is None  # a one-word hedge is not a free-form label
    assert parse_answer("nostalgia", "emo_o") == "nostalgia"
    assert parse_answer("It is not joy but sadness.", "emo_o") == "sadness"

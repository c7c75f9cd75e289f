"""Free-text model answer -> EmoBench label.

EmoBench's answer-mapping rules are not published; this is our rule set (a reimplementation choice):

1. normalise both answer and options (lowercase, apostrophes dropped, other punctuation -> space, articles
   a/an/the dropped, whitespace collapsed);
2. exact match with an option;
3. close-set: the single option named in the answer (whole words, longest option first so "not hateful" is
   not also read as "hateful"; a match right after a negation such as "not sad" does not count). Two or more
   options named -> ambiguous -> unparseable. Options may also be named through the synonym table
   ("happy" names the option "joy"; "happiness" as an option is matched by "glad");
4. binary tasks (hate, humor, sarcasm): the first yes-word or no-word decides ("it is not sarcastic" -> no),
   mapped onto the record's options when they are not plain yes/no;
5. open-set (emo_o): the single emotion named in the answer, through the synonym table, among the task's
   label space when one is known.

The synonym table maps a word to a canonical emotion; users extend it with a JSON file `{"word": "label"}`.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from data_pipeline.records import EMOTION_TASKS

EMOBENCH_TASKS: tuple[str, ...] = EMOTION_TASKS  # the six sub-tasks scored in the EmoBench mean
BINARY_TASKS: frozenset[str] = frozenset({"hate", "humor", "sarcasm"})
OPEN_SET_TASKS: frozenset[str] = frozenset({"emo_o"})

_ARTICLES = frozenset({"a", "an", "the"})
_NEGATIONS = frozenset({"not", "no", "never", "isnt", "arent", "wasnt", "werent", "doesnt", "dont", "didnt",
                        "non", "without", "hardly"})

YES_WORDS: frozenset[str] = frozenset({
    "yes", "yeah", "yep", "yup", "true", "correct", "indeed", "definitely", "certainly",
    "sarcastic", "sarcasm", "ironic", "irony", "humorous", "humor", "humour", "funny", "joke", "joking",
    "amusing", "hilarious", "hateful", "hate", "hatred", "offensive", "hostile", "racist", "sexist",
})
NO_WORDS: frozenset[str] = frozenset({
    "no", "nope", "nah", "false", "incorrect", "none", "neither", *_NEGATIONS,
})

# word -> canonical emotion. Canonical names follow Ekman-6 + neutral and the FI/Emotion6 label sets.
DEFAULT_SYNONYMS: Mapping[str, str] = {
    "happy": "joy", "happiness": "joy", "joyful": "joy", "joyous": "joy", "glad": "joy", "cheerful": "joy",
    "delighted": "joy", "pleased": "joy",
    "sad": "sadness", "unhappy": "sadness", "sorrow": "sadness", "sorrowful": "sadness",
    "depressed": "sadness", "upset": "sadness", "grief": "sadness", "melancholy": "sadness",
    "gloomy": "sadness",
    "angry": "anger", "mad": "anger", "furious": "anger", "rage": "anger", "irritated": "anger",
    "annoyed": "anger", "annoyance": "anger",
    "scared": "fear", "afraid": "fear", "fearful": "fear", "frightened": "fear", "terrified": "fear",
    "anxious": "fear", "anxiety": "fear", "nervous": "fear",
    "surprised": "surprise", "shocked": "surprise", "astonished": "surprise", "amazed": "surprise",
    "startled": "surprise",
    "disgusted": "disgust", "disgusting": "disgust", "revolted": "disgust", "repulsed": "disgust",
    "grossed": "disgust",
    "calm": "neutral", "indifferent": "neutral", "expressionless": "neutral",
    "amused": "amusement", "excited": "excitement", "content": "contentment", "contented": "contentment",
    "peaceful": "contentment", "awed": "awe", "awestruck": "awe",
}

_WORD = re.compile(r"[a-z0-9]+")


def normalize(text: str) -> str:
    """Lowercase, drop apostrophes, punctuation -> space, drop articles, collapse whitespace."""
    text = text.lower().replace("'", "").replace("\u2019", "")
    words = _WORD.findall(text)
    return " ".join(w for w in words if w not in _ARTICLES)


def load_synonyms(path: str | Path, base: Mapping[str, str] = DEFAULT_SYNONYMS) -> dict[str, str]:
    """Returns `base` extended (and overridden) by the JSON object `{"word": "label", ...}` at `path`."""
    path = Path(path)
    try:
        extra = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}: synonym file is not valid JSON: {e.msg}") from e
    if not isinstance(extra, dict):
        raise ValueError(f"{path}: synonym file must hold a JSON object word -> label, "
                         f"got {type(extra).__name__}")
    table = dict(base)
    for word, label in extra.items():
        if not isinstance(label, str) or not normalize(word) or not normalize(label):
            raise ValueError(f"{path}: key {word!r}: synonym must map a non-empty word to a non-empty "
                             f"label string, got {label!r}")
        table[normalize(word)] = normalize(label)
    return table


def _find(phrase: str, text: str) -> list[tuple[int, int]]:
    """Character spans of whole-word occurrences of `phrase` in normalised `text`."""
    return [m.span() for m in re.finditer(rf"(?<![a-z0-9]){re.escape(phrase)}(?![a-z0-9])", text)]


def _negated(text: str, start: int) -> bool:
    prev = text[:start].split()
    return bool(prev) and prev[-1] in _NEGATIONS


@dataclasses.dataclass(frozen=True)
class AnswerParser:
    """Maps answers to labels with a given synonym table (see the module docstring for the rules)."""

    synonyms: Mapping[str, str] = dataclasses.field(default_factory=lambda: dict(DEFAULT_SYNONYMS))

    def concept(self, phrase: str) -> str:
        """Canonical emotion of a normalised word/phrase (itself when not in the table)."""
        return self.synonyms.get(phrase, phrase)

    def named(self, text: str, candidates: Sequence[str]) -> list[str]:
        """Candidates (normalised) named in normalised `text`, directly or via a synonym, in first-seen order.

        Longer candidates claim their words first so that "not hateful" does not also name "hateful"; a
        candidate right after a negation word is skipped unless it starts with one itself.
        """
        found: dict[str, int] = {}
        taken = [False] * len(text)
        for cand in sorted(set(candidates), key=len, reverse=True):
            for s, e in _find(cand, text):
                if any(taken[s:e]):
                    continue
                taken[s:e] = [True] * (e - s)
                if cand.split()[0] in _NEGATIONS or not _negated(text, s):
                    found.setdefault(cand, s)
        by_concept: dict[str, list[str]] = {}
        for cand in candidates:
            by_concept.setdefault(self.concept(cand), []).append(cand)
        for m in _WORD.finditer(text):
            if taken[m.start()] or _negated(text, m.start()):
                continue
            for cand in by_concept.get(self.concept(m.group()), []):
                found.setdefault(cand, m.start())
        return sorted(found, key=found.__getitem__)

    def parse(self, answer: str, task: str, options: Sequence[str] | None = None,
              label_space: Iterable[str] | None = None) -> str | None:
        """Returns the label (an element of `options` / `label_space` as given) or None when unparseable.

        Args:
          answer: the model's free-text answer.
          task: EmoBench task name; decides binary / open-set handling.
          options: the record's options (close-set); None or empty for open-set questions.
          label_space: labels an open-set answer may map to (e.g. every gold label of the task); None = any
            canonical emotion from the synonym table, or the answer itself when it is one word.
        """
        text = normalize(answer)
        if not text:
            return None
        options = list(options or [])
        norm_options = {normalize(o): o for o in options}
        if text in norm_options:
            return norm_options[text]
        if task in BINARY_TASKS:
            return self._binary(text, norm_options)
        if norm_options and task not in OPEN_SET_TASKS:
            named = self.named(text, list(norm_options))
            return norm_options[named[0]] if len(named) == 1 else None
        return self._open_set(text, label_space)

    def _binary(self, text: str, norm_options: Mapping[str, str]) -> str | None:
        if norm_options:
            named = self.named(text, list(norm_options))
            if len(named) == 1:
                return norm_options[named[0]]
            if len(named) > 1 and not set(named) <= {"yes", "no"}:
                return None
        polarity = _polarity(text)
        if polarity is None:
            return None
        if not norm_options:
            return polarity
        matching = [orig for norm, orig in norm_options.items() if _polarity(norm) == polarity]
        return matching[0] if len(matching) == 1 else None

    def _open_set(self, text: str, label_space: Iterable[str] | None) -> str | None:
        if label_space is not None:
            norm_space = {normalize(label): label for label in label_space}
            named = self.named(text, list(norm_space))
            return norm_space[named[0]] if len(named) == 1 else None
        words = [m for m in _WORD.finditer(text) if not _negated(text, m.start())]
        concepts = {self.synonyms[m.group()] for m in words if m.group() in self.synonyms}
        concepts |= {m.group() for m in words if m.group() in set(self.synonyms.values())}
        if len(concepts) == 1:
            return concepts.pop()
        if not concepts and len(text.split()) == 1:
            return text
        return None


def _polarity(text: str) -> str | None:
    """"yes" / "no" from the first polarity word of a normalised text, else None."""
    for word in text.split():
        if word in NO_WORDS:
            return "no"
        if word in YES_WORDS:
            return "yes"
    return None


_DEFAULT_PARSER = AnswerParser()


def parse_answer(answer: str, task: str, options: Sequence[str] | None = None, *,
                 label_space: Iterable[str] | None = None, parser: AnswerParser | None = None) -> str | None:
    """Label named by `answer` for `task` (see the module docstring), or None when unparseable."""
    return (parser or _DEFAULT_PARSER).parse(answer, task, options, label_space)

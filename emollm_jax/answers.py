"""Free-text model answer -> EmoBench label.

EmoBench's answer-mapping rules are not published; this is our rule set (a reimplementation choice), written
for answers as chat models phrase them ("Definitely not sarcastic.", "It is not joy but sadness.", "Hard to
tell."), not only for one-word answers:

1. normalise both answer and options (lowercase, apostrophes dropped, articles a/an/the dropped, whitespace
   collapsed); clause punctuation (. , ; : ! ? brackets) is kept as a break `|` for the negation rule below.
   A few idioms are rewritten first: "no doubt" -> "definitely", "rather than X" / "instead of X" -> "not X";
2. exact match with an option;
3. a hedge ("not sure", "hard to tell", "can't say", "maybe", "could be", ... `HEDGES`) makes any answer
   unparseable: a model that did not commit is not given the point for either label;
4. negation: a word is negated when a negation word (`NEGATIONS`: not, no, never, isn't, doesn't, can't,
   neither/nor, without, ...) stands up to five words before it in the same clause, with no "but", "and",
   "however", "rather", ... in between: "definitely not sarcastic", "doesn't seem to be happy" and "not at all
   funny" are negated; in "not joy but sadness" only "joy" is;
5. close-set (emo_c, intent): the single option named and not negated (whole words, longest option first so
   "not hateful" is not also read as "hateful"; options may be named through the synonym table: "happy"
   names "joy"; an option "to eat" is also named by "eat"). Two or more options named -> unparseable;
6. binary tasks (hate, humor, sarcasm): every claim in the answer is collected: answer words (yes, yeah,
   correct, definitely / no, nope, false; "definitely not" is a no) and the task's own words (sarcasm:
   sarcastic, ironic / sincere, genuine; ...), each flipped when negated. All claims agree -> that label;
   they disagree -> the claims after the last "but" / "however" / "actually" decide, and a concessive
   clause ("although it looks sincere, ...") does not count; still disagreeing -> unparseable. The label is
   mapped onto the record's options when they are not plain yes/no ("not hateful");
7. open-set (emo_o): the single emotion named and not negated, through the synonym table, among the task's
   label space when one is known ("mostly happy" -> joy, "could be anger or fear" -> unparseable).

The synonym table maps a word to a canonical emotion; users extend it with a JSON file `{"word": "label"}`.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from data_pipeline import storage
from data_pipeline.records import EMOTION_TASKS

EMOBENCH_TASKS: tuple[str, ...] = EMOTION_TASKS  # the six sub-tasks scored in the EmoBench mean
BINARY_TASKS: frozenset[str] = frozenset({"hate", "humor", "sarcasm"})
OPEN_SET_TASKS: frozenset[str] = frozenset({"emo_o"})

BREAK = "|"  # clause break token in a normalised answer
NEG_WINDOW = 5  # a negation reaches this many words ahead within its clause

_ARTICLES = frozenset({"a", "an", "the"})
NEGATIONS: frozenset[str] = frozenset({
    "not", "no", "never", "isnt", "arent", "wasnt", "werent", "doesnt", "dont", "didnt", "cant", "cannot",
    "couldnt", "wouldnt", "shouldnt", "wont", "aint", "non", "without", "hardly", "barely", "neither", "nor",
    "nothing", "none", "lacks", "lacking",
})
# Words that end a negation's reach: "not joy but sadness", "not sad and rather angry".
_SCOPE_ENDS = frozenset({"but", "however", "although", "though", "whereas", "yet", "rather", "instead",
                         "while", "and", "actually"})
_CONTRAST = frozenset({"but", "however", "actually", "yet", "instead", "rather"})  # later claims win
_CONCESSIVE = frozenset({"although", "though", "while", "despite"})  # this clause's claims do not count
# (phrase, replacement) on normalised words, before anything else.
_IDIOMS: tuple[tuple[str, str], ...] = (
    ("no doubt", "definitely"), ("without doubt", "definitely"), ("undoubtedly", "definitely"),
    ("of course not", "definitely not"), ("of course", "definitely"), ("not only", ""),
    ("dont think so", "no"), ("do not think so", "no"), ("dont believe so", "no"),
    ("do not believe so", "no"), ("think so", "yes"), ("believe so", "yes"),
    ("rather than", "not"), ("instead of", "not"), ("as opposed to", "not"), ("other than", "not"),
)
HEDGES: tuple[str, ...] = (
    "not sure", "unsure", "not certain", "uncertain", "hard to tell", "hard to say", "hard to determine",
    "difficult to tell", "difficult to say", "difficult to determine", "impossible to tell",
    "impossible to say", "impossible to determine", "cant tell", "cannot tell", "cant say", "cannot say",
    "cant determine", "cannot determine", "cant be sure", "cannot be sure", "cannot be determined",
    "cant be determined", "unable to tell", "unable to say", "unable to determine", "no way to tell",
    "no way to know", "unclear", "not clear", "ambiguous", "dont know", "do not know", "no idea", "maybe",
    "perhaps", "possibly", "might be", "may be", "could be", "either way", "it depends", "depends on",
    "open to interpretation", "not enough information", "insufficient information",
)
# Explicit answers. "definitely not" / "absolutely not" are no's: an affirmation followed by a negation.
ANSWER_YES: frozenset[str] = frozenset({
    "yes", "yeah", "yep", "yup", "yea", "true", "correct", "indeed", "definitely", "certainly", "absolutely",
    "surely", "sure", "affirmative",
})
ANSWER_NO: frozenset[str] = frozenset({"no", "nope", "nah", "false", "incorrect", "negative"})
# An answer made of a negation and these words only ("Not at all.", "Not really.") is a no.
_EMPTY_AFTER_NEGATION = frozenset({"at", "all", "really", "quite", "particularly", "so", "very", "much",
                                   "exactly", "in", "slightest", "way", "any", "definitely"})
# Per binary task: words that say the label is yes, and words that say it is no.
TASK_WORDS: Mapping[str, tuple[frozenset[str], frozenset[str]]] = {
    "sarcasm": (
        frozenset({"sarcastic", "sarcasm", "sarcastically", "ironic", "irony", "ironically", "mocking",
                   "mockery", "facetious"}),
        frozenset({"sincere", "sincerely", "genuine", "genuinely", "earnest", "straightforward"}),
    ),
    "humor": (
        frozenset({"funny", "humorous", "humor", "humour", "joke", "joking", "jokes", "amusing", "hilarious",
                   "comedic", "comical", "witty", "laughable"}),
        frozenset({"unfunny", "humorless", "humourless", "serious", "boring", "dull"}),
    ),
    "hate": (
        frozenset({"hateful", "hate", "hatred", "offensive", "hostile", "racist", "sexist", "bigoted",
                   "derogatory", "discriminatory", "demeaning", "insulting", "abusive", "slur", "xenophobic",
                   "homophobic", "dehumanizing", "contempt"}),
        frozenset({"harmless", "benign", "inoffensive", "respectful", "friendly", "innocent"}),
    ),
}

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
_TOKEN = re.compile(r"[a-z0-9]+|[.,;:!?()\[\]\n]+")


def normalize(text: str) -> str:
    """Lowercase, drop apostrophes, punctuation -> space, drop articles, collapse whitespace."""
    text = text.lower().replace("'", "").replace("\u2019", "")
    words = _WORD.findall(text)
    return " ".join(w for w in words if w not in _ARTICLES)


def clauses(text: str) -> str:
    """`normalize`, but clause punctuation becomes a `|` token and the idioms are rewritten:
    "No doubt, it's sarcastic." -> "definitely | its sarcastic |"."""
    text = text.lower().replace("'", "").replace("\u2019", "")
    tokens: list[str] = []
    for tok in _TOKEN.findall(text):
        if not tok[0].isalnum():
            if tokens and tokens[-1] != BREAK:
                tokens.append(BREAK)
        elif tok not in _ARTICLES:
            tokens.append(tok)
    out = " ".join(tokens)
    for phrase, repl in _IDIOMS:
        out = re.sub(rf"(?<![a-z0-9]){phrase}(?![a-z0-9])", repl, out)
    return " ".join(out.split())


def load_synonyms(path: str | Path, base: Mapping[str, str] = DEFAULT_SYNONYMS) -> dict[str, str]:
    """Returns `base` extended (and overridden) by the JSON object `{"word": "label", ...}` at `path`."""
    path = storage.path(path)
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
    """Whether the word at character `start` of `text` (a `clauses` string) is negated (rule 4)."""
    for word in reversed(text[:start].split()[-NEG_WINDOW:]):
        if word == BREAK or word in _SCOPE_ENDS:
            return False
        if word in NEGATIONS:
            return True
    return False


def hedged(text: str) -> bool:
    """Whether a normalised answer contains a hedge (`HEDGES`)."""
    return any(_find(h, text) for h in HEDGES)


def _bare_forms(option: str) -> list[str]:
    """Other ways an answer names an option: "to eat" is also named by "eat"."""
    words = option.split()
    return [" ".join(words[1:])] if len(words) > 1 and words[0] == "to" else []


@dataclasses.dataclass(frozen=True)
class AnswerParser:
    """Maps answers to labels with a given synonym table (see the module docstring for the rules)."""

    synonyms: Mapping[str, str] = dataclasses.field(default_factory=lambda: dict(DEFAULT_SYNONYMS))

    def concept(self, phrase: str) -> str:
        """Canonical emotion of a normalised word/phrase (itself when not in the table)."""
        return self.synonyms.get(phrase, phrase)

    def named(self, text: str, candidates: Sequence[str]) -> list[str]:
        """Candidates (normalised) named in `text` (`normalize` or `clauses` form), directly, by a bare form
        or via a synonym, not negated, in first-seen order.

        Longer phrases claim their words first so that "not hateful" does not also name "hateful"; a
        candidate starting with a negation word is never itself negated.
        """
        forms = [(form, cand) for cand in set(candidates) for form in [cand, *_bare_forms(cand)]]
        found: dict[str, int] = {}
        taken = [False] * len(text)
        for form, cand in sorted(forms, key=lambda fc: len(fc[0]), reverse=True):
            for s, e in _find(form, text):
                if any(taken[s:e]):
                    continue
                taken[s:e] = [True] * (e - s)
                if form.split()[0] in NEGATIONS or not _negated(text, s):
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
        if not normalize(answer):
            return None
        options = list(options or [])
        norm_options = {normalize(o): o for o in options}
        if normalize(answer) in norm_options:
            return norm_options[normalize(answer)]
        text = clauses(answer)
        if hedged(text):
            return None
        if task in BINARY_TASKS:
            return self._binary(text, task, norm_options)
        if norm_options and task not in OPEN_SET_TASKS:
            named = self.named(text, list(norm_options))
            return norm_options[named[0]] if len(named) == 1 else None
        return self._open_set(text, label_space)

    def _binary(self, text: str, task: str, norm_options: Mapping[str, str]) -> str | None:
        plain = set(norm_options) <= {"yes", "no"}
        if not plain:
            named = self.named(text, list(norm_options))
            if len(named) == 1:
                return norm_options[named[0]]
            if len(named) > 1:
                return None
        polarity = binary_polarity(text, task)
        if polarity is None or not norm_options:
            return polarity
        matching = [orig for norm, orig in norm_options.items() if binary_polarity(norm, task) == polarity]
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
        plain = normalize(text)
        if not concepts and len(plain.split()) == 1 and plain not in NEGATIONS:
            return plain
        return None


def _claims(words: list[str], task: str) -> list[tuple[int, str]]:
    """(word index, "yes" | "no") of every claim a binary answer makes (rule 6)."""
    yes_words, no_words = TASK_WORDS.get(task, (frozenset(), frozenset()))
    if task not in TASK_WORDS:
        yes_words = frozenset().union(*(y for y, _ in TASK_WORDS.values()))
        no_words = frozenset().union(*(n for _, n in TASK_WORDS.values()))
    text = " ".join(words)
    starts = [m.start() for m in re.finditer(r"\S+", text)]
    out = []
    for i, word in enumerate(words):
        nxt = words[i + 1] if i + 1 < len(words) else BREAK
        clause_start = i == 0 or words[i - 1] == BREAK
        if word in ANSWER_YES:
            out.append((i, "no" if nxt in NEGATIONS or _negated(text, starts[i]) else "yes"))
        elif word in ANSWER_NO:
            out.append((i, "no"))
        elif word in NEGATIONS and clause_start and _only_emphasis(words[i + 1:]):
            out.append((i, "no"))  # "Not at all." / "Never."
        elif word in yes_words or word in no_words:
            flipped = _negated(text, starts[i])
            out.append((i, "yes" if (word in yes_words) != flipped else "no"))
    return out


def _only_emphasis(rest: list[str]) -> bool:
    clause = rest[: rest.index(BREAK)] if BREAK in rest else rest
    return all(w in _EMPTY_AFTER_NEGATION for w in clause)


def binary_polarity(text: str, task: str = "") -> str | None:
    """"yes" / "no" that a `clauses`-normalised answer gives a binary `task`, or None (rule 6)."""
    words = text.split()
    claims = _claims(words, task)
    if not claims:
        return None
    if len({p for _, p in claims}) == 1:
        return claims[0][1]
    counted = [(i, p) for i, p in claims if not _in_concession(words, i)]
    contrast = [i for i, w in enumerate(words) if w in _CONTRAST]
    if contrast:
        counted = [(i, p) for i, p in counted if i > contrast[-1]]
    polarities = {p for _, p in counted}
    return polarities.pop() if len(polarities) == 1 else None


def _in_concession(words: list[str], i: int) -> bool:
    """Whether word `i` lies in a clause opened by "although" / "though" / "while" / "despite"."""
    for word in reversed(words[:i]):
        if word == BREAK:
            return False
        if word in _CONCESSIVE:
            return True
    return False


_DEFAULT_PARSER = AnswerParser()


def parse_answer(answer: str, task: str, options: Sequence[str] | None = None, *,
                 label_space: Iterable[str] | None = None, parser: AnswerParser | None = None) -> str | None:
    """Label named by `answer` for `task` (see the module docstring), or None when unparseable."""
    return (parser or _DEFAULT_PARSER).parse(answer, task, options, label_space)

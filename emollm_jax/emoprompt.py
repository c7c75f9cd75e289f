"""EmoPrompt: a bank of worked exemplars (question, reasoning, answer) per task, prepended to a question.

The paper's EmoPrompt is unpublished beyond "guides MLLMs to reason about emotions in the correct direction";
this is our reading (a reimplementation choice): M text-only exemplars of the same task, each a question, a
short rationale and the gold answer, placed before the question at train and test time (M = 0 turns it off).

Bank file (JSON): `{"version": 1, "tasks": {"emo_c": [{"id", "question", "reasoning", "answer"}, ...]}}`.

CLI: `python -m emollm_jax.emoprompt build --records train.jsonl --out bank.json --per-task 8`
(rationales from the records' `rationale` fields) or `... --teacher DIR` (a model this project loads writes a
rationale for the gold answer: an HF decoder or Llava directory, or the conversion CLI's output, whose
tokenizer is then read from the HF directory it was converted from unless `--teacher-tokenizer` names one).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import math
import os
import re
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from data_pipeline import storage
from emollm_jax.configuration import Section

BANK_VERSION = 1
STRATEGIES = ("fixed", "similar")
_MARKERS = re.compile(r"<image>|<video>")
_WORD = re.compile(r"[a-z0-9]+")


@dataclasses.dataclass(frozen=True)
class EmoPromptConfig(Section):
    """`config.emoprompt`: M worked exemplars before each question (`num_exemplars`; 0 = off)."""

    bank: str = ""           # bank JSON; empty: built once from the training rationales into the workdir
    num_exemplars: int = 0
    strategy: str = "fixed"  # fixed | similar
    per_task: int = 16       # exemplars per task in a bank built from the training rationales

    def check(self) -> None:
        if self.num_exemplars < 0:
            self.fail("num_exemplars", "must be >= 0 (0: off)")
        if self.strategy not in STRATEGIES:
            self.fail("strategy", f"unknown strategy; expected one of {STRATEGIES}")
        if self.per_task <= 0:
            self.fail("per_task", "must be positive")


@dataclasses.dataclass(frozen=True)
class Exemplar:
    id: str
    question: str
    reasoning: str
    answer: str


Bank = dict[str, list[Exemplar]]


def load_bank(path: str | os.PathLike) -> Bank:
    """Reads and validates a bank file; errors name the file, task, exemplar index and key."""
    path = storage.path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}: EmoPrompt bank is not valid JSON: {e.msg}") from e
    if not isinstance(data, dict) or data.get("version") != BANK_VERSION:
        version = data.get("version") if isinstance(data, dict) else None
        raise ValueError(f"{path}: EmoPrompt bank must be an object with \"version\": {BANK_VERSION}, "
                         f"got version {version!r}")
    tasks = data.get("tasks")
    if not isinstance(tasks, dict):
        raise ValueError(f"{path}: key 'tasks' must map task name -> list of exemplars")
    bank: Bank = {}
    for task, items in tasks.items():
        if not isinstance(items, list):
            raise ValueError(f"{path}: tasks.{task} must be a list, got {type(items).__name__}")
        bank[task] = []
        for i, item in enumerate(items):
            where = f"{path}: tasks.{task}[{i}]"
            if not isinstance(item, dict):
                raise ValueError(f"{where} must be an object")
            for key in ("id", "question", "reasoning", "answer"):
                if not isinstance(item.get(key), str):
                    raise ValueError(f"{where}: key {key!r} must be a string, got {item.get(key)!r}")
            bank[task].append(Exemplar(item["id"], item["question"], item["reasoning"], item["answer"]))
    return bank


def save_bank(bank: Mapping[str, Sequence[Exemplar]], path: str | os.PathLike) -> None:
    """Writes the bank atomically (tmp file + rename, or one upload), so a crash never leaves half a bank."""
    data = {"version": BANK_VERSION,
            "tasks": {task: [dataclasses.asdict(e) for e in items] for task, items in bank.items()}}
    storage.write_text(path, json.dumps(data, indent=1, ensure_ascii=False) + "\n")


def question_text(record: Mapping[str, Any]) -> str:
    """The record's first human turn without media markers (exemplars are text-only)."""
    for turn in record.get("conversations", []):
        if turn.get("from") == "human":
            return strip_markers(turn.get("value", ""))
    return ""


def strip_markers(text: str) -> str:
    """Removes `<image>`/`<video>`: a marker in an exemplar would be expanded into visual tokens."""
    return " ".join(_MARKERS.sub(" ", text).split())


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def _tfidf_ranking(questions: Sequence[str], query: str) -> list[int]:
    """Indices of `questions` by decreasing TF-IDF cosine with `query`; ties keep bank order."""
    docs = [collections.Counter(_words(q)) for q in questions]
    df = collections.Counter(w for d in docs for w in d)
    n = len(docs)
    idf = {w: math.log((1 + n) / (1 + c)) + 1.0 for w, c in df.items()}

    def vec(counts: Mapping[str, int]) -> dict[str, float]:
        v = {w: c * idf[w] for w, c in counts.items() if w in idf}
        norm = math.sqrt(sum(x * x for x in v.values())) or 1.0
        return {w: x / norm for w, x in v.items()}

    q = vec(collections.Counter(_words(query)))
    scores = [sum(x * q.get(w, 0.0) for w, x in vec(d).items()) for d in docs]
    return sorted(range(n), key=lambda i: (-scores[i], i))


def select(bank: Mapping[str, Sequence[Exemplar]], task: str, m: int, *, strategy: str = "fixed",
           query_text: str | None = None, exclude_id: str | None = None) -> list[Exemplar]:
    """M exemplars of `task`: the bank's first M ("fixed") or the M most similar questions ("similar").

    `exclude_id` drops the query record itself (a training record must not see its own answer).
    Deterministic: ties keep bank order. Fewer than M when the task has fewer exemplars.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"EmoPrompt strategy must be one of {STRATEGIES}, got {strategy!r}")
    if m < 0:
        raise ValueError(f"EmoPrompt m must be >= 0, got {m}")
    pool = [e for e in bank.get(task, ()) if e.id != exclude_id]
    if m == 0 or not pool:
        return []
    if strategy == "similar":
        if query_text is None:
            raise ValueError("EmoPrompt strategy 'similar' needs query_text")
        pool = [pool[i] for i in _tfidf_ranking([e.question for e in pool], query_text)]
    return pool[:m]


def render(exemplars: Iterable[Exemplar]) -> str:
    """Text placed before the question; "" when there are no exemplars.

    Example: Which emotion ...?
    Reasoning: The mouth curves up ...
    Answer: joy
    """
    blocks = [f"Example: {strip_markers(e.question)}\nReasoning: {e.reasoning.strip()}\nAnswer: {e.answer}"
              for e in exemplars]
    return "\n\n".join(blocks) + "\n\n" if blocks else ""


class PromptPrefix:
    """record -> EmoPrompt prefix, for `data_pipeline`'s `prompt_prefix` hook; excludes the record itself.

    A class (not a closure) so Grain worker processes can unpickle it.
    """

    def __init__(self, bank: Mapping[str, Sequence[Exemplar]], m: int, strategy: str = "fixed"):
        if strategy not in STRATEGIES:
            raise ValueError(f"EmoPrompt strategy must be one of {STRATEGIES}, got {strategy!r}")
        self.bank = {task: list(items) for task, items in bank.items()}
        self.m = m
        self.strategy = strategy

    def __call__(self, record: Mapping[str, Any]) -> str:
        if self.m == 0:
            return ""
        chosen = select(self.bank, record.get("task", ""), self.m, strategy=self.strategy,
                        query_text=question_text(record), exclude_id=record.get("id"))
        return render(chosen)


def prefix_fn(bank: Mapping[str, Sequence[Exemplar]], m: int,
              strategy: str = "fixed") -> Callable[[Mapping[str, Any]], str]:
    """record -> EmoPrompt prefix (a picklable `PromptPrefix`)."""
    return PromptPrefix(bank, m, strategy)


# ----------------------------------------------------------------------------------------------- building


def _answer(record: Mapping[str, Any]) -> str:
    if record.get("label") is not None:
        return str(record["label"])
    gpt = [t.get("value", "") for t in record.get("conversations", []) if t.get("from") == "gpt"]
    return gpt[0] if gpt else ""


def build_from_records(records: Iterable[Mapping[str, Any]], per_task: int, *,
                       rationale: Callable[[Mapping[str, Any]], str | None] | None = None) -> Bank:
    """First `per_task` records of each task (file order) that have a rationale, as exemplars.

    `rationale(record)` overrides the record's own `rationale` field (e.g. a teacher model's explanation).
    """
    bank: Bank = {}
    for record in records:
        task = record.get("task")
        if not task or len(bank.setdefault(task, [])) >= per_task:
            continue
        reason = rationale(record) if rationale is not None else record.get("rationale")
        answer = _answer(record)
        if not reason or not answer:
            continue
        reason = " ".join(reason.split())
        bank[task].append(Exemplar(str(record["id"]), question_text(record), reason, answer))
    return {task: items for task, items in bank.items() if items}


def teacher_prompt(record: Mapping[str, Any]) -> str:
    """Asks a teacher to justify the gold answer (the paper's "user query + ground truth -> reasoning")."""
    return (f"Question: {question_text(record)}\nThe correct answer is: {_answer(record)}.\n"
            "Explain in one or two sentences which cues lead to this answer.\nReasoning:")


def load_teacher(teacher: str | os.PathLike, tokenizer: str | os.PathLike | None = None) -> tuple[Any, Any]:
    """(model, tokenizer) of a teacher: an HF directory (a decoder or a Llava) or the conversion CLI's output
    (`python -m emollm_jax.convert --hf_dir ... --out DIR`). The tokenizer: `tokenizer`, else the teacher's
    directory, else (converted) the HF directory it was converted from."""
    from data_pipeline.text import load_tokenizer
    from emollm_jax.convert.orbax_params import load_model_dir, source_dir

    if tokenizer is None:
        tokenizer = teacher if _has_tokenizer(teacher) else source_dir(teacher)
    if not _has_tokenizer(tokenizer):
        raise ValueError(f"--teacher {teacher}: no tokenizer in {tokenizer}; pass --teacher-tokenizer DIR")
    model = load_model_dir(teacher, dtype="float32")
    if model is None:
        raise ValueError(f"--teacher {teacher}: neither an HF model directory (config.json) nor a converted "
                         "checkpoint (convert.json)")
    return model, load_tokenizer(tokenizer)


def _has_tokenizer(path: str | os.PathLike) -> bool:
    path = Path(path)
    return path.is_file() or (path / "tokenizer.json").is_file() or (path / "tokenizer_config.json").is_file()


def teacher_rationale_fn(teacher: str | os.PathLike, *, tokenizer: str | os.PathLike | None = None,
                         max_new_tokens: int = 64) -> Callable[[Mapping[str, Any]], str | None]:
    """record -> rationale from a teacher `load_teacher` reads (text-only prompt, greedy)."""
    import numpy as np

    from emollm_jax.generate import generate

    model, tok = load_teacher(teacher, tokenizer)

    def fn(record: Mapping[str, Any]) -> str | None:
        ids = ([tok.bos_id] if tok.bos_id is not None else []) + tok.encode(teacher_prompt(record))
        input_ids = np.asarray([ids], np.int32)
        out = generate(model, input_ids, np.ones_like(input_ids), max_new_tokens=max_new_tokens,
                       eos_id=tok.eos_id, pad_id=tok.pad_id)
        new = [int(t) for t in np.asarray(out)[0]]
        if tok.eos_id in new:
            new = new[: new.index(tok.eos_id)]
        text = tok.decode(new, skip_special_tokens=True).strip()
        return text or None

    return fn


def from_config(config: Any, data_root: str | os.PathLike,
                workdir: str | os.PathLike) -> Callable[[Mapping[str, Any]], str] | None:
    """The run's `prompt_prefix` (None when `config.emoprompt.num_exemplars` is 0), for train, eval, predict.

    Uses `config.emoprompt.bank` when set; otherwise builds `<workdir>/emoprompt_bank.json` once from the
    rationales of `<data_root>/<config.data.train_split>.jsonl` (`config.emoprompt.per_task` per task, 16 by
    default) and reuses it. `config.emoprompt.strategy`: "fixed" (default) or "similar".
    """
    ep = config.emoprompt
    m = int(ep.num_exemplars)
    if m <= 0:
        return None
    if ep.bank:
        bank_path = storage.path(ep.bank)
        if not bank_path.exists():
            raise FileNotFoundError(f"config.emoprompt.bank={ep.bank}: no such file")
    else:
        bank_path = storage.path(workdir) / "emoprompt_bank.json"
        _build_default_bank_once(config, storage.path(data_root), bank_path)
    return prefix_fn(load_bank(bank_path), m, ep.get("strategy", "fixed"))


def _build_default_bank_once(config: Any, data_root: Path, bank_path: Path) -> None:
    """Process 0 builds the bank from the training rationales if it is missing; in a multi-process run the
    others wait at a barrier (every process calls this), so no process reads a half-written or absent file."""
    import jax

    if jax.process_index() == 0 and not bank_path.exists():
        records = _read_records(data_root / f"{config.data.train_split}.jsonl")
        bank = build_from_records(records, int(config.emoprompt.get("per_task", 16)))
        if not bank:
            raise ValueError(f"config.emoprompt.num_exemplars={config.emoprompt.num_exemplars}, but no "
                             f"record of {data_root} has a rationale to build a bank from; "
                             "set config.emoprompt.bank")
        save_bank(bank, bank_path)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("emollm_jax.emoprompt_bank")


def _read_records(path: str | os.PathLike) -> list[dict[str, Any]]:
    from data_pipeline.records import iter_records

    return [record for _, record in iter_records(path)]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m emollm_jax.emoprompt",
                                     description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="build a bank from labelled records")
    build.add_argument("--records", required=True, help="training records (.json list or .jsonl)")
    build.add_argument("--out", required=True, help="bank file to write")
    build.add_argument("--per-task", type=int, default=8, help="exemplars per task")
    build.add_argument("--teacher", default=None,
                       help="a model that writes the rationales: an HF dir (decoder or Llava) or the output "
                            "of python -m emollm_jax.convert")
    build.add_argument("--teacher-tokenizer", default=None,
                       help="the teacher's tokenizer (default: the teacher dir, or the HF dir it was "
                            "converted from)")
    build.add_argument("--max-new-tokens", type=int, default=64)
    args = parser.parse_args(argv)
    if args.per_task <= 0:
        parser.error(f"--per-task must be > 0, got {args.per_task}")
    records = _read_records(args.records)
    rationale = None
    if args.teacher:
        try:
            rationale = teacher_rationale_fn(args.teacher, tokenizer=args.teacher_tokenizer,
                                             max_new_tokens=args.max_new_tokens)
        except ValueError as e:
            parser.error(str(e))
    bank = build_from_records(records, args.per_task, rationale=rationale)
    if not bank:
        print(f"{args.records}: no record has a rationale (and no --teacher given); nothing written",
              file=sys.stderr)
        return 1
    save_bank(bank, args.out)
    counts = ", ".join(f"{t}: {len(v)}" for t, v in sorted(bank.items()))
    print(f"wrote {args.out} ({counts})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Answers for one image/video + question, or for every line of a JSONL file (`main.py --mode=predict`).

The prompt is built exactly as in evaluation (configured chat template, EmoPrompt exemplars when
`config.emoprompt.num_exemplars` > 0), so a prediction here equals the evaluated one for the same record.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from emollm_jax.answers import parse_answer

IMAGE_MARKER, VIDEO_MARKER = "<image>", "<video>"


class RequestError(ValueError):
    """A predict request that cannot be answered; the message names the flag."""


def check_request(*, question: str | None = None, jsonl: str | None = None, image: str | None = None,
                  video: str | None = None) -> None:
    """Refuses what `run_predict` could not answer, naming the flag, before any model is loaded: neither or
    both of a question and a JSONL file, an empty question, media that does not exist."""
    if (question is None) == (jsonl is None):
        raise RequestError("predict: give either --question (with --image/--video) or --jsonl")
    if jsonl is not None and (image or video):
        raise RequestError("predict: --image/--video belong in the JSONL lines in --jsonl mode")
    if image and video:
        raise RequestError("predict: give --image or --video, not both")
    if question is not None and not question.strip():
        raise RequestError(f"--question {question!r}: empty; ask a question")
    for flag, value in (("--image", image), ("--video", video), ("--jsonl", jsonl)):
        if value and not Path(value).exists():
            raise RequestError(f"{flag} {value}: no such file or directory")


def make_record(question: str, *, image: str | None = None, video: str | None = None, task: str | None = None,
                options: Sequence[str] | None = None, rid: str = "predict-0") -> dict[str, Any]:
    """An EmoBench-style record for a free question; prepends the media marker when the question lacks it.
    Media paths are kept as given (relative to the data root `predict_records` is called with)."""
    if image and video:
        raise ValueError("give an image or a video, not both")
    marker = IMAGE_MARKER if image else VIDEO_MARKER if video else None
    if marker and marker not in question:
        question = f"{marker}\n{question}"
    record: dict[str, Any] = {"id": rid, "task": task or "free",
                              "conversations": [{"from": "human", "value": question}]}
    if image:
        record["image"] = image
    if video:
        record["video"] = video
    if options:
        record["options"] = list(options)
    return record


def _from_jsonl_line(obj: Mapping[str, Any], line: int, path: Path) -> dict[str, Any]:
    """A JSONL line is a full EmoBench record or `{"id"?, "question", "image"|"video"?, "task"?, "options"?}`;
    media paths are relative to the JSONL file's directory."""
    rid = str(obj.get("id", f"{path.stem}-{line}"))
    if "conversations" in obj:
        return dict(obj, id=rid)
    if not isinstance(obj.get("question"), str):
        raise ValueError(f"{path}:{line}: needs a 'question' string or a 'conversations' list")
    if not obj["question"].strip():
        raise ValueError(f"{path}:{line}: 'question' is empty")
    return make_record(obj["question"], image=obj.get("image"), video=obj.get("video"), task=obj.get("task"),
                       options=obj.get("options"), rid=rid)


def read_requests(path: str | os.PathLike) -> list[dict[str, Any]]:
    path = Path(path)
    records = []
    for line, text in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not text.strip():
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{line}: malformed JSON at column {e.colno}: {e.msg}") from e
        if not isinstance(obj, dict):
            raise ValueError(f"{path}:{line}: expected a JSON object, got {type(obj).__name__}")
        records.append(_from_jsonl_line(obj, line, path))
    return records


def predict_records(config: Any, workdir: str | os.PathLike, records: Sequence[Mapping[str, Any]],
                    data_root: str | os.PathLike, *, model: Any, tokenizer: Any,
                    progress: bool = False) -> list[dict[str, Any]]:
    """One output row per record: id, task, question, answer and, for EmoBench tasks, the parsed label."""
    from emollm_jax import emoprompt, evaluate

    prefix = emoprompt.from_config(config, config.data.root or Path(workdir) / "data", workdir)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "requests.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
        batches, total = evaluate.record_batches(config, path, data_root, tokenizer, model,
                                                 prompt_prefix=prefix, validate="none")
        metas, answers = evaluate.generate_answers(
            model, batches, tokenizer, max_new_tokens=int(config.eval.max_new_tokens),
            stop_ids=evaluate.stop_ids(config, tokenizer), total=total, desc="predict", progress=progress)
    by_id = {str(r["id"]): r for r in records}
    parser = evaluate.answer_parser(config)
    rows = []
    for meta, answer in zip(metas, answers, strict=True):
        record = by_id[str(meta["id"])]
        task = record.get("task", "free")
        parsed = None
        if task != "free":
            parsed = parse_answer(answer, task, record.get("options"), parser=parser)
        rows.append({"id": meta["id"], "task": task, "question": record["conversations"][0]["value"],
                     "answer": answer, "parsed": parsed})
    return rows


def run_predict(config: Any, workdir: str | os.PathLike, *, image: str | None = None,
                video: str | None = None, question: str | None = None, jsonl: str | None = None,
                task: str | None = None,
                init_from: str | None = None, out: str | None = None, model: Any = None,
                tokenizer: Any = None) -> list[dict[str, Any]]:
    """Prints each answer (and parsed label when a task is known); JSONL mode also writes the rows to `out`
    (default `<workdir>/predict/outputs.jsonl`). Weights: `init_from`, else the latest checkpoint."""
    from emollm_jax import eval_report, evaluate, experiment

    check_request(question=question, jsonl=jsonl, image=image, video=video)
    setup = experiment.prepare_data(config, workdir)
    tokenizer = tokenizer or experiment.load_tokenizer(setup)
    if model is None:
        model, _ = evaluate.load_model(config, workdir, tokenizer, init_from)
    if jsonl:
        records, root = read_requests(jsonl), Path(jsonl).resolve().parent
    else:
        media = Path(image or video).resolve() if (image or video) else None
        root = media.parent if media else Path.cwd()
        name = media.name if media else None
        records = [make_record(question, image=name if image else None, video=name if video else None,
                               task=task)]
    rows = predict_records(config, workdir, records, root, model=model, tokenizer=tokenizer,
                           progress=bool(jsonl))
    for row in rows:
        label = f"  [{row['task']}: {row['parsed']}]" if row["task"] != "free" else ""
        print(f"{row['id']}: {row['answer']}{label}")
    if jsonl:
        out_path = Path(out) if out else Path(workdir) / "predict" / "outputs.jsonl"
        eval_report.write_jsonl(out_path, rows)
        print(f"wrote {len(rows)} predictions to {out_path}")
    return rows

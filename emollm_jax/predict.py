"""Answers for one image/video/sound + question, or for every line of a JSONL file (`main.py --mode=predict`).

The prompt is built exactly as in evaluation (configured chat template, EmoPrompt exemplars when
`config.emoprompt.num_exemplars` > 0), so a prediction here equals the evaluated one for the same record.
A model with an audio tower also hears: `--audio FILE` (alone or beside an image or video), and a `--video`
file's own sound track when it has one.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from data_pipeline import storage
from data_pipeline.paths import FROM_VIDEO
from data_pipeline.records import AUDIO_MARKER, IMAGE_MARKER, VIDEO_MARKER
from emollm_jax.answers import parse_answer


class RequestError(ValueError):
    """A predict request that cannot be answered; the message names the flag."""


def check_request(*, question: str | None = None, jsonl: str | None = None, image: str | None = None,
                  video: str | None = None, audio: str | None = None) -> None:
    """Refuses what `run_predict` could not answer, naming the flag, before any model is loaded: neither or
    both of a question and a JSONL file, an empty question, media that does not exist, a video's own sound
    track without a video."""
    if (question is None) == (jsonl is None):
        raise RequestError("predict: give either --question (with --image/--video/--audio) or --jsonl")
    if jsonl is not None and (image or video or audio):
        raise RequestError("predict: --image/--video/--audio belong in the JSONL lines in --jsonl mode")
    if image and video:
        raise RequestError("predict: give --image or --video, not both")
    if audio == FROM_VIDEO and not video:
        raise RequestError(f"--audio {FROM_VIDEO}: needs --video")
    if question is not None and not question.strip():
        raise RequestError(f"--question {question!r}: empty; ask a question")
    sound = audio if audio != FROM_VIDEO else None
    for flag, value in (("--image", image), ("--video", video), ("--audio", sound), ("--jsonl", jsonl)):
        if value and not Path(value).exists():
            raise RequestError(f"{flag} {value}: no such file or directory")


def make_record(question: str, *, image: str | None = None, video: str | None = None,
                audio: str | None = None, task: str | None = None, options: Sequence[str] | None = None,
                rid: str = "predict-0") -> dict[str, Any]:
    """An EmoBench-style record for a free question; prepends the media markers the question lacks. Media
    paths are kept as given (relative to the data root `predict_records` is called with); `audio` is a sound
    file or "from_video" (the video's own track)."""
    if image and video:
        raise ValueError("give an image or a video, not both")
    if audio == FROM_VIDEO and not video:
        raise ValueError(f"audio={FROM_VIDEO!r} needs a video")
    marker = IMAGE_MARKER if image else VIDEO_MARKER if video else None
    if audio and AUDIO_MARKER not in question:
        question = f"{AUDIO_MARKER}\n{question}"
    if marker and marker not in question:
        question = f"{marker}\n{question}"
    record: dict[str, Any] = {"id": rid, "task": task or "free",
                              "conversations": [{"from": "human", "value": question}]}
    if image:
        record["image"] = image
    if video:
        record["video"] = video
    if audio:
        record["audio"] = audio
    if options:
        record["options"] = list(options)
    return record


def _from_jsonl_line(obj: Mapping[str, Any], line: int, path: Path) -> dict[str, Any]:
    """A JSONL line is a full EmoBench record or `{"id"?, "question", "image"|"video"?, "audio"?, "task"?,
    "options"?}`; media paths are relative to the JSONL file's directory."""
    rid = str(obj.get("id", f"{path.stem}-{line}"))
    if "conversations" in obj:
        return dict(obj, id=rid)
    if not isinstance(obj.get("question"), str):
        raise ValueError(f"{path}:{line}: needs a 'question' string or a 'conversations' list")
    if not obj["question"].strip():
        raise ValueError(f"{path}:{line}: 'question' is empty")
    return make_record(obj["question"], image=obj.get("image"), video=obj.get("video"),
                       audio=obj.get("audio"), task=obj.get("task"), options=obj.get("options"), rid=rid)


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

    prefix = emoprompt.from_config(config, config.data.root or storage.join(workdir, "data"), workdir)
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


def _question_record(question: str, *, image: str | None, video: str | None, audio: str | None,
                     task: str | None, hears: bool) -> tuple[dict[str, Any], Path]:
    """(record, data root) of one question about local files: paths relative to their common directory. A
    model that hears (`hears`) gets a video file's own sound track too, when it has one and no `audio` is
    given."""
    from data_pipeline.audio import sound_problem

    if audio and not hears:
        raise ValueError("predict: --audio, but the model has no audio tower "
                         "(config.model.audio.kind='none')")
    files = [Path(p).resolve() for p in (image, video, audio) if p]
    root = Path(os.path.commonpath([f.parent for f in files])) if files else Path.cwd()
    rel = {name: str(Path(p).resolve().relative_to(root)) if p else None
           for name, p in (("image", image), ("video", video), ("audio", audio))}
    own_track = video and Path(video).is_file() and sound_problem(Path(video).resolve()) is None
    if hears and not audio and own_track:
        rel["audio"] = FROM_VIDEO
    return make_record(question, task=task, **rel), root


def run_predict(config: Any, workdir: str | os.PathLike, *, image: str | None = None,
                video: str | None = None, audio: str | None = None, question: str | None = None,
                jsonl: str | None = None, task: str | None = None,
                init_from: str | None = None, out: str | None = None, model: Any = None,
                tokenizer: Any = None) -> list[dict[str, Any]]:
    """Prints each answer (and parsed label when a task is known); JSONL mode also writes the rows to `out`
    (default `<workdir>/predict/outputs.jsonl`). Weights: `init_from`, else the latest checkpoint, in
    `config.eval.dtype`."""
    from emollm_jax import eval_report, evaluate, experiment

    check_request(question=question, jsonl=jsonl, image=image, video=video, audio=audio)
    setup = experiment.prepare_data(config, workdir)
    tokenizer = tokenizer or experiment.load_tokenizer(setup)
    if model is None:
        model, _ = evaluate.load_model(config, workdir, tokenizer, init_from)  # in config.eval.dtype
    else:
        model = evaluate.eval_model(config, model)
    if jsonl:
        records, root = read_requests(jsonl), Path(jsonl).resolve().parent
    else:
        record, root = _question_record(question, image=image, video=video, audio=audio, task=task,
                                        hears=model.config.audio is not None)
        records = [record]
    rows = predict_records(config, workdir, records, root, model=model, tokenizer=tokenizer,
                           progress=bool(jsonl))
    for row in rows:
        label = f"  [{row['task']}: {row['parsed']}]" if row["task"] != "free" else ""
        print(f"{row['id']}: {row['answer']}{label}")
    if jsonl:
        out_path = out or storage.join(workdir, "predict", "outputs.jsonl")
        eval_report.write_jsonl(out_path, rows)
        print(f"wrote {len(rows)} predictions to {out_path}")
    return rows

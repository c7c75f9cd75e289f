"""EmoBench record schema, file readers and validation.

A record is one LLaVA-style conversation about zero or one piece of media:

```json
{"id": "emo_c-000123", "task": "emo_c",
 "image": "images/x.png",                       # or a list of image paths (several images), or absent/null
 "video": "videos/y.mp4" | "videos/y/" | ["videos/y/0.png", ...],   # a file, a frame directory or frame list
 "conversations": [{"from": "human", "value": "<image>\\nQuestion ... Options: a, b, c."},
                   {"from": "gpt", "value": "joy"}],
 "label": "joy", "options": ["anger", "joy"], "rationale": "The mouth curves up ...", "meta": {...}}
```

Records read back from ArrayRecord carry the media themselves instead of (or besides) the paths, and the
bytes win: `image_bytes: bytes` (one encoded PNG/JPEG), `video_frames_bytes: list[bytes]` (encoded frames of
one video), `video_bytes: bytes` (one encoded container, e.g. mp4). `data_pipeline.media` decodes them.

Media markers: each image is one `<image>` marker in the human turns; a video is one `<video>` marker.
A record holds images or a video, not both. Paths are relative to a data root and may not leave it.

Sound: `"audio": "clips/z.wav"` (any file PyAV decodes: wav, flac, mp3, ogg, or a video container's audio
track) or `"audio": "from_video"` (the sound track of the record's own video file, or of its `video_bytes`),
with one `<audio>` marker in the human turns. It goes beside an image, a video or neither (audio only).
"""

from __future__ import annotations

import collections
import json
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from data_pipeline import storage
from data_pipeline.paths import DEFAULT_MAX_IMAGE_PIXELS, FROM_VIDEO, media_paths, resolve_media_path

TASKS = ("emo_c", "emo_o", "intent", "hate", "humor", "sarcasm", "caption", "vqa")
EMOTION_TASKS = TASKS[:6]
OBJECTIVE_TASKS = TASKS[6:]
REQUIRED_FIELDS = ("id", "task", "conversations")
OPTIONAL_FIELDS = (
    "image", "video", "audio", "label", "options", "rationale", "meta",
    "image_bytes", "video_frames_bytes", "video_bytes",
    "model",  # LLaVA's instruction files carry it (often empty) on their text-only records; not read
)
ALLOWED_FIELDS = REQUIRED_FIELDS + OPTIONAL_FIELDS
IMAGE_MARKER = "<image>"
VIDEO_MARKER = "<video>"
AUDIO_MARKER = "<audio>"


class RecordError(Exception):
    """One problem with one record: `file:line: field: message`.

    `line` is the 1-based line for JSONL and the 1-based record number for a JSON list (0 when unknown).
    """

    def __init__(self, source: str | os.PathLike, line: int, field: str, message: str):
        self.source = str(source)
        self.line = int(line)
        self.field = field
        self.message = message
        super().__init__(str(self))

    def __str__(self) -> str:
        return f"{self.source}:{self.line}: {self.field}: {self.message}"

    def __reduce__(self):  # picklable across Grain worker processes
        return (RecordError, (self.source, self.line, self.field, self.message))


class ErrorBudgetExceeded(RuntimeError):
    """Raised by `ErrorBudget` when more records were skipped than allowed."""


class ErrorBudget:
    """Counts records skipped as invalid; raises with a summary once more than `max_errors` are skipped.

    The count belongs to the process that skips (the pipeline skips in its calling process, after the Grain
    workers); `get_state` / `set_state` carry it through a checkpoint. Every skipped record is reported with
    `report(error)` (by default nothing; the pipeline logs a warning), so none is dropped quietly.
    """

    def __init__(self, max_errors: int, *, keep: int = 5,
                 report: Callable[[RecordError], None] | None = None):
        if max_errors < 0:
            raise ValueError(f"max_errors must be >= 0, got {max_errors}")
        self.max_errors = max_errors
        self.keep = keep
        self.report = report
        self.skipped = 0
        self.by_field: collections.Counter[str] = collections.Counter()
        self.examples: list[RecordError] = []

    def skip(self, errors: Sequence[RecordError]) -> None:
        """Records one skipped record with its `errors`; raises `ErrorBudgetExceeded` past the budget."""
        self.skipped += 1
        for err in errors:
            self.by_field[err.field] += 1
        if len(self.examples) < self.keep:
            self.examples.extend(errors[: self.keep - len(self.examples)])
        if self.report is not None:
            for err in errors:
                self.report(err)
        if self.skipped > self.max_errors:
            raise ErrorBudgetExceeded(self.summary())

    def summary(self) -> str:
        fields = ", ".join(f"{k}: {v}" for k, v in self.by_field.most_common())
        lines = [f"{self.skipped} invalid records skipped (budget {self.max_errors}); "
                 f"problems by field: {fields}"]
        lines += [f"  {e}" for e in self.examples]
        return "\n".join(lines)

    def get_state(self) -> dict[str, Any]:
        """The count so far, JSON-serialisable (part of the data iterator's checkpointed state)."""
        return {"skipped": self.skipped, "by_field": dict(self.by_field)}

    def set_state(self, state: Mapping[str, Any]) -> None:
        """Continues from a saved count (replaces the current one)."""
        self.skipped = int(state["skipped"])
        self.by_field = collections.Counter({str(k): int(v) for k, v in state.get("by_field", {}).items()})


class FirstSeen:
    """The first place each record id was seen; a later record with the same id is an error naming both."""

    def __init__(self) -> None:
        self._first: dict[str, tuple[str, int]] = {}

    def check(self, record_id: Any, source: str | os.PathLike, line: int) -> RecordError | None:
        """None for a new id (or a record without a string id: the schema check reports that)."""
        if not isinstance(record_id, str):
            return None
        first = self._first.setdefault(record_id, (str(source), int(line)))
        if first == (str(source), int(line)):
            return None
        return RecordError(source, line, "id",
                           f"duplicate id {record_id!r}; first used at {first[0]}:{first[1]}")


def iter_records(
    path: str | os.PathLike, *, errors: list[RecordError] | None = None
) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yields `(line, record)` from `.jsonl` (an object per line) or `.json` (a list of objects).

    A malformed line (bad JSON, or bytes that are not UTF-8) raises `RecordError` naming the line; if `errors`
    is a list, the error is appended there and the line skipped instead, so a validator can report every bad
    line and still read the rest of the file. `path` may be a URL (`gs://...`).
    """
    path = storage.path(path)

    def fail(line: int, field: str, message: str) -> None:
        err = RecordError(path, line, field, message)
        if errors is None:
            raise err
        errors.append(err)

    if path.suffix == ".jsonl":
        with path.open("rb") as f:
            for lineno, raw in enumerate(f, start=1):
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    fail(lineno, "encoding", not_utf8(raw, e))
                    continue
                if not text.strip():
                    continue
                try:
                    obj = json.loads(text)
                except json.JSONDecodeError as e:
                    fail(lineno, "json", f"malformed JSON at column {e.colno}: {e.msg}")
                    continue
                if not isinstance(obj, dict):
                    fail(lineno, "json", f"expected a JSON object, got {type(obj).__name__}")
                    continue
                yield lineno, obj
    elif path.suffix == ".json":
        raw = path.read_bytes()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            line_start = raw.rfind(b"\n", 0, e.start) + 1
            fail(raw.count(b"\n", 0, e.start) + 1, "encoding",
                 f"{not_utf8(raw[line_start:], e, line_start)}; a .json list cannot be read past it")
            return
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            fail(e.lineno, "json", f"malformed JSON at column {e.colno}: {e.msg}")
            return
        if not isinstance(data, list):
            fail(1, "json", f"a .json file must hold a list of records, got {type(data).__name__}")
            return
        for index, obj in enumerate(data, start=1):
            if not isinstance(obj, dict):
                fail(index, "json", f"expected a JSON object, got {type(obj).__name__}")
                continue
            yield index, obj
    else:
        raise ValueError(f"{path}: unsupported record file type {path.suffix!r} (expected .json or .jsonl)")


def not_utf8(line: bytes, error: UnicodeDecodeError, offset: int = 0) -> str:
    """A `UnicodeDecodeError` for a person: the bad byte and its column in `line` (the line's bytes, which
    start `offset` bytes into what was decoded)."""
    start = error.start - offset
    return f"not UTF-8: byte 0x{line[start]:02x} at column {start + 1}; re-save the file as UTF-8"


def media_layout(record: Mapping[str, Any], num_frames: int) -> list[int]:
    """Frames per media item, in marker order: `[1] * n_images` or `[num_frames]` for a video, `[]` for text.

    The pipeline builds `frame_media` from it: `np.repeat(np.arange(len(layout)), layout)`.
    """
    if record.get("video_bytes") is not None or record.get("video_frames_bytes") is not None:
        return [num_frames]
    if record.get("image_bytes") is not None:
        return [1]
    kind, paths = media_paths(record)
    if kind == "image":
        return [1] * len(paths)
    if kind == "video":
        return [num_frames]
    return []


def validate_record(
    record: Any,
    *,
    source: str | os.PathLike,
    line: int,
    data_root: str | os.PathLike | None = None,
    num_frames: int | None = None,
    max_text_chars: int | None = None,
    length_fn: Callable[[str], int] | None = None,
    max_tokens: int | None = None,
    check_media: bool = True,
    max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
) -> list[RecordError]:
    """Returns every problem found in `record` (empty list = valid).

    Cheap checks (schema, task, conversation order, markers, options/label, paths escaping `data_root`, text
    length) always run; `check_media=True` also decodes every image and frame completely (so a truncated JPEG
    fails here; an image over `max_image_pixels` pixels is refused) and counts the frames of video files
    (PyAV). A frame directory's frames must resolve inside `data_root` too.
    Text length: `max_text_chars` bounds the characters of all turns joined by newlines; `length_fn` with
    `max_tokens` bounds `length_fn(joined text)` (pass one that applies the chat template and counts the
    visual tokens, if the budget should include them). Past either bound the answer would be truncated.
    """
    errs: list[RecordError] = []

    def err(field: str, message: str) -> None:
        errs.append(RecordError(source, line, field, message))

    if not isinstance(record, Mapping):
        err("record", f"expected a JSON object, got {type(record).__name__}")
        return errs

    for name in REQUIRED_FIELDS:
        if name not in record:
            err(name, "missing required field")
    unknown = sorted(set(record) - set(ALLOWED_FIELDS))
    for name in unknown:
        err(name, f"unknown field; allowed fields are {', '.join(ALLOWED_FIELDS)}")

    if "id" in record and (not isinstance(record["id"], str) or not record["id"]):
        err("id", f"must be a non-empty string, got {record['id']!r}")
    task = record.get("task")
    if "task" in record and task not in TASKS:
        err("task", f"unknown task {task!r}; expected one of {', '.join(TASKS)}")

    texts = _check_conversations(record.get("conversations"), err) if "conversations" in record else None
    _check_label(record, err)
    for name in ("rationale",):
        if record.get(name) is not None and not isinstance(record[name], str):
            err(name, f"must be a string, got {type(record[name]).__name__}")
    if record.get("meta") is not None and not isinstance(record["meta"], dict):
        err("meta", f"must be an object, got {type(record['meta']).__name__}")

    kind, paths = _check_media_fields(record, err)
    if texts is not None:
        _check_markers(texts, record, kind, len(paths), err)
        _check_audio_markers(texts, record.get("audio") is not None, err)
        _check_length(texts, max_text_chars, length_fn, max_tokens, err)
    if paths:
        _check_media_paths(kind, paths, data_root, num_frames, check_media, max_image_pixels, err)
    if record.get("audio") is not None:
        _check_audio(record, kind, paths, data_root, check_media, err)
    return errs


def _check_conversations(conv: Any, err) -> list[tuple[str, str]] | None:
    """Checks the turn structure; returns `[(role, text), ...]` for the later checks, or None if unusable."""
    if not isinstance(conv, list) or not conv:
        err("conversations", "must be a non-empty list of {from, value} turns")
        return None
    turns: list[tuple[str, str]] = []
    for i, turn in enumerate(conv):
        where = f"conversations[{i}]"
        if not isinstance(turn, Mapping) or "from" not in turn or "value" not in turn:
            err(where, "each turn must be an object with 'from' and 'value'")
            return None
        extra = sorted(set(turn) - {"from", "value"})
        if extra:
            err(where, f"unknown keys {extra}; a turn has only 'from' and 'value'")
        expected = "human" if i % 2 == 0 else "gpt"
        if turn["from"] != expected:
            err(f"{where}.from", f"expected {expected!r} (turns alternate human/gpt, starting with human), "
                f"got {turn['from']!r}")
        value = turn["value"]
        if not isinstance(value, str) or not value.strip():
            err(f"{where}.value", "must be a non-empty string")
            value = value if isinstance(value, str) else ""
        turns.append((expected, value))
    if len(conv) % 2:
        err("conversations", f"has {len(conv)} turns; it must end with a 'gpt' answer")
    return turns


def _check_label(record: Mapping[str, Any], err) -> None:
    options = record.get("options")
    if options is not None:
        if (not isinstance(options, list) or not options
                or not all(isinstance(o, str) and o.strip() for o in options)):
            err("options", "must be a non-empty list of non-empty strings")
            options = None
        elif len(set(options)) != len(options):
            err("options", f"has duplicates: {options}")
    label = record.get("label")
    if label is None:
        return
    if not isinstance(label, str) or not label.strip():
        err("label", f"must be a non-empty string, got {label!r}")
    elif options is not None and label not in options:
        err("label", f"{label!r} is not among the options {options}")


def _check_media_fields(record: Mapping[str, Any], err) -> tuple[str | None, list[str]]:
    if record.get("image") is not None and record.get("video") is not None:
        err("video", "a record holds either 'image' or 'video', not both")
    for name in ("image", "video"):
        value = record.get(name)
        if value is None:
            continue
        if isinstance(value, str):
            if not value:
                err(name, "empty path")
        elif not isinstance(value, list) or not value or not all(isinstance(p, str) and p for p in value):
            err(name, "must be a path or a non-empty list of paths")
            return name, []
    if record.get("image_bytes") is not None and not isinstance(record["image_bytes"], bytes | bytearray):
        err("image_bytes", f"must be bytes, got {type(record['image_bytes']).__name__}")
    if record.get("video_bytes") is not None and not isinstance(record["video_bytes"], bytes | bytearray):
        err("video_bytes", f"must be bytes, got {type(record['video_bytes']).__name__}")
    frames = record.get("video_frames_bytes")
    if frames is not None and (not isinstance(frames, list) or not all(isinstance(b, bytes | bytearray)
                                                                         for b in frames)):
        err("video_frames_bytes", "must be a list of encoded frames (bytes)")
    kind, paths = media_paths(record)
    if kind is None:
        if record.get("image_bytes") is not None:
            kind = "image"
        elif record.get("video_bytes") is not None or frames is not None:
            kind = "video"
    return kind, [p for p in paths if p]


def _check_markers(texts, record, kind: str | None, n_paths: int, err) -> None:
    human = "".join(t for role, t in texts if role == "human")
    for i, (role, text) in enumerate(texts):
        if role == "gpt" and (IMAGE_MARKER in text or VIDEO_MARKER in text):
            err(f"conversations[{i}].value", "media markers may appear only in human turns")
    n_img, n_vid = human.count(IMAGE_MARKER), human.count(VIDEO_MARKER)
    want_img = (n_paths or 1) if kind == "image" else 0
    want_vid = 1 if kind == "video" else 0
    if (n_img, n_vid) != (want_img, want_vid):
        what = {"image": f"{want_img} image(s)", "video": "1 video", None: "no media"}[kind]
        err("conversations", f"found {n_img} {IMAGE_MARKER} and {n_vid} {VIDEO_MARKER} markers but the "
            f"record has {what}; expected {want_img} {IMAGE_MARKER} and {want_vid} {VIDEO_MARKER}")


def _check_audio_markers(texts, has_sound: bool, err) -> None:
    """One `<audio>` marker in the human turns when the record has a sound, none otherwise."""
    for i, (role, text) in enumerate(texts):
        if role == "gpt" and AUDIO_MARKER in text:
            err(f"conversations[{i}].value", "media markers may appear only in human turns")
    n = "".join(t for role, t in texts if role == "human").count(AUDIO_MARKER)
    if n != int(has_sound):
        what = "a sound ('audio')" if has_sound else "no sound (no 'audio' field)"
        err("conversations", f"found {n} {AUDIO_MARKER} markers but the record has {what}; expected "
            f"{int(has_sound)} {AUDIO_MARKER}")


def sound_path(record: Mapping[str, Any]) -> str | None:
    """The path a record's sound is read from (its `audio` file, or its video file for "from_video"), or
    None when it has none or it is embedded (`video_bytes`)."""
    value = record.get("audio")
    if value == FROM_VIDEO:
        video = record.get("video")
        return video if record.get("video_bytes") is None and isinstance(video, str) else None
    return value if isinstance(value, str) else None


def _check_audio(record: Mapping[str, Any], kind: str | None, paths: list[str], data_root, check_media: bool,
                 err) -> None:
    """`audio` is a path or "from_video" (then the record has one video file, or `video_bytes`); the path
    stays under the data root; with `check_media`, the file's sound decodes (`audio.sound_problem`)."""
    value = record["audio"]
    if not isinstance(value, str) or not value:
        err("audio", f"must be a path or {FROM_VIDEO!r} (one sound per record), got {value!r}")
        return
    if value == FROM_VIDEO and record.get("video_bytes") is None:
        if kind != "video" or len(paths) != 1 or not isinstance(record.get("video"), str):
            video = record.get("video")
            what = "a frame list" if isinstance(video, list) else f"no video file ({kind or 'no media'})"
            err("audio", f"{FROM_VIDEO!r} takes the sound track of the record's video file, and it has "
                f"{what}")
            return
    path = sound_path(record)
    if path is None:
        return
    try:
        full = resolve_media_path(path, data_root)
    except ValueError as e:
        if value != FROM_VIDEO:  # a video path escaping the root is reported under `video` already
            err("audio", str(e))
        return
    if not check_media:
        return
    from data_pipeline import audio  # here, not at the top: schema-only checks need no decoder

    if full.is_dir():
        problem = "is a frame directory, which has no sound track"
    else:
        problem = audio.sound_problem(full)
    if problem:
        err("audio", f"{path}: {problem}" + (f" ({FROM_VIDEO})" if value == FROM_VIDEO else ""))


def _check_length(texts, max_chars, length_fn, max_tokens, err) -> None:
    if max_chars is None and length_fn is None:
        return
    joined = "\n".join(t for _, t in texts)
    if max_chars is not None and len(joined) > max_chars:
        err("conversations", f"text is {len(joined)} characters > max_text_chars {max_chars}; the answer "
            "would be truncated")
    if length_fn is not None:
        if max_tokens is None:
            raise ValueError("length_fn needs max_tokens")
        n = int(length_fn(joined))
        if n > max_tokens:
            err("conversations", f"text is {n} tokens > max_tokens {max_tokens}; the answer would be "
                "truncated")


def _check_media_paths(kind, paths, data_root, num_frames, check_media, max_pixels, err) -> None:
    """Paths must stay under the data root and a frame list must hold `num_frames` frames; with
    `check_media`, every file must also decode (`media.image_problem`, `media.video_problem`)."""
    resolved: list[Path] = []
    for p in paths:
        try:
            resolved.append(resolve_media_path(p, data_root))
        except ValueError as e:
            err(kind, str(e))
    if len(resolved) != len(paths):
        return
    if kind == "video" and len(paths) > 1 and num_frames is not None and len(paths) < num_frames:
        err("video", f"has {len(paths)} frames, fewer than the {num_frames} frames asked for")
    if not check_media:
        return
    from data_pipeline import media  # here, not at the top: schema-only checks need neither PIL nor numpy

    root = data_root if data_root is not None else "."
    if kind == "video" and len(paths) == 1:
        problems = [media.video_problem(resolved[0], num_frames, root, max_pixels)]
    else:
        problems = [media.image_problem(full, max_pixels) for full in resolved]
    for p, problem in zip(paths, problems, strict=True):
        if problem:
            err(kind, f"{p}: {problem}")

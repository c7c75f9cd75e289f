"""Converts JSON/JSONL records into ArrayRecord shards with the media bytes embedded.

    python -m data_pipeline.convert_arrayrecord IN.jsonl --data-root DIR --out PREFIX --num-shards N \
        [--task T] [--max-errors E]

writes `PREFIX-00000-of-0000N.array_record`, ... (records in input order, contiguous blocks per shard), and
beside each shard `<shard>.index.json` (task, id and origin of its records, so a pipeline can filter by task
without decoding media). Images become `image_bytes`, frame lists / frame directories `video_frames_bytes`,
video files `video_bytes` (raw container bytes); path fields are dropped. Every media file, each frame of a
frame directory included, must resolve inside `--data-root` after its symlinks are followed. `--task` fills
the task of records that carry none (LLaVA's own files). A record id used twice is an error. Shards are
written under temporary names and renamed only when all are complete, so a failed run leaves no partial
dataset. Read back with `sources.ArrayRecordSource(PREFIX)`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

from data_pipeline.media import KIND_FIELD, read_media_bytes
from data_pipeline.records import (
    TASKS,
    ErrorBudget,
    ErrorBudgetExceeded,
    FirstSeen,
    RecordError,
    iter_records,
    validate_record,
)
from data_pipeline.sources import INDEX_SUFFIX, encode_record


def embed_media(record: dict, data_root: str | os.PathLike) -> dict:
    """The record with its media files read into bytes fields and the path fields removed."""
    kind, blobs = read_media_bytes(record, data_root)
    out = {k: v for k, v in record.items() if k not in ("image", "video")}
    if kind:
        out[KIND_FIELD[kind]] = blobs if kind == "frames" else blobs[0]
    return out


def _payloads(inputs: Sequence[str | os.PathLike], data_root: str | os.PathLike, budget: ErrorBudget,
              task: str | None) -> tuple[list[bytes], list[list]]:
    """Encoded records and their index rows `[task, id, origin]`; invalid records go to `budget`."""
    payloads: list[bytes] = []
    rows: list[list] = []
    ids = FirstSeen()
    for path in inputs:
        parse_errors: list[RecordError] = []
        for line, record in iter_records(path, errors=parse_errors):
            if task and "task" not in record:
                record = {**record, "task": task}
            errors = validate_record(record, source=path, line=line, data_root=data_root, check_media=False)
            duplicate = ids.check(record.get("id"), path, line)
            errors += [duplicate] if duplicate else []
            if not errors:
                try:
                    origin = f"{path}:{line}"
                    payloads.append(encode_record(embed_media(record, data_root), origin=origin))
                    rows.append([record["task"], record["id"], origin])
                    continue
                except (OSError, ValueError) as e:
                    errors = [RecordError(path, line, "media", str(e))]
            budget.skip(errors)
        for err in parse_errors:
            budget.skip([err])
    return payloads, rows


def convert(
    inputs: Sequence[str | os.PathLike],
    out_prefix: str | os.PathLike,
    *,
    data_root: str | os.PathLike,
    num_shards: int = 1,
    max_errors: int = 0,
    task: str | None = None,
) -> tuple[list[str], int]:
    """Writes the shards and their index files; returns (shard paths, records written).

    Invalid records (schema, duplicate id, unreadable media or media outside `data_root`) are skipped against
    `max_errors`; past it `ErrorBudgetExceeded` is raised and nothing is written.
    """
    from array_record.python.array_record_module import ArrayRecordWriter

    if num_shards < 1:
        raise ValueError(f"--num-shards must be >= 1, got {num_shards}")
    if task is not None and task not in TASKS:
        raise ValueError(f"--task {task!r}: expected one of {', '.join(TASKS)}")
    budget = ErrorBudget(max_errors)
    payloads, rows = _payloads(inputs, data_root, budget, task)
    out_prefix = os.fspath(out_prefix)
    os.makedirs(os.path.dirname(os.path.abspath(out_prefix)), exist_ok=True)
    finals = [f"{out_prefix}-{k:05d}-of-{num_shards:05d}.array_record" for k in range(num_shards)]
    outputs = [f for final in finals for f in (final, final + INDEX_SUFFIX)]
    temps = [os.path.join(os.path.dirname(os.path.abspath(f)), f".tmp-{os.getpid()}-{os.path.basename(f)}")
             for f in outputs]
    try:
        for k in range(num_shards):
            lo, hi = k * len(payloads) // num_shards, (k + 1) * len(payloads) // num_shards
            writer = ArrayRecordWriter(temps[2 * k], "group_size:1")
            for payload in payloads[lo:hi]:
                writer.write(payload)
            writer.close()
            with open(temps[2 * k + 1], "w", encoding="utf-8") as f:
                json.dump({"records": rows[lo:hi]}, f, ensure_ascii=False)
        for tmp, final in zip(temps, outputs, strict=True):
            os.replace(tmp, final)
    finally:
        for tmp in temps:
            if os.path.exists(tmp):
                os.unlink(tmp)
    if budget.skipped:
        print(budget.summary(), file=sys.stderr)
    return finals, len(payloads)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("inputs", nargs="+", help=".json / .jsonl record files")
    parser.add_argument("--data-root", required=True, help="directory the media paths are relative to")
    parser.add_argument("--out", required=True, help="output prefix, e.g. data/emobench-train")
    parser.add_argument("--num-shards", type=int, default=1)
    parser.add_argument("--max-errors", type=int, default=0, help="invalid records to skip before failing")
    parser.add_argument("--task", default=None, help="task of records that carry none (e.g. vqa)")
    args = parser.parse_args(argv)
    try:
        paths, n = convert(args.inputs, args.out, data_root=args.data_root, num_shards=args.num_shards,
                           max_errors=args.max_errors, task=args.task)
    except (ErrorBudgetExceeded, ValueError) as e:
        print(f"error: {e}\nnothing written", file=sys.stderr)
        return 1
    print(f"wrote {n} records to {len(paths)} shard(s): {paths[0]} ...")
    return 0


if __name__ == "__main__":
    sys.exit(main())

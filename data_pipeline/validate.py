"""Validate EmoBench record files and report every problem.

`python -m data_pipeline.validate PATH... [--data-root DIR] [--num-frames T] [--max-text-chars N]
[--max-image-pixels N]` prints every problem as `file:line: field: message`, then a per-task table (records,
ok, bad); exit status 1 if any record (or line) is bad, else 0. Media paths resolve against `--data-root`, by
default each file's directory, and may not leave it (symlinks followed, frames of a frame directory included);
every image and frame is decoded completely. A line that is not UTF-8 or not JSON is reported and the rest of
the file is still checked; an id used twice in a file is reported at its second use."""

from __future__ import annotations

import argparse
import collections
import sys
from collections.abc import Sequence
from pathlib import Path

from data_pipeline.paths import DEFAULT_MAX_IMAGE_PIXELS
from data_pipeline.records import FirstSeen, RecordError, iter_records, validate_record

UNPARSED = "(unparsed)"


def validate_files(
    paths: Sequence[str | Path],
    *,
    data_root: str | Path | None = None,
    num_frames: int | None = None,
    max_text_chars: int | None = None,
    check_media: bool = True,
    max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
) -> tuple[list[RecordError], dict[str, collections.Counter]]:
    """Returns all problems and `{task: Counter(records=, ok=, bad=)}` over the files."""
    problems: list[RecordError] = []
    table: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for path in map(Path, paths):
        if not path.is_file():
            problems.append(RecordError(path, 0, "file", "not found"))
            table[UNPARSED].update(records=1, bad=1)
            continue
        root = data_root if data_root is not None else path.parent
        parse_errors: list[RecordError] = []
        ids = FirstSeen()
        try:
            for line, record in iter_records(path, errors=parse_errors):
                errs = validate_record(
                    record,
                    source=path,
                    line=line,
                    data_root=root,
                    num_frames=num_frames,
                    max_text_chars=max_text_chars,
                    check_media=check_media,
                    max_image_pixels=max_image_pixels,
                )
                duplicate = ids.check(record.get("id"), path, line)
                errs += [duplicate] if duplicate else []
                task = record.get("task") if isinstance(record.get("task"), str) else UNPARSED
                table[task].update(records=1, ok=not errs, bad=bool(errs))
                problems.extend(errs)
        except ValueError as e:  # an unsupported file type
            parse_errors.append(RecordError(path, 0, "file", str(e)))
        problems.extend(parse_errors)
        if parse_errors:
            table[UNPARSED].update(records=len(parse_errors), bad=len(parse_errors))
    problems.sort(key=lambda p: (p.source, p.line))
    return problems, table


def format_table(table: dict[str, collections.Counter]) -> str:
    rows = [(task, c["records"], c["ok"], c["bad"]) for task, c in sorted(table.items())]
    total = ("total", *(sum(r[i] for r in rows) for i in (1, 2, 3)))
    width = max([len(r[0]) for r in rows] + [len("total"), len("task")])
    lines = [f"{'task':<{width}}  {'records':>7}  {'ok':>7}  {'bad':>7}"]
    lines += [f"{t:<{width}}  {n:>7}  {ok:>7}  {bad:>7}" for t, n, ok, bad in [*rows, total]]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m data_pipeline.validate", description=__doc__.splitlines()[0]
    )
    parser.add_argument("paths", nargs="+", help=".json (list of records) or .jsonl files")
    parser.add_argument("--data-root", default=None, help="media root (default: each file's directory)")
    parser.add_argument("--num-frames", type=int, default=None, help="frames a video must have at least")
    parser.add_argument("--max-text-chars", type=int, default=None, help="longest allowed conversation text")
    parser.add_argument("--max-image-pixels", type=int, default=DEFAULT_MAX_IMAGE_PIXELS,
                        help=f"largest image, width x height (default {DEFAULT_MAX_IMAGE_PIXELS})")
    parser.add_argument("--no-media", action="store_true", help="skip opening media files (schema only)")
    args = parser.parse_args(argv)
    if args.max_image_pixels <= 0:
        parser.error(f"--max-image-pixels must be positive, got {args.max_image_pixels}")
    problems, table = validate_files(
        args.paths,
        data_root=args.data_root,
        num_frames=args.num_frames,
        max_text_chars=args.max_text_chars,
        check_media=not args.no_media,
        max_image_pixels=args.max_image_pixels,
    )
    for p in problems:
        print(p)
    if problems:
        print()
    print(format_table(table))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())

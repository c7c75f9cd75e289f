"""Random-access record sources over JSON / JSONL files, ArrayRecord shards and TFDS data sources.

Every source has `__len__` and `__getitem__(i) -> Example`, which is all `grain.MapDataset.source` needs.
An `Example` keeps the record together with where it came from, and the problems found in it, so the
pipeline can skip bad records against an error budget and name them:

    {"record": dict | None, "source": str, "line": int, "errors": list[RecordError]}

`line` is the 1-based line for JSONL, the 1-based record number for a JSON list; records read back from
ArrayRecord shards name the file and line they were converted from. A source may carry a default task, which
fills the `task` of records that have none (LLaVA's own instruction files carry no task). Validation
(`records.validate_record`) is "lazy" (in `__getitem__`, inside Grain workers), "upfront" (all records at
construction; `valid_indices()` then lists the good ones) or "none". `index()` lists every record's task, id
and place without validating it, which is what a pipeline needs to filter by task and refuse duplicate ids.
"""

from __future__ import annotations

import base64
import dataclasses
import glob
import io
import json
import os
import threading
import zlib
from collections.abc import Mapping, Sequence
from typing import Any, BinaryIO

from data_pipeline import storage
from data_pipeline.paths import DEFAULT_MAX_IMAGE_PIXELS
from data_pipeline.records import RecordError, iter_records, not_utf8, validate_record

Example = dict[str, Any]
BYTES_FIELDS = ("image_bytes", "video_bytes")
BYTES_LIST_FIELDS = ("video_frames_bytes",)
VALIDATION_MODES = ("lazy", "upfront", "none")
INDEX_SUFFIX = ".index.json"  # beside each ArrayRecord shard: the task, id and origin of its records


@dataclasses.dataclass(frozen=True)
class SourceSpec:
    """One record source of a pipeline: `path` as `open_source` takes it; `task` fills the task of records
    that have none; `root` is its media root (None: the pipeline's `data_root`); `split` picks the split of a
    TFDS builder directory."""

    path: str
    task: str | None = None
    root: str | None = None
    split: str | None = None  # a TFDS builder directory's split (None: "train")


@dataclasses.dataclass(frozen=True)
class IndexEntry:
    """What a pipeline needs to know of a record before reading it: its task and id (None when the record
    could not be parsed; `errors` then says why) and where it came from."""

    task: str | None
    id: str | None
    source: str
    line: int
    errors: tuple[RecordError, ...] = ()


# ----------------------------------------------------------------------------------------------------------
# Serialisation of records with embedded media (ArrayRecord payloads)


def encode_record(record: Mapping[str, Any], origin: str = "") -> bytes:
    """A record as UTF-8 JSON, its media bytes base64-encoded; `origin` ("in.jsonl:12") kept for errors."""
    rec = dict(record)
    for key in BYTES_FIELDS:
        if rec.get(key) is not None:
            rec[key] = base64.b64encode(rec[key]).decode("ascii")
    for key in BYTES_LIST_FIELDS:
        if rec.get(key) is not None:
            rec[key] = [base64.b64encode(b).decode("ascii") for b in rec[key]]
    return json.dumps({"record": rec, "origin": origin}, ensure_ascii=False).encode("utf-8")


def decode_record(payload: bytes) -> tuple[dict[str, Any], str]:
    """Inverse of `encode_record`: `(record, origin)`."""
    obj = json.loads(payload)
    rec = obj["record"]
    for key in BYTES_FIELDS:
        if rec.get(key) is not None:
            rec[key] = base64.b64decode(rec[key])
    for key in BYTES_LIST_FIELDS:
        if rec.get(key) is not None:
            rec[key] = [base64.b64decode(b) for b in rec[key]]
    return rec, obj.get("origin", "")


# ----------------------------------------------------------------------------------------------------------
# Sources


class _ValidatingSource:
    """Shared validation; subclasses give `__len__` and `_read(i) -> (record|None, source, line, errors)`."""

    name: str

    def __init__(
        self,
        *,
        validate: str = "lazy",
        data_root: str | os.PathLike | None = None,
        num_frames: int | None = None,
        check_media: bool = False,
        default_task: str | None = None,
        max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
    ):
        if validate not in VALIDATION_MODES:
            raise ValueError(f"validate must be one of {VALIDATION_MODES}, got {validate!r}")
        self.validate = validate
        self.data_root = None if data_root is None else os.fspath(data_root)
        self.num_frames = num_frames
        self.check_media = check_media
        self.default_task = default_task
        self.max_image_pixels = max_image_pixels
        self._valid: list[int] | None = None
        self._invalid: dict[int, list[RecordError]] = {}
        self._index: list[IndexEntry] | None = None

    def _read(self, index: int) -> tuple[dict | None, str, int, list[RecordError]]:
        raise NotImplementedError

    def __len__(self) -> int:
        raise NotImplementedError

    def _fetch(self, index: int) -> tuple[dict | None, str, int, list[RecordError]]:
        """`_read`, with the source's default task filled in where the record names none."""
        record, source, line, errors = self._read(index)
        if self.default_task and isinstance(record, dict) and "task" not in record:
            record = {**record, "task": self.default_task}
        return record, source, line, errors

    def _check(self, record: dict | None, source: str, line: int, errors: list[RecordError]) -> list:
        if record is None or errors or self.validate == "none":
            return errors
        return validate_record(
            record, source=source, line=line, data_root=self.data_root, num_frames=self.num_frames,
            check_media=self.check_media, max_image_pixels=self.max_image_pixels,
        )

    def __getitem__(self, index: int) -> Example:
        if not 0 <= index < len(self):
            raise IndexError(f"{self.name}: index {index} out of range [0, {len(self)})")
        record, source, line, errors = self._fetch(int(index))
        if self.validate == "lazy":
            errors = self._check(record, source, line, errors)
        return {"record": record, "source": source, "line": line, "errors": errors}

    def problems(self, index: int) -> list[RecordError]:
        """Record `index`'s parse errors or schema problems (media not opened), whatever the mode."""
        record, source, line, errors = self._fetch(index)
        if record is None or errors:
            return errors
        return validate_record(record, source=source, line=line, data_root=self.data_root,
                               num_frames=self.num_frames, check_media=False,
                               max_image_pixels=self.max_image_pixels)

    def index(self) -> list[IndexEntry]:
        """Task, id and place of every record, in order (computed once)."""
        if self._index is None:
            self._index = [self._entry(i) for i in range(len(self))]
        return self._index

    def _entry(self, i: int) -> IndexEntry:
        return self._entry_of(*self._fetch(i))

    @staticmethod
    def _entry_of(record: dict | None, source: str, line: int, errors: list[RecordError]) -> IndexEntry:
        if record is None:
            return IndexEntry(None, None, source, line, tuple(errors))
        task, rid = record.get("task"), record.get("id")
        return IndexEntry(task if isinstance(task, str) else None, rid if isinstance(rid, str) else None,
                          source, line)

    def valid_indices(self) -> list[int]:
        """Indices of the records without problems; with validate="upfront" computed once, up front."""
        if self._valid is None:
            good, bad, entries = [], {}, []
            for i in range(len(self)):
                record, source, line, errors = self._fetch(i)
                entries.append(self._entry_of(record, source, line, errors))  # the index, in the same pass
                errors = self._check(record, source, line, errors)
                if errors:
                    bad[i] = errors
                else:
                    good.append(i)
            self._valid, self._invalid = good, bad
            self._index = self._index if self._index is not None else entries
        return self._valid

    def invalid(self) -> dict[int, list[RecordError]]:
        """index -> problems of the records `valid_indices()` left out."""
        self.valid_indices()
        return self._invalid

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, {len(self)} records, validate={self.validate!r})"


class JsonRecordSource(_ValidatingSource):
    """Records of a `.jsonl` file (random access by byte offset of each non-empty line) or a `.json` list.

    JSONL lines are parsed on access, so a malformed line is an `Example` with a "json" error, not a crash.
    The file is opened once, at construction, and the line index is built from that same open file; reads
    are `os.pread`s on it (no shared position, so Grain's reader threads can share it). The offsets therefore
    always describe the bytes being read, even when the path is later replaced (a rewritten stage mixture,
    another run regenerating the data); re-opening the path at read time would read the new file at the old
    offsets ("malformed JSON" at some line). The descriptor is owned by a file object that
    closes it exactly once. A pickled copy (Grain worker) reopens the path and refuses a file that changed
    since it was indexed. A `.jsonl` at a URL (`gs://...`) is read whole into memory (a store has no pread)
    and indexed there; a pickled copy reads it again and refuses other bytes (size and CRC-32).
    """

    def __init__(self, path: str | os.PathLike, **kwargs: Any):
        super().__init__(**kwargs)
        self.path = os.fspath(path)
        self.name = self.path
        self._file: io.BufferedReader | None = None
        self._identity: tuple[int, ...] | None = None
        self._open_lock = threading.Lock()
        self._blob: bytes | None = None
        if self.path.endswith(".jsonl") and storage.is_remote(self.path):
            self._blob = storage.read_bytes(self.path)
            self._identity = (len(self._blob), zlib.crc32(self._blob))
            self._offsets, self._sizes, self._lines = _line_index(io.BytesIO(self._blob))
            self._records = None
        elif self.path.endswith(".jsonl"):
            self._file = open(self.path, "rb")  # noqa: SIM115 - held for random access; closed by close()
            self._identity = _identity(self._file.fileno())
            self._offsets, self._sizes, self._lines = _line_index(self._file)
            self._records = None
        elif self.path.endswith(".json"):
            errors: list[RecordError] = []
            items = list(iter_records(self.path, errors=errors))
            if errors and not items:
                raise errors[0]
            self._records = [rec for _, rec in items]
            self._lines = [line for line, _ in items]
        else:
            raise ValueError(f"{self.path}: expected a .json or .jsonl record file")
        if self.validate == "upfront":
            self.valid_indices()

    def __len__(self) -> int:
        return len(self._lines)

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_file"] = None
        state["_blob"] = None
        state["_open_lock"] = None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._open_lock = threading.Lock()

    def close(self) -> None:
        """Releases the file; a later read reopens it (and checks it is still the indexed file)."""
        with self._open_lock:
            if self._file is not None:
                self._file.close()
                self._file = None
            self._blob = None

    def _fileno(self) -> int:
        """The descriptor of the indexed file, reopened (once, under a lock) in a fresh process."""
        file = self._file
        if file is None:
            with self._open_lock:
                if self._file is None:
                    reopened = open(self.path, "rb")  # noqa: SIM115 - held, see close()
                    if _identity(reopened.fileno()) != self._identity:
                        reopened.close()
                        raise RuntimeError(
                            f"{self.path}: the file changed after it was indexed (replaced or modified); "
                            "build a new source")
                    self._file = reopened
                file = self._file
        return file.fileno()

    def _line_bytes(self, index: int) -> bytes:
        size, offset = self._sizes[index], self._offsets[index]
        if not storage.is_remote(self.path):
            return os.pread(self._fileno(), size, offset)
        blob = self._blob
        if blob is None:  # a fresh process: the object read again (once, under a lock) and checked
            with self._open_lock:
                if self._blob is None:
                    data = storage.read_bytes(self.path)
                    if (len(data), zlib.crc32(data)) != self._identity:
                        raise RuntimeError(f"{self.path}: the file changed after it was indexed (replaced or "
                                           "modified); build a new source")
                    self._blob = data
                blob = self._blob
        return blob[offset:offset + size]

    def _read(self, index):
        line = self._lines[index]
        if self._records is not None:
            return self._records[index], self.path, line, []
        raw = self._line_bytes(index)
        try:
            obj = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            return None, self.path, line, [RecordError(self.path, line, "encoding", not_utf8(raw, e))]
        except json.JSONDecodeError as e:
            return None, self.path, line, [RecordError(self.path, line, "json", f"malformed JSON: {e}")]
        if not isinstance(obj, dict):
            err = RecordError(self.path, line, "json", f"expected a JSON object, got {type(obj).__name__}")
            return None, self.path, line, [err]
        return obj, self.path, line, []


def _identity(fd: int) -> tuple[int, ...]:
    """(device, inode, size, mtime_ns) of an open file: what a reopened path must still match."""
    st = os.fstat(fd)
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def _line_index(file: BinaryIO) -> tuple[list[int], list[int], list[int]]:
    """Byte offsets, byte sizes and 1-based line numbers of the non-empty lines of an open binary file."""
    offsets, sizes, lines = [], [], []
    pos = 0
    file.seek(0)
    for lineno, raw in enumerate(file, start=1):
        if raw.strip():
            offsets.append(pos)
            sizes.append(len(raw))
            lines.append(lineno)
        pos += len(raw)
    return offsets, sizes, lines


def shard_paths(pattern: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """ArrayRecord shard files from a list, a glob, or a `convert_arrayrecord` prefix (PREFIX-*-of-*). The
    ArrayRecord reader opens local files only: shards on an object store are read through a mount (gcsfuse),
    as MaxText's Grain input reads them."""
    if not isinstance(pattern, str | os.PathLike):
        paths = [os.fspath(p) for p in pattern]
    else:
        paths = [os.fspath(pattern)]
    remote = [p for p in paths if storage.is_remote(p)]
    if remote:
        raise ValueError(f"{remote[0]}: ArrayRecord shards are read from a local or mounted path (e.g. "
                         "gcsfuse), not a URL")
    if not isinstance(pattern, str | os.PathLike):
        return paths
    pattern = os.fspath(pattern)
    if os.path.isfile(pattern):
        return [pattern]
    for candidate in (pattern, f"{pattern}-*-of-*.array_record"):
        paths = sorted(glob.glob(candidate))
        if paths:
            return paths
    raise FileNotFoundError(f"no ArrayRecord shards match {pattern!r} (tried it as a glob and as a prefix)")


class ArrayRecordSource(_ValidatingSource):
    """Records from ArrayRecord shards written by `convert_arrayrecord` (JSON payloads, media embedded).

    `index()` reads each shard's `<shard>.index.json` (written by `convert_arrayrecord`) when every shard has
    one of the right length, so filtering by task does not decode the media of every record.
    """

    def __init__(self, paths: str | os.PathLike | Sequence[str | os.PathLike], **kwargs: Any):
        import grain

        super().__init__(**kwargs)
        self.paths = shard_paths(paths)
        self.name = self.paths[0] if len(self.paths) == 1 else f"{self.paths[0]} (+{len(self.paths) - 1})"
        self._source = grain.sources.ArrayRecordDataSource(self.paths)
        if self.validate == "upfront":
            self.valid_indices()

    def __len__(self) -> int:
        return len(self._source)

    def index(self) -> list[IndexEntry]:
        if self._index is None:
            self._index = self._stored_index()
        return super().index()

    def _stored_index(self) -> list[IndexEntry] | None:
        """The shards' index files, or None when one is missing or does not match its shard."""
        from array_record.python.array_record_data_source import ArrayRecordDataSource

        entries: list[IndexEntry] = []
        for shard in self.paths:
            try:
                with open(shard + INDEX_SUFFIX, encoding="utf-8") as f:
                    rows = json.load(f)["records"]
            except (OSError, ValueError, KeyError, TypeError):
                return None
            if len(rows) != len(ArrayRecordDataSource([shard])):
                return None
            for k, (task, rid, origin) in enumerate(rows):
                source, _, line = str(origin).rpartition(":")
                if not (source and line.isdigit()):
                    source, line = shard, str(k + 1)
                entries.append(IndexEntry(task or self.default_task, rid, source, int(line)))
        return entries

    def _read(self, index):
        line = index + 1
        try:
            record, origin = decode_record(self._source[index])
        except (ValueError, KeyError) as e:
            err = RecordError(self.name, line, "payload", f"undecodable record: {e}")
            return None, self.name, line, [err]
        source, _, origin_line = origin.rpartition(":")
        if source and origin_line.isdigit():
            return record, source, int(origin_line), []
        return record, self.name, line, []


class TfdsSource(_ValidatingSource):
    """Records from a prepared `tfds_emobench` dataset, read with `tfds.data_source` (no TensorFlow): by name
    under `data_dir`, or from the builder's prepared directory `builder_dir` (`DATA_DIR/emo_bench/1.0.0`)."""

    def __init__(self, name: str, *, split: str, data_dir: str | os.PathLike | None = None,
                 builder_dir: str | os.PathLike | None = None, **kwargs: Any):
        import tensorflow_datasets as tfds

        from data_pipeline import tfds_emobench  # registers the builder

        super().__init__(**kwargs)
        self.name = f"tfds:{name}/{split}"
        if builder_dir is not None:
            builder = tfds.builder_from_directory(os.fspath(builder_dir))
            if split not in builder.info.splits:
                raise ValueError(f"{builder_dir}: TFDS dataset has no split {split!r} "
                                 f"(has {sorted(builder.info.splits)})")
            self._source = builder.as_data_source(split=split)
        else:
            data_dir = None if data_dir is None else os.fspath(data_dir)
            self._source = tfds.data_source(name, split=split, data_dir=data_dir)
        self._to_record = tfds_emobench.example_to_record
        if self.validate == "upfront":
            self.valid_indices()

    def __len__(self) -> int:
        return len(self._source)

    def _read(self, index):
        return self._to_record(self._source[index]), self.name, index + 1, []


def open_source(spec: str | os.PathLike, **kwargs: Any) -> _ValidatingSource:
    """A source from a path: `.json`/`.jsonl` file, ArrayRecord shard/glob/prefix, a TFDS builder's prepared
    directory (`DATA_DIR/emo_bench/1.0.0`, holding `dataset_info.json`; split from `split=`) or
    `tfds:NAME/SPLIT`. For `tfds:`, pass `data_dir=` (the TFDS data directory) in kwargs.
    """
    spec = os.fspath(spec)
    if spec.startswith("tfds:"):
        name, _, split = spec[len("tfds:"):].partition("/")
        kwargs.pop("split", None)
        return TfdsSource(name, split=split or "train", **kwargs)
    split = kwargs.pop("split", None) or "train"
    if os.path.isfile(os.path.join(spec, "dataset_info.json")):
        kwargs.pop("data_dir", None)
        return TfdsSource(spec, split=split, builder_dir=spec, **kwargs)
    kwargs.pop("data_dir", None)
    if spec.endswith((".json", ".jsonl")):
        if not storage.path(spec).is_file():
            raise FileNotFoundError(f"{spec}: no such record file")
        return JsonRecordSource(spec, **kwargs)
    return ArrayRecordSource(spec, **kwargs)

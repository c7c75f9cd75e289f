"""TFDS builder for a local EmoBench copy, written as ArrayRecord and read without TensorFlow.

Usage:
    builder = EmoBench(data_dir=DATA_DIR, config="default")
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=EMOBENCH_DIR),
                                 file_format="array_record")
    src = tfds.data_source("emo_bench", split="train", data_dir=DATA_DIR)   # random access, numpy out
    record = example_to_record(src[0])                                        # back to the record schema

`manual_dir` holds `{train,validation,test}.{jsonl,json}` (any subset) with media paths relative to it.
Media are stored as encoded bytes (no `tfds.features.Image`: encoding it needs TensorFlow), all of a
record's encoded files concatenated into one `uint8` tensor with their sizes beside it.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from data_pipeline.media import KIND_FIELD, read_media_bytes
from data_pipeline.records import iter_records

SPLITS = ("train", "validation", "test")


def example_to_record(example: dict[str, Any]) -> dict[str, Any]:
    """A `tfds.data_source` element (numpy) -> a record dict with embedded media (`records` schema)."""

    def text(key: str) -> str:
        value = example[key]
        return value.decode("utf-8") if isinstance(value, bytes) else str(value)

    record: dict[str, Any] = {"id": text("id"), "task": text("task"),
                              "conversations": json.loads(text("conversations"))}
    for key in ("label", "rationale"):
        if text(key):
            record[key] = text(key)
    options = json.loads(text("options"))
    if options is not None:
        record["options"] = options
    kind = text("media_kind")
    if kind:
        blob = np.asarray(example["media"], np.uint8).tobytes()
        ends = np.cumsum(np.asarray(example["media_sizes"], np.int64))
        parts = [blob[s:e] for s, e in zip(np.concatenate([[0], ends[:-1]]), ends, strict=True)]
        record[KIND_FIELD[kind]] = parts if kind == "frames" else parts[0]
    return record


class EmoBench(tfds.core.GeneratorBasedBuilder):
    """EmoBench (or mini-EmoBench) from a local copy; see the module docstring."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Records with embedded media bytes; ArrayRecord only."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = "Put {train,validation,test}.jsonl and their media under manual_dir."
    # Nothing is downloaded, so no checksums file; tfds would otherwise locate one through
    # `importlib_resources`, which is not installed here (tfds 4.9.10).
    code_path = None

    def _info(self) -> tfds.core.DatasetInfo:
        text = tfds.features.Text()
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict({
                "id": text, "task": text, "label": text, "rationale": text,
                "conversations": text,   # JSON list of {from, value}
                "options": text,         # JSON list or null
                "media_kind": text,      # "" | image | frames | video
                "media": tfds.features.Tensor(shape=(None,), dtype=np.uint8),
                "media_sizes": tfds.features.Tensor(shape=(None,), dtype=np.int64),
            }),
            supervised_keys=None,
            description=__doc__,
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        root = dl_manager.manual_dir
        splits = {}
        for split in SPLITS:
            for ext in (".jsonl", ".json"):
                path = os.path.join(root, split + ext)
                if os.path.exists(path):
                    splits[split] = self._generate_examples(path, root)
                    break
        if not splits:
            raise FileNotFoundError(f"{root}: no {{train,validation,test}}.jsonl/.json record files")
        return splits

    def _generate_examples(self, path: str, root: str):
        for _, record in iter_records(path):
            kind, blobs = read_media_bytes(record, root)
            yield f"{record['id']}", {
                "id": record["id"],
                "task": record["task"],
                "label": record.get("label") or "",
                "rationale": record.get("rationale") or "",
                "conversations": json.dumps(record["conversations"], ensure_ascii=False),
                "options": json.dumps(record.get("options")),
                "media_kind": kind,
                "media": np.frombuffer(b"".join(blobs), np.uint8),
                "media_sizes": np.asarray([len(b) for b in blobs], np.int64),
            }

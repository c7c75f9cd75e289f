"""Sequence packing: several encoded records per row, with segment ids and per-record positions.

A packed training batch holds `rows` rows of `length` tokens; each row holds whole records one after the other
(greedy first fit: a record goes into the first row of the batch with room for its tokens, its frames and its
sound windows; the first record that fits in no row closes the batch and opens the next one). A record's
visual and audio tokens stay with it: its frames fill the row's next frame slots and its media indices are
renumbered after those of the records before it in the row, so the model's splice (the j-th image token of a
row takes the row's j-th visual token) finds each record's own media. Loss masks stay answer-only, and no
record predicts the first token of the next one.

Resuming is exact: the iterator's state is the state of the record stream just before the record carried
over to the next batch (and the error budget's count at that point), so a restored iterator reads that
record again and builds the same batches.

Example (length 8, 2 rows; records a = 5 tokens, b = 3, c = 4, in stream order a, c, b):
    row 0: a a a a a b b b   segment_ids 1 1 1 1 1 2 2 2   positions 0 1 2 3 4 0 1 2
    row 1: c c c c . . . .   segment_ids 1 1 1 1 0 0 0 0   positions 0 1 2 3 0 0 0 0
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import grain
import numpy as np

from data_pipeline.records import ErrorBudget


@dataclasses.dataclass(frozen=True)
class RowLayout:
    """What one packed row holds: `length` tokens, `frame_slots` frames of `image_size` px and `audio_slots`
    sound windows of float32[audio_mels, audio_frames] (0 slots: the model reads no sound)."""

    length: int
    frame_slots: int
    image_size: int
    audio_slots: int = 0
    audio_mels: int = 0
    audio_frames: int = 0

    def capacity(self) -> tuple[int, int, int]:
        return self.length, self.frame_slots, self.audio_slots


def slots_per_row(length: int, tokens_of: Callable[[int], int], max_item: int, per_record: int) -> int:
    """The most frames (or sound windows) a row of `length` tokens can need, so no row runs out of slots
    before it runs out of tokens: a media item of n frames (n = 1 .. `max_item`) takes `tokens_of(n)` tokens,
    so a row holds at most max_n floor(length * n / tokens_of(n)) frames; and at least one record's
    `per_record`. The towers run on every slot, so this is also the most tower work a row can cost: that of
    a row made of media alone."""
    most = max((length * n) // max(tokens_of(n), 1) for n in range(1, max_item + 1))
    return max(most, per_record)


def row_layout(spec: Any) -> RowLayout:
    """The packed row of a `pipeline.PipelineSpec` with `packing`: its largest bucket's tokens, and the
    frame and sound-window slots such a row can need (`slots_per_row`)."""
    length = spec.seq_buckets[-1]
    frames = slots_per_row(length, spec.visual_tokens, spec.num_frames, spec.max_media_frames)
    if not spec.audio_mels:
        return RowLayout(length, frames, spec.image_size)
    windows = slots_per_row(length, spec.audio_tokens_fn, spec.audio_windows, spec.audio_windows)
    return RowLayout(length, frames, spec.image_size, windows, spec.audio_mels, spec.audio_frames)


def sample_size(sample: dict[str, Any]) -> tuple[int, int, int]:
    """(tokens, frames, sound windows) of one encoded record."""
    windows = len(sample["audio_media"]) if "audio_media" in sample else 0
    return len(sample["input_ids"]), len(sample["frame_media"]), windows


def first_fit(used: list[list[int]], size: Sequence[int], capacity: Sequence[int]) -> int | None:
    """Index of the first row whose `used` amounts plus `size` stay within `capacity` (and adds `size` to
    it), or None when no row has room."""
    for i, row in enumerate(used):
        if all(u + s <= c for u, s, c in zip(row, size, capacity, strict=True)):
            for j, s in enumerate(size):
                row[j] += s
            return i
    return None


def mean_records_per_row(lengths: Iterable[int], rows: int, length: int) -> float:
    """Records per row the packer reaches on records of these token `lengths` (in stream order), batches of
    `rows` rows of `length` tokens, counted over the batches the stream closed (the last one, cut short by the
    end of `lengths`, only when no other closed); for turning a stage's `epochs` into steps."""
    used: list[list[int]] = [[0] for _ in range(rows)]
    closed = batches = placed = 0
    for n in lengths:
        if first_fit(used, (n,), (length,)) is None:
            closed, batches = closed + placed, batches + 1
            used, placed = [[0] for _ in range(rows)], 0
            first_fit(used, (n,), (length,))
        placed += 1
    if batches:
        return closed / (batches * rows)
    return placed / max(sum(1 for u in used if u[0]), 1)


def estimate_records_per_row(examples: Sequence[dict[str, Any]], encode: Callable[[dict], dict], *, rows: int,
                              length: int, seed: int, limit: int = 512) -> float:
    """Records per packed row on these records: `limit` of them, evenly spread and in a seeded order,
    encoded (`encode`: an example -> an encoded record, or {"errors"} for an invalid one) and packed by
    length (`mean_records_per_row`). Deterministic, so every process and every resume gets the same."""
    n = len(examples)
    if not n:
        return 1.0
    picked = np.unique(np.linspace(0, n - 1, min(limit, n)).astype(np.int64))
    picked = np.random.default_rng(seed).permutation(picked)
    encoded = (encode(examples[int(i)]) for i in picked)
    lengths = [len(out["input_ids"]) for out in encoded if "errors" not in out]
    return mean_records_per_row(lengths, rows, length) if lengths else 1.0


def pack_rows(rows: Sequence[Sequence[dict[str, Any]]], layout: RowLayout,
              pad_id: int) -> dict[str, np.ndarray]:
    """Packed training batch of `rows` (each a list of encoded records, in row order).

    Returns (B = len(rows), T = layout.length, K = frame slots, A = sound window slots):
      input_ids int32[B, T], targets int32[B, T] (input_ids shifted left within each record, pad after its
      last token), loss_mask float32[B, T] (answer tokens only), segment_ids int32[B, T] (1, 2, ... per
      record of the row, 0 = padding), positions int32[B, T] (0, 1, ... within each record),
      attention_mask int32[B, T] (segment_ids > 0), pixel_values float32[B, K, S, S, 3] and frame_media
      int32[B, K] (the row's media index of each frame slot, records' media numbered one after the other,
      -1 = empty); with sound slots, audio_features float32[B, A, n_mels, F] and audio_media int32[B, A].
    Raises ValueError when no token of the batch is supervised, naming its records.
    """
    b, t, s = len(rows), layout.length, layout.image_size
    out = {
        "input_ids": np.full((b, t), pad_id, np.int32), "targets": np.full((b, t), pad_id, np.int32),
        "loss_mask": np.zeros((b, t), np.float32), "segment_ids": np.zeros((b, t), np.int32),
        "positions": np.zeros((b, t), np.int32),
        "pixel_values": np.zeros((b, layout.frame_slots, s, s, 3), np.float32),
        "frame_media": np.full((b, layout.frame_slots), -1, np.int32),
    }
    if layout.audio_slots:
        out["audio_features"] = np.zeros((b, layout.audio_slots, layout.audio_mels, layout.audio_frames),
                                         np.float32)
        out["audio_media"] = np.full((b, layout.audio_slots), -1, np.int32)
    for i, row in enumerate(rows):
        _fill_row(out, i, row)
    out["attention_mask"] = (out["segment_ids"] > 0).astype(np.int32)
    if not out["loss_mask"].any():
        ids = ", ".join(str(r["id"]) for row in rows for r in row)
        raise ValueError(f"batch with zero supervised tokens (records: {ids}); check the template and the "
                         "tokenizer's end-of-turn token")
    return out


def _fill_row(out: dict[str, np.ndarray], i: int, row: Sequence[dict[str, Any]]) -> None:
    """Writes the records of row `i` one after the other (tokens, frames, sound windows)."""
    pos = frame = media = window = sound = 0
    for seg, sample in enumerate(row, start=1):
        ids, mask = np.asarray(sample["input_ids"]), np.asarray(sample["loss_mask"])
        n = len(ids)
        out["input_ids"][i, pos:pos + n] = ids
        out["targets"][i, pos:pos + n - 1] = ids[1:]
        out["loss_mask"][i, pos:pos + n - 1] = mask[1:]
        out["segment_ids"][i, pos:pos + n] = seg
        out["positions"][i, pos:pos + n] = np.arange(n)
        pos += n
        f = len(sample["frame_media"])
        if f:
            out["pixel_values"][i, frame:frame + f] = sample["pixel_values"]
            out["frame_media"][i, frame:frame + f] = np.asarray(sample["frame_media"]) + media
            media += int(np.max(sample["frame_media"])) + 1
            frame += f
        if "audio_media" in sample and len(sample["audio_media"]):
            w = len(sample["audio_media"])
            out["audio_features"][i, window:window + w] = sample["audio_features"]
            out["audio_media"][i, window:window + w] = np.asarray(sample["audio_media"]) + sound
            sound += int(np.max(sample["audio_media"])) + 1
            window += w


PACKED_STATE = "packed_stream"  # the key of a packed iterator's state (the record stream's state)


class PackedBatches(grain.IterDataset):
    """Packed training batches (`pack_rows`) of `rows` rows from a stream of encoded, valid records.

    `budget`: the error budget charged by the stream's skip filter, whose count is saved with the state
    (`errors_state`) at the same point of the stream as the stream's own.
    """

    def __init__(self, parent: grain.IterDataset, rows: int, layout: RowLayout, pad_id: int,
                 budget: ErrorBudget | None = None):
        super().__init__(parent)
        self.rows, self.layout, self.pad_id, self.budget = rows, layout, pad_id, budget

    def __iter__(self) -> PackedBatchIterator:
        return PackedBatchIterator(self._parent.__iter__(), self.rows, self.layout, self.pad_id, self.budget)

    def __str__(self) -> str:
        return f"PackedBatches(rows={self.rows}, layout={self.layout})"


class PackedBatchIterator(grain.DatasetIterator):
    """Greedy first-fit packing (see the module docstring); checkpointable."""

    def __init__(self, parent: grain.DatasetIterator, rows: int, layout: RowLayout, pad_id: int,
                 budget: ErrorBudget | None):
        super().__init__(parent)
        self._rows, self._layout, self._pad_id, self._budget = rows, layout, pad_id, budget
        self._carry: tuple[dict[str, Any], dict[str, Any]] | None = None  # (record, stream state before it)

    def _snapshot(self) -> dict[str, Any]:
        errors = self._budget.get_state() if self._budget is not None else None
        return {"parent": self._parent.get_state(), "errors": errors}

    def __next__(self) -> dict[str, np.ndarray]:
        capacity = self._layout.capacity()
        used = [[0, 0, 0] for _ in range(self._rows)]
        rows: list[list[dict[str, Any]]] = [[] for _ in range(self._rows)]
        while True:
            if self._carry is not None:
                (sample, before), self._carry = self._carry, None
            else:
                before = self._snapshot()
                try:
                    sample = next(self._parent)
                except StopIteration:
                    if not any(rows):
                        raise
                    break
            size = sample_size(sample)
            if any(s > c for s, c in zip(size, capacity, strict=True)):
                raise ValueError(f"record {sample.get('id')}: {size} (tokens, frames, windows) exceed a "
                                 f"packed row's {capacity}")
            row = first_fit(used, size, capacity)
            if row is None:
                self._carry = (sample, before)
                break
            rows[row].append(sample)
        return pack_rows(rows, self._layout, self._pad_id)

    def get_state(self) -> dict[str, Any]:
        """The record stream's state just before the record carried over, if any (`errors_state`: the error
        count at that point)."""
        state = self._carry[1] if self._carry is not None else self._snapshot()
        return {PACKED_STATE: state["parent"]}

    def errors_state(self) -> dict[str, Any] | None:
        """The error budget's count at the point `get_state` describes."""
        return (self._carry[1] if self._carry is not None else self._snapshot())["errors"]

    def set_state(self, state: dict[str, Any]) -> None:
        if PACKED_STATE not in state:
            raise ValueError("the data state was saved by an unpacked stream, and this one packs "
                             "(config.data.packing changed since the checkpoint: use a new --workdir)")
        self._parent.set_state(state[PACKED_STATE])
        self._carry = None

    def __str__(self) -> str:
        return f"PackedBatchIterator(rows={self._rows}, layout={self._layout})"

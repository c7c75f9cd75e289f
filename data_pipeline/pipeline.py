"""The Grain input pipeline: records -> numpy training batches (and left-padded evaluation batches).

Training chain (per mixture part, then mixed):

    sources -> select (task filter, duplicate ids, [upfront: valid records only]; `mixture.select`)
      -> parts (`mixture.parts`) -> shuffle(seed, reshuffled each epoch) -> repeat(num_epochs)
      -> mix(weights) -> [process_index::process_count] -> map(encode) in Grain workers (mp_prefetch)
      -> skip invalid (error budget) -> batch + pad to a length bucket -> zero-supervision check
      (with `packing`: -> several records per row of the largest bucket, `data_pipeline.packing`)

Every record keeps its own file and line (an ArrayRecord record the file and line it was converted from), so
a skipped record is logged, and an exhausted budget reported, in the user's terms.

`encode` decodes the media (`media.load_media`) and the sound (`audio.record_sound`, then the audio tower's
log-mel windows) and tokenizes the conversation (`text.encode_conversation`).
Skipping and batching run in the calling process, after the workers, so the error budget counts every
skipped record exactly once and batches do not depend on the worker count.

Batches are numpy dicts with static shapes per bucket (see `make_train_iterator`). Everything here is CPU
numpy; JAX is imported only to read the default process index/count.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import grain
import numpy as np

from data_pipeline import audio, media, mixture, packing, storage, text
from data_pipeline.paths import DEFAULT_MAX_IMAGE_PIXELS
from data_pipeline.records import TASKS, ErrorBudget, RecordError, media_layout
from data_pipeline.sources import SourceSpec, open_source

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class PipelineSpec:
    """Everything that decides which batches a run sees. Frozen and hashable; workers receive a pickled copy.

    Data:
      sources: `sources.SourceSpec`s, or paths (record files `.json`/`.jsonl`, ArrayRecord shard
        prefixes/globs, a TFDS builder directory, `tfds:NAME/SPLIT`); a SourceSpec adds a default task and a
        media root.
      weights: a share of the samples per source (None: the sources' records in their natural proportions).
      tasks: keep only records of these tasks (None: every task). task_weights: a share of the samples per
        task of `tasks` (None: natural proportions); see `mixture` for how they combine with `weights`.
      max_per_task: evaluation subsets: the first ceil(max_per_task / tasks) records of each task (0: all).
      data_root: media root for path-based records without their own (None: each JSON file's directory; for
        tfds, the TFDS data_dir). Embedded media (ArrayRecord/TFDS) need none.
      validate: "lazy" (check each record when read, in the workers), "upfront" (check all records first;
        epochs then hold only valid ones) or "none". `check_media` also opens every media file.
        Unparseable records, records without a known task and duplicate ids are refused up front in every
        mode but "none".
      max_errors: invalid records to skip (counted in the calling process, each logged as a warning naming
        its file and line) before raising `ErrorBudgetExceeded`. A record is invalid if it fails validation,
        its media cannot be decoded, it has more than `max_media_frames` frames, an image over
        `max_image_pixels` pixels, or it is longer than the largest bucket.
    Text:
      tokenizer: a `text.Tokenizer`, or the path of a tokenizer directory / tokenizer.json.
      template: chat template name (`text.TEMPLATES`).
      prompt_prefix: record -> text put before the first question (EmoPrompt); must be picklable.
    Media and visual tokens:
      image_size, image_mode ("pad" | "crop" | "resize"), image_mean, image_std: the vision tower's
        preprocessing (`media.preprocess_image`): resize to `image_size`, then
        `(x / 255 - image_mean) / image_std` per RGB channel; "pad" fills with the mean colour.
        Defaults: CLIP's.
      num_frames: frames sampled per video.
      max_media_frames: K, the frame slots per sample (`pixel_values float32[B, K, S, S, 3]`).
      visual_tokens_per_frame, video_pooling ("concat" | "mean"): a media item of F frames becomes
        `F * visual_tokens_per_frame` image tokens ("concat") or `visual_tokens_per_frame` ("mean"),
        i.e. the model's `visual_tokens_per_media(cfg, F)`; or give `visual_tokens_fn(F) -> int` directly.
    Sound (`audio_mels` 0: the model has no audio tower, and a record with sound is invalid):
      audio_mels, audio_window_seconds: the audio tower's front end (`audio.log_mel_windows`).
      audio_windows: A, the window slots per sample; a longer sound keeps its first A windows.
      audio_tokens_fn: windows -> audio tokens of one sound (the model's `audio_tokens_per_item`).
    Batching:
      batch_size: per process. seq_buckets: increasing lengths; a batch is padded to the smallest bucket
        holding its longest sequence, so the trainer compiles at most `len(seq_buckets)` shapes.
      packing: training batches of `batch_size` rows of the largest bucket, each holding several records
        (`data_pipeline.packing`: segment_ids, per-record positions, each record's media in its row).
      seed, shuffle, num_epochs (None: repeat forever).
      worker_count: Grain worker processes (0: decode in this process, with `read_threads` threads).
      worker_buffer_size: elements each worker keeps ready.
    """

    sources: tuple[SourceSpec, ...]
    tokenizer: str | text.Tokenizer
    weights: tuple[float, ...] | None = None
    tasks: tuple[str, ...] | None = None
    task_weights: tuple[float, ...] | None = None
    max_per_task: int = 0
    data_root: str | None = None
    template: str = "vicuna_v1"
    image_size: int = 64
    image_mode: str = "pad"
    image_mean: tuple[float, float, float] = media.CLIP_MEAN
    image_std: tuple[float, float, float] = media.CLIP_STD
    num_frames: int = 4
    max_media_frames: int = 4
    visual_tokens_per_frame: int = 16
    video_pooling: str = "concat"
    visual_tokens_fn: Callable[[int], int] | None = None
    audio_mels: int = 0
    audio_window_seconds: float = audio.WINDOW_SECONDS
    audio_windows: int = 1
    audio_tokens_fn: Callable[[int], int] | None = None
    batch_size: int = 8
    seq_buckets: tuple[int, ...] = (128, 256, 512)
    packing: bool = False
    seed: int = 0
    shuffle: bool = True
    num_epochs: int | None = None
    worker_count: int = 0
    worker_buffer_size: int = 4
    read_threads: int = 2
    validate: str = "lazy"
    check_media: bool = False
    max_errors: int = 0
    max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS
    prompt_prefix: Callable[[dict], str] | None = None

    def __post_init__(self):
        sources = self.sources
        if isinstance(sources, str | os.PathLike | SourceSpec):
            sources = (sources,)
        sources = tuple(s if isinstance(s, SourceSpec) else SourceSpec(os.fspath(s)) for s in sources)
        object.__setattr__(self, "sources", sources)
        if not self.sources:
            raise ValueError("PipelineSpec.sources is empty")
        if self.weights is not None and len(self.weights) != len(self.sources):
            raise ValueError(f"{len(self.weights)} weights for {len(self.sources)} sources")
        if self.tasks is not None:
            unknown = [t for t in self.tasks if t not in TASKS]
            if unknown or not self.tasks:
                raise ValueError(f"tasks={self.tasks}: expected a non-empty subset of {TASKS}")
        n_tasks = len(self.tasks) if self.tasks is not None else 0
        if self.task_weights is not None and len(self.task_weights) != n_tasks:
            raise ValueError(f"task_weights={self.task_weights}: one weight per task of tasks={self.tasks}")
        for name in ("weights", "task_weights"):
            values = getattr(self, name)
            if values is not None and not all(float(w) > 0 for w in values):
                raise ValueError(f"{name}={values}: weights must be positive")
        if list(self.seq_buckets) != sorted(set(self.seq_buckets)) or not self.seq_buckets:
            raise ValueError(f"seq_buckets must be strictly increasing, got {self.seq_buckets}")
        if self.video_pooling not in ("concat", "mean"):
            raise ValueError(f"video_pooling must be 'concat' or 'mean', got {self.video_pooling!r}")
        if self.max_media_frames < 1:
            raise ValueError(f"max_media_frames must be >= 1, got {self.max_media_frames}")
        for name in ("image_mean", "image_std"):
            values = tuple(float(v) for v in getattr(self, name))
            if len(values) != 3:
                raise ValueError(f"{name} must hold 3 values (R, G, B), got {getattr(self, name)}")
            object.__setattr__(self, name, values)
        if min(self.image_std) <= 0:
            raise ValueError(f"image_std must be positive, got {self.image_std}")
        if self.audio_mels and (self.audio_windows < 1 or self.audio_tokens_fn is None):
            raise ValueError("with audio_mels, audio_windows must be >= 1 and audio_tokens_fn given")
        if self.audio_mels:
            audio.window_samples(self.audio_window_seconds)  # refuses a window that is no whole frame count

    @property
    def audio_frames(self) -> int:
        """Log-mel frames of one audio window."""
        return round(self.audio_window_seconds * audio.FRAMES_PER_SECOND)

    def visual_tokens(self, num_frames: int) -> int:
        """Image tokens standing for one media item of `num_frames` frames."""
        if self.visual_tokens_fn is not None:
            return int(self.visual_tokens_fn(num_frames))
        per_item = num_frames if self.video_pooling == "concat" else 1
        return per_item * self.visual_tokens_per_frame


# ----------------------------------------------------------------------------------------------------------
# Per-record encoding (runs in Grain workers)


class _Encoder:
    """Source example -> encoded sample dict, or {"errors": [...]} for a record to skip. Picklable."""

    def __init__(self, spec: PipelineSpec, tokenizer: text.Tokenizer, *, for_generation: bool):
        self.spec = spec
        self.tokenizer = tokenizer
        self.for_generation = for_generation

    def __call__(self, example: dict[str, Any]) -> dict[str, Any]:
        record, source, line = example["record"], example["source"], example["line"]
        if example["errors"]:
            return {"errors": example["errors"], "id": _record_id(record)}
        try:
            out = self._encode(record, source, line, example.get("root"))
        except (ValueError, OSError) as e:  # media.MediaError is a ValueError
            return {"errors": [RecordError(source, line, "encode", str(e))], "id": _record_id(record)}
        if "meta" in out:
            out["meta"]["index"] = example.get("index")
        return out

    def _encode(self, record: dict, source: str, line: int, root: str | None) -> dict[str, Any]:
        spec = self.spec
        layout = media_layout(record, spec.num_frames)
        if sum(layout) > spec.max_media_frames:
            raise ValueError(f"{sum(layout)} frames > max_media_frames {spec.max_media_frames}")
        root = root if root is not None else os.path.dirname(source)
        frames = media.load_media(record, root, image_size=spec.image_size, num_frames=spec.num_frames,
                                  mode=spec.image_mode, mean=spec.image_mean, std=spec.image_std,
                                  max_pixels=spec.max_image_pixels)
        sound = self._sound(record, root)
        prefix = spec.prompt_prefix(record) if spec.prompt_prefix is not None else ""
        ids, mask = text.encode_conversation(
            record["conversations"], spec.template, self.tokenizer,
            visual_tokens=[spec.visual_tokens(f) for f in layout], prompt_prefix=prefix,
            audio_tokens=[spec.audio_tokens_fn(len(sound))] if sound is not None else [],
            for_generation=self.for_generation, where=f"{source}:{line}: ",
        )
        if len(ids) > spec.seq_buckets[-1]:
            raise ValueError(f"{len(ids)} tokens > the largest seq bucket {spec.seq_buckets[-1]}")
        out = {
            "id": _record_id(record), "input_ids": ids, "loss_mask": mask, "pixel_values": frames,
            "frame_media": np.repeat(np.arange(len(layout), dtype=np.int32), layout),
        }
        if sound is not None:
            out["audio_features"], out["audio_media"] = sound, np.zeros(len(sound), np.int32)
        if self.for_generation:
            convs = record["conversations"]
            prompt = convs[-2 if len(convs) % 2 == 0 else -1]["value"]
            answers = [t.get("value", "") for t in convs if t.get("from") in ("gpt", "assistant")]
            out["meta"] = {"id": out["id"], "task": record.get("task"), "label": record.get("label"),
                           "options": record.get("options"), "prompt": prefix + prompt,
                           "answer": answers[-1] if answers else "", "media": media_kind(record)}
        return out

    def _sound(self, record: dict, root: str | None) -> np.ndarray | None:
        """float32[W, n_mels, F]: the record's sound as log-mel windows (at most `audio_windows`), or None."""
        if record.get("audio") is None:
            return None
        spec = self.spec
        if not spec.audio_mels:
            raise ValueError(f"record {record.get('id', '<no id>')} has sound, and the model has no audio "
                             "tower (config.model.audio.kind='none')")
        wave = audio.record_sound(record, root)
        return audio.log_mel_windows(wave, spec.audio_mels, window_seconds=spec.audio_window_seconds,
                                     max_windows=spec.audio_windows).features


def media_kind(record: dict) -> str:
    """What a record shows the model: "image", "video", "audio", "image+audio", "video+audio" or "text"
    (evaluation reports accuracy per kind)."""
    visual = ""
    if media_layout(record, 1):
        video = any(record.get(k) is not None for k in ("video", "video_bytes", "video_frames_bytes"))
        visual = "video" if video else "image"
    parts = [p for p in (visual, "audio" if record.get("audio") is not None else "") if p]
    return "+".join(parts) or "text"


def _record_id(record: dict | None) -> str:
    return str(record.get("id", "<no id>")) if isinstance(record, dict) else "<unparsed>"


class _SkipInvalid:
    """Filter that drops samples carrying errors and charges them to an `ErrorBudget` (main process)."""

    def __init__(self, budget: ErrorBudget):
        self.budget = budget

    def __call__(self, sample: dict[str, Any]) -> bool:
        if "errors" in sample:
            self.budget.skip(sample["errors"])
            return False
        return True


# ----------------------------------------------------------------------------------------------------------
# Batching


def bucket_length(length: int, buckets: Sequence[int]) -> int:
    """The smallest bucket >= length."""
    for b in buckets:
        if length <= b:
            return b
    raise ValueError(f"length {length} exceeds the largest bucket {buckets[-1]}")


def _pad_media(samples: Sequence[dict], k: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    pixels = np.zeros((len(samples), k, size, size, 3), np.float32)
    frame_media = np.full((len(samples), k), -1, np.int32)
    for i, s in enumerate(samples):
        n = len(s["frame_media"])
        pixels[i, :n] = s["pixel_values"]
        frame_media[i, :n] = s["frame_media"]
    return pixels, frame_media


def _pad_audio(samples: Sequence[dict], spec: PipelineSpec, rows: int) -> dict[str, np.ndarray]:
    """audio_features float32[rows, A, n_mels, F] (zeros in empty slots) and audio_media int32[rows, A]
    (the sound of each window slot, -1 = empty: the mask), or {} when the model reads no sound."""
    if not spec.audio_mels:
        return {}
    a = spec.audio_windows
    features = np.zeros((rows, a, spec.audio_mels, spec.audio_frames), np.float32)
    slots = np.full((rows, a), -1, np.int32)
    for i, s in enumerate(samples):
        if "audio_media" in s:
            n = len(s["audio_media"])
            features[i, :n] = s["audio_features"]
            slots[i, :n] = s["audio_media"]
    return {"audio_features": features, "audio_media": slots}


class _TrainBatcher:
    """Right-padded training batch; raises if no token in it is supervised."""

    def __init__(self, spec: PipelineSpec, pad_id: int):
        self.spec, self.pad_id = spec, pad_id

    def __call__(self, samples: Sequence[dict]) -> dict[str, np.ndarray]:
        spec = self.spec
        t = bucket_length(max(len(s["input_ids"]) for s in samples), spec.seq_buckets)
        b = len(samples)
        input_ids = np.full((b, t), self.pad_id, np.int32)
        targets = np.full((b, t), self.pad_id, np.int32)
        attention = np.zeros((b, t), np.int32)
        loss_mask = np.zeros((b, t), np.float32)
        for i, s in enumerate(samples):
            ids, mask = s["input_ids"], s["loss_mask"]
            n = len(ids)
            input_ids[i, :n] = ids
            attention[i, :n] = 1
            targets[i, : n - 1] = ids[1:]          # logits[:, t] predicts targets[:, t] = input_ids[:, t + 1]
            loss_mask[i, : n - 1] = mask[1:]
        if not loss_mask.any():
            ids = ", ".join(s["id"] for s in samples)
            raise ValueError(f"batch with zero supervised tokens (records: {ids}); check the template and "
                             "the tokenizer's end-of-turn token")
        pixels, frame_media = _pad_media(samples, spec.max_media_frames, spec.image_size)
        return {"input_ids": input_ids, "attention_mask": attention, "targets": targets,
                "loss_mask": loss_mask, "pixel_values": pixels, "frame_media": frame_media,
                **_pad_audio(samples, spec, b)}


# ----------------------------------------------------------------------------------------------------------
# Chains



def _open(spec: PipelineSpec, source: SourceSpec) -> Any:
    """A source, validating as `spec` says; its media root is its own, else the spec's, else (JSON files)
    the file's directory."""
    root = source.root if source.root is not None else spec.data_root
    if root is None and source.path.endswith((".json", ".jsonl")):
        root = os.path.dirname(storage.absolute(source.path))
    return open_source(source.path, validate=spec.validate, data_root=root, num_frames=spec.num_frames,
                       check_media=spec.check_media, data_dir=spec.data_root, default_task=source.task,
                       max_image_pixels=spec.max_image_pixels, split=source.split)


def _report(error: RecordError) -> None:
    log.warning("skipped invalid record: %s", error)


def _budget(spec: PipelineSpec, budget: ErrorBudget | None) -> ErrorBudget:
    return budget if budget is not None else ErrorBudget(spec.max_errors, report=_report)


def _select(spec: PipelineSpec, budget: ErrorBudget) -> mixture.Picks:
    return mixture.select([_open(spec, s) for s in spec.sources], tasks=spec.tasks, validate=spec.validate,
                          budget=budget, max_per_task=spec.max_per_task)


def _default_process() -> tuple[int, int]:
    try:
        import jax
    except ImportError:
        return 0, 1
    return jax.process_index(), jax.process_count()


def _ensure_absl_flags_parsed() -> None:
    """grain 0.2.18 workers read absl flags (google/grain#1355); mark them parsed when no app did."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def _load_tokenizer(spec: PipelineSpec, tokenizer: text.Tokenizer | None) -> text.Tokenizer:
    if tokenizer is not None:
        return tokenizer
    if isinstance(spec.tokenizer, text.Tokenizer):
        return spec.tokenizer
    return text.load_tokenizer(spec.tokenizer)


def num_records(spec: PipelineSpec) -> int:
    """Records one epoch of `spec` covers across all processes: those `mixture.select` keeps (the invalid
    ones only leave out with upfront validation)."""
    return len(_select(spec, ErrorBudget(1 << 62)))


def valid_records(spec: PipelineSpec, budget: ErrorBudget | None = None) -> Iterator[dict[str, Any]]:
    """The records `spec`'s stream would read that pass the schema checks (media not opened), as `Example`s
    (record, source, line), in source order, whatever `spec.validate` says: what may be learnt from before
    training (e.g. a tokenizer's texts). The others go to `budget` (default: an unlimited one)."""
    spec = dataclasses.replace(spec, validate="upfront", check_media=False)
    picks = _select(spec, budget if budget is not None else ErrorBudget(1 << 62))
    for source, index in picks.pairs:
        yield picks.sources[int(source)][int(index)]


def _encoded(ds: grain.MapDataset, spec: PipelineSpec, encoder: _Encoder) -> grain.IterDataset:
    """map(encode) -> iter, in `worker_count` processes (or `read_threads` threads when 0)."""
    it = ds.map(encoder).to_iter_dataset(grain.ReadOptions(num_threads=spec.read_threads,
                                                            prefetch_buffer_size=2 * spec.batch_size))
    if spec.worker_count > 0:
        _ensure_absl_flags_parsed()
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=spec.worker_count,
                                                         per_worker_buffer_size=spec.worker_buffer_size))
    return it


def _process_slice(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    if process_index is None or process_count is None:
        process_index, process_count = _default_process()
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    return process_index, process_count


class TrainStream:
    """This process's training batches: a checkpointable iterator whose state also holds the error budget's
    count, so a resumed run goes on with the count it had (`get_state` is JSON-serialisable).

    `num_records`: the records one epoch covers (all processes); `task_shares`: the expected share of each
    task among the samples; `records_per_row`: records a row holds on average (1 unless packed; an estimate
    from a sample of the records, `packing.estimate_records_per_row`).
    """

    def __init__(self, iterator: grain.DatasetIterator, budget: ErrorBudget, num_records: int,
                 task_shares: dict[str, float], records_per_row: float = 1.0):
        self._it, self.budget = iterator, budget
        self.num_records, self.task_shares = num_records, task_shares
        self.records_per_row = records_per_row
        # a packing iterator knows the count at the point of the stream its state describes
        self._errors = getattr(iterator, "errors_state", budget.get_state)

    def __iter__(self) -> TrainStream:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        return next(self._it)

    def get_state(self) -> dict[str, Any]:
        return {"pipeline": self._it.get_state(), "errors": self._errors()}

    def set_state(self, state: dict[str, Any]) -> None:
        if "pipeline" not in state:  # an iterator state saved without the budget's count
            self._it.set_state(state)
            return
        packed = isinstance(self._it, packing.PackedBatchIterator)
        if packing.PACKED_STATE in state["pipeline"] and not packed:
            raise ValueError("the data state was saved by a packed stream, and this one does not pack "
                             "(config.data.packing changed since the checkpoint: use a new --workdir)")
        self._it.set_state(state["pipeline"])
        self.budget.set_state(state["errors"])


def make_train_dataset(
    spec: PipelineSpec,
    *,
    tokenizer: text.Tokenizer | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
    budget: ErrorBudget | None = None,
) -> grain.IterDataset:
    """The training chain as a `grain.IterDataset` of batches (see `make_train_iterator`)."""
    return _train_chain(spec, tokenizer, process_index, process_count, _budget(spec, budget))[0]


def _train_chain(spec: PipelineSpec, tokenizer: text.Tokenizer | None, process_index: int | None,
                 process_count: int | None, budget: ErrorBudget) -> tuple[grain.IterDataset, mixture.Picks]:
    tokenizer = _load_tokenizer(spec, tokenizer)
    process_index, process_count = _process_slice(process_index, process_count)
    picks = _select(spec, budget)
    parts, weights = mixture.parts(picks, source_weights=spec.weights, tasks=spec.tasks,
                                   task_weights=spec.task_weights)
    datasets = []
    for i, part in enumerate(parts):
        ds = grain.MapDataset.source(part)
        if spec.shuffle:
            ds = ds.shuffle(seed=spec.seed + 1000 * i)
        datasets.append(ds.repeat(spec.num_epochs))
    ds = datasets[0] if len(datasets) == 1 else grain.MapDataset.mix(datasets, weights)
    ds = ds[process_index::process_count]
    it = _encoded(ds, spec, _Encoder(spec, tokenizer, for_generation=False))
    it = it.filter(_SkipInvalid(budget))
    if spec.packing:
        layout = packing.row_layout(spec)
        return packing.PackedBatches(it, spec.batch_size, layout, tokenizer.pad_id, budget), picks
    batches = it.batch(spec.batch_size, drop_remainder=True, batch_fn=_TrainBatcher(spec, tokenizer.pad_id))
    return batches, picks


def make_train_iterator(
    spec: PipelineSpec,
    *,
    tokenizer: text.Tokenizer | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
    budget: ErrorBudget | None = None,
) -> TrainStream:
    """A checkpointable iterator of this process's training batches.

    Each batch (T = a bucket of `spec.seq_buckets`, K = `spec.max_media_frames`, S = `spec.image_size`):
      input_ids int32[B, T], attention_mask int32[B, T] (right padded), targets int32[B, T]
      (= input_ids shifted left), loss_mask float32[B, T] (1 where targets[:, t] is an answer token or its
      end-of-turn), pixel_values float32[B, K, S, S, 3] (zeros in unused slots), frame_media int32[B, K]
      (media index of each frame slot, -1 = empty); with `audio_mels`, audio_features
      float32[B, A, n_mels, F] and audio_media int32[B, A] (the sound of each window slot, -1 = empty).
    With `spec.packing`, B rows of several records each (`packing.pack_rows`: T = the largest bucket, K and
    A a row's slots, plus segment_ids and positions int32[B, T]).
    Processes get disjoint interleaved slices (`[process_index::process_count]`) of the same shuffled
    stream, by default `jax.process_index()` / `jax.process_count()`. Resume with
    `it.set_state(saved)`, where `saved = it.get_state()` is a JSON-serialisable dict.
    Raises `ErrorBudgetExceeded` past `spec.max_errors` skipped records (up front for what `mixture.select`
    refuses, else when the record is read) and ValueError on a batch without supervised tokens (naming its
    records).
    """
    budget = _budget(spec, budget)
    batches, picks = _train_chain(spec, tokenizer, process_index, process_count, budget)
    shares = mixture.task_shares(picks, source_weights=spec.weights, tasks=spec.tasks,
                                 task_weights=spec.task_weights)
    per_row = 1.0
    if spec.packing:
        encoder = _Encoder(spec, _load_tokenizer(spec, tokenizer), for_generation=False)
        per_row = packing.estimate_records_per_row(mixture.Picked(picks), encoder, rows=spec.batch_size,
                                                   length=spec.seq_buckets[-1], seed=spec.seed)
    return TrainStream(iter(batches), budget, len(picks), shares, per_row)


class _EvalBatcher:
    """Left-padded prompt batch padded to `batch_size` rows; `valid` marks the real rows."""

    def __init__(self, spec: PipelineSpec, pad_id: int):
        self.spec, self.pad_id = spec, pad_id

    def __call__(self, samples: Sequence[dict]) -> tuple[dict[str, np.ndarray], list[dict]]:
        spec = self.spec
        t = bucket_length(max(len(s["input_ids"]) for s in samples), spec.seq_buckets)
        b = spec.batch_size
        input_ids = np.full((b, t), self.pad_id, np.int32)
        attention = np.zeros((b, t), np.int32)
        for i, s in enumerate(samples):
            n = len(s["input_ids"])
            input_ids[i, t - n:] = s["input_ids"]
            attention[i, t - n:] = 1
        pixels, frame_media = _pad_media(samples, spec.max_media_frames, spec.image_size)
        pixels = np.concatenate([pixels, np.zeros((b - len(samples), *pixels.shape[1:]), np.float32)])
        frame_media = np.concatenate([frame_media, np.full((b - len(samples), frame_media.shape[1]), -1,
                                                           np.int32)])
        valid = np.arange(b) < len(samples)
        batch = {"input_ids": input_ids, "attention_mask": attention, "pixel_values": pixels,
                 "frame_media": frame_media, "valid": valid, **_pad_audio(samples, spec, b)}
        return batch, [s["meta"] for s in samples]


class EvalBatches:
    """This process's generation batches (see `make_eval_batches`); `num_records` counts the records of all
    processes, `local_records` this process's, `num_batches` its batches (the last one may be partly
    padding)."""

    def __init__(self, batches: grain.IterDataset, spec: PipelineSpec, pad_id: int, num_records: int,
                 local_records: int):
        self._batches, self._spec, self._pad_id = batches, spec, pad_id
        self.num_records, self.local_records = num_records, local_records
        self.num_batches = -(-local_records // spec.batch_size)
        self._it: Iterator | None = None

    def padding(self, length: int) -> tuple[dict[str, np.ndarray], list[dict]]:
        """A batch of padding rows only, prompts `length` long (a process out of records still takes part in
        a multi-process generation round), and its empty metadata."""
        spec, b = self._spec, self._spec.batch_size
        k, size = spec.max_media_frames, spec.image_size
        batch = {"input_ids": np.full((b, length), self._pad_id, np.int32),
                 "attention_mask": np.zeros((b, length), np.int32),
                 "pixel_values": np.zeros((b, k, size, size, 3), np.float32),
                 "frame_media": np.full((b, k), -1, np.int32), "valid": np.zeros(b, bool)}
        if spec.audio_mels:  # the sound slots every batch of a model with an audio tower carries
            a = spec.audio_windows
            batch["audio_features"] = np.zeros((b, a, spec.audio_mels, spec.audio_frames), np.float32)
            batch["audio_media"] = np.full((b, a), -1, np.int32)
        return batch, []

    def __iter__(self) -> EvalBatches:
        return self

    def __next__(self) -> tuple[dict[str, np.ndarray], list[dict]]:
        if self._it is None:
            self._it = iter(self._batches)
        return next(self._it)


def _with_index(index: int, example: dict[str, Any]) -> dict[str, Any]:
    return {**example, "index": index}


def make_eval_batches(
    spec: PipelineSpec,
    *,
    tokenizer: text.Tokenizer | None = None,
    process_index: int = 0,
    process_count: int = 1,
    budget: ErrorBudget | None = None,
) -> EvalBatches:
    """Generation batches over every valid record, in source order (no shuffle, one pass).

    Yields `(batch, metadata)`: batch has input_ids int32[B, T] and attention_mask int32[B, T] (prompts
    left padded, ending right after the last "ASSISTANT:"-style prompt), pixel_values float32[B, K, S, S, 3],
    frame_media int32[B, K], valid bool[B] (False on the rows padding the last batch) and, with
    `audio_mels`, audio_features / audio_media as in training; metadata is a list of `{"id", "task",
    "label", "options", "prompt", "answer", "media", "index"}` for the valid rows, in order (`answer`: the
    record's last assistant turn; `media`: `media_kind`; `index`: the record's position in the whole
    stream). With several processes, each evaluates the records `[process_index::process_count]`. Invalid
    records are skipped against the budget like in training.
    """
    tokenizer = _load_tokenizer(spec, tokenizer)
    budget = _budget(spec, budget)
    process_index, process_count = _process_slice(process_index, process_count)
    picks = _select(spec, budget)
    ds = grain.MapDataset.source(mixture.Picked(picks)).map_with_index(_with_index)
    ds = ds[process_index::process_count]
    it = _encoded(ds, spec, _Encoder(spec, tokenizer, for_generation=True))
    it = it.filter(_SkipInvalid(budget))
    batcher = _EvalBatcher(spec, tokenizer.pad_id)
    batches = it.batch(spec.batch_size, drop_remainder=False, batch_fn=batcher)
    return EvalBatches(batches, spec, tokenizer.pad_id, len(picks), len(ds))

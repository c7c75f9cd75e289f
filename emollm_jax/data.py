"""`config.data` and the one place that turns it and the model into a `PipelineSpec`.

Training, evaluation and prediction all build their pipelines with `pipeline_spec`, so they agree on the
template, the tower's preprocessing (size, pad/crop/resize, mean, std), the visual-token count per media item,
the frames per video, the audio tower's front end and audio-token count per sound, the validation mode and the
error budget; only what differs by mode (sources, tasks, batch, buckets, shuffling) is passed in.
`split_sources` reads `config.data.sources.<split>`.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import ml_collections

from data_pipeline import packing, pipeline, storage
from data_pipeline.paths import DEFAULT_MAX_IMAGE_PIXELS
from data_pipeline.records import TASKS
from data_pipeline.sources import VALIDATION_MODES, SourceSpec
from data_pipeline.text import TEMPLATES
from emollm_jax.configuration import Section
from emollm_jax.models.emollm import EmoLLMConfig, audio_tokens_per_item, visual_tokens_per_media
from emollm_jax.models.parts import DECODERS

log = logging.getLogger(__name__)

SOURCE_KEYS = ("path", "weight", "task", "root", "split")


@dataclasses.dataclass(frozen=True)
class DataConfig(Section):
    """`config.data`. Empty `root` / `tokenizer`: mini-EmoBench is generated into the workdir (unless
    `sources` names the training records) and the tiny word-level tokenizer is trained on the training
    records. Empty `template`: the decoder's own chat template.

    `sources.<split>`: the split's record sources, each a path (`.jsonl`, `.json` list, an ArrayRecord shard
    glob or prefix, a TFDS builder directory) or a dict with `path` and optional `weight` (a share of the
    samples), `task` (fills records without one), `root` (its media root) and `split` (of a TFDS directory;
    default: the split's name). Empty: `<root>/<split>.jsonl`.
    """

    root: str = ""                 # EmoBench root with train/test record files
    tokenizer: str = ""            # HF tokenizer dir or tokenizer.json
    sources: dict[str, tuple] = dataclasses.field(default_factory=lambda: {"train": (), "test": ()})
    validate: str = "upfront"      # upfront | lazy | none: when records are checked (data_pipeline.pipeline)
    max_errors: int = 0            # invalid records a stream may skip (each logged) before the run stops
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS  # larger images are an error naming the file
    template: str = ""             # a data_pipeline.text.TEMPLATES name
    max_len: int = 256             # longest training sequence (visual tokens included)
    seq_buckets: tuple[int, ...] = ()  # padded lengths, one compile each; empty: (max_len,)
    packing: bool = False          # training rows of max_len tokens holding several records (segment ids)
    num_frames: int = 4            # frames sampled per video
    audio_windows: int = 1         # audio tower windows read per sound (Whisper: 30 s each); the rest is cut
    train_split: str = "train"
    eval_split: str = "test"
    num_workers: int = 0           # grain worker processes (0: in-process)
    mini_train_per_task: int = 0   # mini-EmoBench train records per task; 0 = the generator's default
    mini_test_per_task: int = 0    # mini-EmoBench test records per task; 0 = the generator's default
    mini_video_files: bool = False

    def check(self) -> None:
        if self.template and self.template not in TEMPLATES:
            self.fail("template", f"unknown chat template; expected '' or one of {tuple(TEMPLATES)}")
        if self.max_len <= 0:
            self.fail("max_len", "must be positive")
        buckets = list(self.seq_buckets)
        if buckets and (buckets != sorted(set(buckets)) or buckets[0] <= 0):
            self.fail("seq_buckets", "must be positive and strictly increasing")
        if self.num_frames <= 0:
            self.fail("num_frames", "must be positive")
        if self.audio_windows <= 0:
            self.fail("audio_windows", "must be positive")
        for field in ("num_workers", "mini_train_per_task", "mini_test_per_task"):
            if getattr(self, field) < 0:
                self.fail(field, "must be >= 0")
        if not self.train_split or not self.eval_split:
            self.fail("train_split" if not self.train_split else "eval_split", "must name a split")
        if self.validate not in VALIDATION_MODES:
            self.fail("validate", f"expected one of {VALIDATION_MODES}")
        if self.max_errors < 0:
            self.fail("max_errors", "must be >= 0")
        if self.max_image_pixels <= 0:
            self.fail("max_image_pixels", "must be positive")
        for split, entries in self.sources.items():
            problem = _sources_problem(entries)
            if problem:
                self.fail("sources", f"split {split!r}: {problem}")


def _sources_problem(entries: Any) -> str | None:
    """Why a `sources.<split>` value is not a tuple of sources (None: it is)."""
    if not isinstance(entries, tuple | list):
        return "expected a tuple of sources (paths or dicts with 'path')"
    weighted = []
    for entry in entries:
        if isinstance(entry, str):
            if not entry:
                return "empty path"
            weighted.append(False)
            continue
        if not isinstance(entry, Mapping) or not isinstance(entry.get("path"), str) or not entry["path"]:
            return f"{entry!r}: expected a path or a dict with 'path'"
        unknown = sorted(set(entry) - set(SOURCE_KEYS))
        if unknown:
            return f"{entry!r}: unknown keys {unknown}; a source has {SOURCE_KEYS}"
        weight = entry.get("weight")
        if weight is not None and (isinstance(weight, bool) or not isinstance(weight, int | float)
                                   or weight <= 0):
            return f"{entry!r}: weight must be a positive number"
        if entry.get("task") is not None and entry["task"] not in TASKS:
            return f"{entry!r}: unknown task; expected one of {TASKS}"
        weighted.append(weight is not None)
    if any(weighted) and not all(weighted):
        return "give every source a weight, or none (natural proportions)"
    return None


def split_sources(config: ml_collections.ConfigDict, split: str,
                  root: str) -> tuple[tuple[SourceSpec, ...], tuple[float, ...] | None]:
    """(sources, weights or None) of `split`: `config.data.sources.<split>`, else `<root>/<split>.jsonl`."""
    entries = tuple(config.data.sources.get(split, ()) or ())
    if not entries:
        path = storage.path(root) / f"{split}.jsonl"
        if not root or not path.is_file():
            raise FileNotFoundError(f"{path}: no {split!r} record file (config.data.root={root!r}); or name "
                                    f"the split's records with config.data.sources.{split}")
        return (SourceSpec(str(path)),), None
    specs, weights = [], []
    for entry in entries:
        entry = {"path": entry} if isinstance(entry, str) else dict(entry)
        path = entry["path"]
        if entry.get("split") is None and os.path.isfile(os.path.join(path, "dataset_info.json")):
            entry["split"] = split
        specs.append(SourceSpec(path, task=entry.get("task"), root=entry.get("root"),
                                split=entry.get("split")))
        weights.append(entry.get("weight"))
    return tuple(specs), tuple(float(w) for w in weights) if weights[0] is not None else None


def has_sources(config: ml_collections.ConfigDict, split: str) -> bool:
    """Whether `config.data.sources.<split>` names the split's records (else `<root>/<split>.jsonl`)."""
    return bool(config.data.sources.get(split, ()))


def template_name(config: ml_collections.ConfigDict) -> str:
    """`config.data.template`, or when empty the decoder's own chat template (its `chat_template`)."""
    return config.data.template or DECODERS.get(config.model.text.kind).chat_template


def pipeline_spec(config: ml_collections.ConfigDict, model_cfg: EmoLLMConfig, *,
                  sources: Sequence[str | SourceSpec], tokenizer: str, data_root: str | None, batch_size: int,
                  training: bool, seq_buckets: Sequence[int] | None = None,
                  weights: Sequence[float] | None = None, tasks: Sequence[str] | None = None,
                  task_weights: Sequence[float] | None = None, max_per_task: int = 0,
                  prompt_prefix: Callable[[Mapping], str] | None = None,
                  validate: str | None = None) -> pipeline.PipelineSpec:
    """The `PipelineSpec` of one data stream.

    training=True: shuffled with the run's seed, repeated, `config.data.num_workers` worker processes,
    buckets `config.data.seq_buckets` (or `(max_len,)`); with `config.data.packing`, rows of `max_len`
    tokens each holding several records (`data_pipeline.packing`). training=False: one pass in source
    order, buckets `seq_buckets` (evaluation derives them from the decoder's context). `batch_size` is per
    process. Validation mode (`validate`, default `config.data.validate`), error budget and image limit come
    from `config.data`.
    """
    cfg = DataConfig.from_config(config.data, "data")  # typed, with the section's defaults for absent keys
    frames = cfg.num_frames
    pre = model_cfg.vision.preprocessing()
    if training:
        buckets = (cfg.max_len,) if cfg.packing else tuple(cfg.seq_buckets) or (cfg.max_len,)
        mode = dict(seed=int(config.seed), shuffle=True, worker_count=cfg.num_workers, packing=cfg.packing)
    else:
        buckets = tuple(seq_buckets or ())
        mode = dict(shuffle=False, num_epochs=1)
    return pipeline.PipelineSpec(
        sources=tuple(sources),
        weights=tuple(weights) if weights is not None else None,
        tasks=tuple(tasks) if tasks is not None else None,
        task_weights=tuple(task_weights) if task_weights else None,
        max_per_task=int(max_per_task),
        tokenizer=tokenizer,
        data_root=data_root or None,
        template=template_name(config),
        image_size=pre.image_size,
        image_mode=pre.mode,
        image_mean=pre.mean,
        image_std=pre.std,
        num_frames=frames,
        max_media_frames=max(frames, 1),
        visual_tokens_fn=functools.partial(visual_tokens_per_media, model_cfg),
        batch_size=int(batch_size),
        seq_buckets=buckets,
        prompt_prefix=prompt_prefix,
        validate=validate or cfg.validate,
        max_errors=cfg.max_errors,
        max_image_pixels=cfg.max_image_pixels,
        **_audio_spec(config, model_cfg),
        **mode,
    )


def packed_row_layout(config: ml_collections.ConfigDict, model_cfg: EmoLLMConfig) -> packing.RowLayout:
    """The row a packed training batch has under `config` (`data_pipeline.packing.row_layout` of the
    training spec): its tokens and its frame and sound-window slots."""
    spec = pipeline_spec(config, model_cfg, sources=("<row layout>",), tokenizer="", data_root=None,
                         batch_size=1, training=True)
    return packing.row_layout(spec)


def _audio_spec(config: ml_collections.ConfigDict, model_cfg: EmoLLMConfig) -> dict[str, Any]:
    """The PipelineSpec fields of the model's audio tower (none without one: sound is then refused)."""
    if model_cfg.audio is None:
        return {}
    pre = model_cfg.audio.preprocessing()
    return dict(audio_mels=pre.n_mels, audio_window_seconds=pre.window_seconds,
                audio_windows=int(config.data.get("audio_windows", 1)),
                audio_tokens_fn=functools.partial(audio_tokens_per_item, model_cfg))


def eval_buckets(model_cfg: EmoLLMConfig, max_new_tokens: int) -> tuple[int, ...]:
    """Prompt lengths for generation, up to the decoder's context minus the answer budget: multiples of 64 up
    to 512, then eight steps per doubling (576, 640, ..., 1024, 1152, ...). A prompt pads by less than 64
    tokens or an eighth of its length (576 visual tokens plus a question land on 640 or 704, not 1024:
    prefill is most of an evaluation's time), and few shapes compile (one per bucket met)."""
    context = int(model_cfg.text.max_position_embeddings) - int(max_new_tokens)
    buckets, b = [], 64
    while b <= context:
        buckets.append(b)
        b += max(64, (1 << (b.bit_length() - 1)) // 8)
    return tuple(buckets) or (context,)


def stage_stream(config: ml_collections.ConfigDict, stage: Any, setup: Any, tokenizer: Any,
                 model_cfg: EmoLLMConfig, local_batch: int, process_index: int, process_count: int, *,
                 workdir: str) -> tuple[pipeline.TrainStream, int]:
    """One training stage's batches: this process's shard of the stage's mixture (the records of
    `stage.tasks` in the training split's sources, weighted by `stage.task_weights` when set), repeated, as a
    resumable iterator whose state holds the error budget's count; and the number of records in the mixture
    (for `epochs`; packed, the rows they fill). Logs one line naming the sources and each task's share of
    the samples."""
    from emollm_jax import emoprompt

    split = config.data.train_split
    sources, weights = split_sources(config, split, setup.root)
    spec = pipeline_spec(config, model_cfg, sources=sources, weights=weights, tasks=tuple(stage.tasks),
                         task_weights=tuple(stage.get("task_weights", ())), tokenizer=setup.tokenizer_path,
                         data_root=setup.root, batch_size=local_batch, training=True,
                         prompt_prefix=emoprompt.from_config(config, setup.root, workdir))
    it = pipeline.make_train_iterator(spec, tokenizer=tokenizer, process_index=process_index,
                                      process_count=process_count)
    shares = ", ".join(f"{task} {100 * share:.1f}%" for task, share in it.task_shares.items())
    packed = f", packed ~{it.records_per_row:.2f} records per row" if spec.packing else ""
    log.info("stage %s: %d records from %s; samples: %s%s", stage.name, it.num_records,
             ", ".join(s.path for s in sources), shares, packed)
    return it, max(1, round(it.num_records / it.records_per_row))

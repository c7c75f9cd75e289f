"""`config.data` and the one place that turns it and the model into a `PipelineSpec`.

Training, evaluation and prediction all build their pipelines with `pipeline_spec`, so they agree on the
template, the tower's preprocessing (size, pad/crop/resize, mean, std), the visual-token count per media item
and the frames per video, and the audio tower's front end and audio-token count per sound; only what differs
by mode (sources, batch, buckets, shuffling) is passed in.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import ml_collections

from data_pipeline import pipeline
from data_pipeline.text import TEMPLATES
from emollm_jax.configuration import Section
from emollm_jax.models.emollm import EmoLLMConfig, audio_tokens_per_item, visual_tokens_per_media
from emollm_jax.models.parts import DECODERS


@dataclasses.dataclass(frozen=True)
class DataConfig(Section):
    """`config.data`. Empty `root` / `tokenizer`: mini-EmoBench is generated into the workdir and the tiny
    word-level tokenizer is trained on it. Empty `template`: the decoder's own chat template."""

    root: str = ""                 # EmoBench root with train/test record files
    tokenizer: str = ""            # HF tokenizer dir or tokenizer.json
    template: str = ""             # a data_pipeline.text.TEMPLATES name
    max_len: int = 256             # longest training sequence (visual tokens included)
    seq_buckets: tuple[int, ...] = ()  # padded lengths, one compile each; empty: (max_len,)
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


def template_name(config: ml_collections.ConfigDict) -> str:
    """`config.data.template`, or when empty the decoder's own chat template (its `chat_template`)."""
    return config.data.template or DECODERS.get(config.model.text.kind).chat_template


def pipeline_spec(config: ml_collections.ConfigDict, model_cfg: EmoLLMConfig, *, sources: Sequence[str],
                  tokenizer: str, data_root: str, batch_size: int, training: bool,
                  seq_buckets: Sequence[int] | None = None, weights: Sequence[float] | None = None,
                  prompt_prefix: Callable[[Mapping], str] | None = None,
                  validate: str = "lazy") -> pipeline.PipelineSpec:
    """The `PipelineSpec` of one data stream.

    training=True: shuffled with the run's seed, repeated, `config.data.num_workers` worker processes,
    buckets `config.data.seq_buckets` (or `(max_len,)`). training=False: one pass in source order, buckets
    `seq_buckets` (evaluation derives them from the decoder's context). `batch_size` is per process.
    """
    frames = int(config.data.num_frames)
    pre = model_cfg.vision.preprocessing()
    if training:
        buckets = tuple(config.data.seq_buckets) or (int(config.data.max_len),)
        mode = dict(seed=int(config.seed), shuffle=True, worker_count=int(config.data.num_workers))
    else:
        buckets = tuple(seq_buckets or ())
        mode = dict(shuffle=False, num_epochs=1)
    return pipeline.PipelineSpec(
        sources=tuple(sources),
        weights=tuple(weights) if weights is not None else None,
        tokenizer=tokenizer,
        data_root=data_root,
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
        validate=validate,
        **_audio_spec(config, model_cfg),
        **mode,
    )


def _audio_spec(config: ml_collections.ConfigDict, model_cfg: EmoLLMConfig) -> dict[str, Any]:
    """The PipelineSpec fields of the model's audio tower (none without one: sound is then refused)."""
    if model_cfg.audio is None:
        return {}
    pre = model_cfg.audio.preprocessing()
    return dict(audio_mels=pre.n_mels, audio_window_seconds=pre.window_seconds,
                audio_windows=int(config.data.get("audio_windows", 1)),
                audio_tokens_fn=functools.partial(audio_tokens_per_item, model_cfg))


def eval_buckets(model_cfg: EmoLLMConfig, max_new_tokens: int) -> tuple[int, ...]:
    """Prompt lengths for generation: powers of two up to the decoder's context minus the answer budget."""
    context = int(model_cfg.text.max_position_embeddings) - int(max_new_tokens)
    return tuple(b for b in (64, 128, 256, 512, 1024, 2048, 4096, 8192) if b <= context) or (context,)


def stage_records(root: str, split: str, tasks: Sequence[str], out: Path) -> tuple[Path, int]:
    """Writes the records of `tasks` from `<root>/<split>.jsonl` to `out` (a stage's mixture, in file order);
    returns (path, record count). Rewritten atomically, so concurrent processes agree."""
    from data_pipeline.records import iter_records

    src = Path(root) / f"{split}.jsonl"
    if not src.exists():
        raise FileNotFoundError(f"{src}: no {split!r} record file (config.data.root={root!r})")
    lines = [json.dumps(rec) for _, rec in iter_records(src) if rec.get("task") in tasks]
    if not lines:
        raise ValueError(f"{src}: no record of tasks {list(tasks)}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(out)
    return out, len(lines)


def stage_stream(config: ml_collections.ConfigDict, stage: Any, setup: Any, tokenizer: Any,
                 model_cfg: EmoLLMConfig, local_batch: int, process_index: int, process_count: int, *,
                 workdir: str) -> tuple[Any, int]:
    """One training stage's batches: this process's shard of the stage's task mixture, repeated, as a
    resumable Grain iterator; and the number of records in the mixture (for `epochs`)."""
    from emollm_jax import emoprompt

    path, n = stage_records(setup.root, config.data.train_split, tuple(stage.tasks),
                            Path(workdir) / "mixtures" / f"{stage.name}_{config.data.train_split}.jsonl")
    spec = pipeline_spec(config, model_cfg, sources=(str(path),), tokenizer=setup.tokenizer_path,
                         data_root=setup.root, batch_size=local_batch, training=True,
                         prompt_prefix=emoprompt.from_config(config, setup.root, workdir))
    it = pipeline.make_train_iterator(spec, tokenizer=tokenizer, process_index=process_index,
                                      process_count=process_count)
    return it, n

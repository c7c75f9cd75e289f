"""EmoBench evaluation: generate answers, map them to labels, score per task, write the report.

`run_eval(config, workdir)` is `main.py --mode=eval`. Scoring follows EmoBench: accuracy per sub-task (emo_c,
emo_o, intent, hate, humor, sarcasm) and their plain mean; objective tasks (caption, vqa) are reported beside
it, not in the mean. Macro-F1 and a confusion matrix per task are our additions. An answer that cannot be
mapped to a label counts as wrong and is listed in the report.

Each task is also scored per input kind (image, video, audio, image+audio, video+audio, text), so the
blank-image and silent-audio controls show which records lose their cue.

Outputs under `<workdir>/eval/`: results.json, report.md, predictions.jsonl, confusion_<task>.png.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from data_pipeline import storage
from data_pipeline.records import OBJECTIVE_TASKS
from emollm_jax import eval_report
from emollm_jax.answers import EMOBENCH_TASKS, OPEN_SET_TASKS, AnswerParser, load_synonyms, normalize
from emollm_jax.configuration import Section
from emollm_jax.models.parts import PartConfig

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class EvalConfig(Section):
    """`config.eval`: how answers are generated and scored."""

    batch_size: int = 32       # prompts per generation batch (all processes)
    max_new_tokens: int = 8    # answer budget
    max_examples: int = 0      # per task; 0 = the whole split
    control_split: str = ""    # blank-image control split; empty: `<eval_split>_blank` when present
    audio_control_split: str = ""  # silent-audio control split; empty: `<eval_split>_silent` when present
    synonyms: str = ""         # JSON file extending the answer parser's synonym table
    dtype: str = "float32"     # weights and compute of eval and predict (every part; the loaded params cast)

    def check(self) -> None:
        for field in ("batch_size", "max_new_tokens"):
            if getattr(self, field) <= 0:
                self.fail(field, "must be positive")
        if self.dtype not in PartConfig.dtypes:
            self.fail("dtype", f"unknown dtype; expected one of {PartConfig.dtypes}")
        if self.max_examples < 0:
            self.fail("max_examples", "must be >= 0 (0: every example)")


# ------------------------------------------------------------------------------------------ pure metrics


def accuracy(preds: Sequence[str | None], golds: Sequence[str]) -> float:
    """Fraction of `preds[i] == golds[i]`; None (unparseable) is wrong. NaN for no examples."""
    if len(preds) != len(golds):
        raise ValueError(f"accuracy: {len(preds)} predictions vs {len(golds)} gold labels")
    if not golds:
        return float("nan")
    return sum(p is not None and p == g for p, g in zip(preds, golds, strict=True)) / len(golds)


def confusion_matrix(preds: Sequence[str | None], golds: Sequence[str], labels: Sequence[str]) -> np.ndarray:
    """int64[L, L + 1]: row = gold label, column = predicted label; the last column counts predictions that
    are None or not in `labels`. Rows sum to the number of examples with that gold label."""
    index = {label: i for i, label in enumerate(labels)}
    out = np.zeros((len(labels), len(labels) + 1), np.int64)
    for p, g in zip(preds, golds, strict=True):
        if g not in index:
            raise ValueError(f"confusion_matrix: gold label {g!r} is not in labels {list(labels)}")
        out[index[g], index.get(p, len(labels)) if p is not None else len(labels)] += 1
    return out


def macro_f1(preds: Sequence[str | None], golds: Sequence[str], labels: Sequence[str]) -> float:
    """Unweighted mean over classes of F1 = 2TP / (2TP + FP + FN).

    Classes: the `labels` that occur as a gold label or a prediction (a class absent from both has no F1).
    None predictions are false negatives of the gold class. NaN for no examples.
    """
    if not golds:
        return float("nan")
    cm = confusion_matrix(preds, golds, labels)
    tp = np.diag(cm[:, : len(labels)]).astype(np.float64)
    predicted = cm[:, : len(labels)].sum(axis=0)
    gold = cm.sum(axis=1)
    present = (predicted + gold) > 0
    f1 = 2 * tp / np.maximum(predicted + gold, 1)  # 2TP / (2TP + FP + FN) = 2TP / (|pred c| + |gold c|)
    return float(f1[present].mean())


# --------------------------------------------------------------------------------------------- scoring


@dataclasses.dataclass(frozen=True)
class Prediction:
    """One evaluated record. `parsed` is None when the answer maps to no label."""

    id: str
    task: str
    prompt: str
    answer: str
    parsed: str | None
    gold: str
    split: str = ""
    options: tuple[str, ...] = ()
    media: str = ""  # the record's input kind (`data_pipeline.pipeline.media_kind`)


def task_order(tasks: Iterable[str]) -> list[str]:
    """EmoBench's six first (paper order), then objective tasks, then anything else alphabetically."""
    known = list(EMOBENCH_TASKS) + list(OBJECTIVE_TASKS)
    tasks = set(tasks)
    return [t for t in known if t in tasks] + sorted(tasks - set(known))


def parse_predictions(metas: Sequence[Mapping[str, Any]], answers: Sequence[str], *, split: str,
                      parser: AnswerParser | None = None) -> list[Prediction]:
    """Maps raw answers to labels. Open-set tasks parse against the task's gold labels in this split."""
    parser = parser or AnswerParser()
    space: dict[str, set[str]] = {}
    for m in metas:
        space.setdefault(m["task"], set()).update([str(m.get("label", ""))] + list(m.get("options") or []))
    out = []
    for m, answer in zip(metas, answers, strict=True):
        task, options = m["task"], list(m.get("options") or [])
        label_space = sorted(space[task]) if (task in OPEN_SET_TASKS or not options) else None
        parsed = parser.parse(answer, task, options if task not in OPEN_SET_TASKS else None, label_space)
        out.append(Prediction(id=str(m["id"]), task=task, prompt=str(m.get("prompt", "")), answer=answer,
                              parsed=parsed, gold=str(m.get("label", "")), split=split,
                              options=tuple(options), media=str(m.get("media") or "")))
    return out


def _same(parsed: str | None, gold: str) -> bool:
    return parsed is not None and normalize(parsed) == normalize(gold)


def score(predictions: Sequence[Prediction]) -> dict[str, Any]:
    """Per-task n / correct / accuracy / macro-F1 / unparseable / labels / confusion, and the EmoBench mean.

    Labels compare after `answers.normalize` ("Joy" == "joy"); a task's label set is its gold labels and
    options, sorted.
    """
    by_task: dict[str, list[Prediction]] = {}
    for p in predictions:
        by_task.setdefault(p.task, []).append(p)
    tasks: dict[str, dict[str, Any]] = {}
    for task in task_order(by_task):
        preds = by_task[task]
        golds = [normalize(p.gold) for p in preds]
        parsed = [normalize(p.parsed) if p.parsed is not None else None for p in preds]
        labels = sorted(set(golds) | {normalize(o) for p in preds for o in p.options})
        tasks[task] = {
            "n": len(preds),
            "correct": sum(_same(p.parsed, p.gold) for p in preds),
            "accuracy": accuracy(parsed, golds),
            "macro_f1": macro_f1(parsed, golds, labels),
            "unparseable": sum(p.parsed is None for p in preds),
            "objective": task not in EMOBENCH_TASKS,
            "labels": labels,
            "confusion": confusion_matrix(parsed, golds, labels).tolist(),
            "by_media": _by_media(preds),
        }
    present = [t for t in EMOBENCH_TASKS if t in tasks]
    mean = float(np.mean([tasks[t]["accuracy"] for t in present])) if present else float("nan")
    return {"n": len(predictions), "tasks": tasks, "emobench_mean": mean, "emobench_tasks": present,
            "emobench_missing": [t for t in EMOBENCH_TASKS if t not in tasks]}


def _by_media(preds: Sequence[Prediction]) -> dict[str, dict[str, Any]]:
    """n / correct / accuracy of a task's predictions per input kind (records without one: none)."""
    out: dict[str, dict[str, Any]] = {}
    for kind in sorted({p.media for p in preds if p.media}):
        some = [p for p in preds if p.media == kind]
        correct = sum(_same(p.parsed, p.gold) for p in some)
        out[kind] = {"n": len(some), "correct": correct, "accuracy": correct / len(some)}
    return out


def control_drop(main: Mapping[str, Any], control: Mapping[str, Any]) -> dict[str, float]:
    """Accuracy points lost on the blank-image control split, per task and for the EmoBench mean.

    A model that reads the image should drop on image-dependent tasks; ~0 drop means it answers from text.
    """
    drop = {t: main["tasks"][t]["accuracy"] - control["tasks"][t]["accuracy"]
            for t in main["tasks"] if t in control["tasks"]}
    drop["emobench_mean"] = main["emobench_mean"] - control["emobench_mean"]
    return drop


def write_outputs(out_dir: str | os.PathLike, results: Mapping[str, Any],
                  predictions: Sequence[Prediction]) -> None:
    """results.json, report.md, predictions.jsonl and one confusion PNG per task of the main split."""
    out_dir = storage.path(out_dir)
    rows = [dataclasses.asdict(p) for p in predictions]
    eval_report.write_jsonl(out_dir / "predictions.jsonl",
                            ({k: v for k, v in r.items() if k not in ("options", "media")} for r in rows))
    eval_report.write_json(out_dir / "results.json", results)
    report = eval_report.render_report(results, rows)
    eval_report.atomic_write(out_dir / "report.md", lambda f: f.write(report))
    for task, r in results["splits"][results["split"]]["tasks"].items():
        title = f"{task}: accuracy {100 * r['accuracy']:.1f}% (n={r['n']})"
        eval_report.plot_confusion(out_dir / f"confusion_{task}.png", np.asarray(r["confusion"]), r["labels"],
                                   title)


def assemble_results(per_split: Mapping[str, Mapping[str, Any]], main_split: str,
                     control_split: str | None, *, checkpoint: str | None = None,
                     audio_control_split: str | None = None) -> dict[str, Any]:
    """results.json content: every split's scores, the main split's headline numbers, and the drops on the
    blank-image control (`control`) and the silent-audio control (`audio_control`)."""
    main = per_split[main_split]
    results: dict[str, Any] = {
        "split": main_split,
        "checkpoint": checkpoint,
        "emobench_mean": main["emobench_mean"],
        "accuracy": {t: r["accuracy"] for t, r in main["tasks"].items()},
        "splits": dict(per_split),
        "control": None,
        "audio_control": None,
    }
    for key, split in (("control", control_split), ("audio_control", audio_control_split)):
        if split and split in per_split:
            control = per_split[split]
            results[key] = {"split": split, "tasks": control["tasks"],
                            "emobench_mean": control["emobench_mean"], "drop": control_drop(main, control)}
    return results


# ------------------------------------------------------------------------------------------ generation


def decode_answer(ids: Sequence[int], tokenizer: Any, stop_ids: Iterable[int]) -> str:
    """Text of generated ids up to (not including) the first stop id, without special tokens."""
    stops = set(int(s) for s in stop_ids)
    kept = []
    for t in ids:
        if int(t) in stops:
            break
        kept.append(int(t))
    kept = [t for t in kept if t != tokenizer.pad_id]
    return tokenizer.decode(kept, skip_special_tokens=True).strip()


_MODEL_INPUTS = ("input_ids", "attention_mask", "pixel_values", "frame_media")
_AUDIO_INPUTS = ("audio_features", "audio_media")  # in every batch of a model with an audio tower
# (media values, their slot -> item map): the slots of a batch row, real ones first, -1 for the unused rest
_MEDIA_SLOTS = (("pixel_values", "frame_media"), ("audio_features", "audio_media"))


def slots_needed(slots: np.ndarray) -> int:
    """Slots of int[B, K] (real slots first, -1 after) that some row uses, rounded up to a power of two (so
    few shapes compile), at least 1 and at most K."""
    slots = np.asarray(slots)
    used = int((slots >= 0).sum(axis=1).max(initial=0))
    return min(slots.shape[1], 1 << max(used - 1, 0).bit_length())


def trim_media(batch: Mapping[str, Any], keep: Mapping[str, int] | None = None) -> dict[str, Any]:
    """`batch` without the media slots no row uses: pixel_values float[B, K, S, S, 3] and frame_media
    int32[B, K] cut to `slots_needed` slots, audio_features / audio_media likewise (with `keep`, only the
    slot keys it names, to its counts: processes sharing a global batch agree on them).
    The pipeline gives every row `data.num_frames` frame slots; a batch of images fills one, and the tower
    would otherwise run on all B x K frames."""
    out = dict(batch)
    for values, slots in _MEDIA_SLOTS:
        if out.get(slots) is None or out.get(values) is None or (keep is not None and slots not in keep):
            continue
        k = keep[slots] if keep is not None else slots_needed(out[slots])
        out[values], out[slots] = np.asarray(out[values])[:, :k], np.asarray(out[slots])[:, :k]
    return out


def model_mesh(model: Any) -> Any:
    """The mesh `model`'s parameters are laid out on when it spans several devices (then prompts go in as
    global batches split over its batch axes), else None (prompts go in as host arrays)."""
    import jax
    from flax import nnx
    from jax.sharding import NamedSharding

    leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
    sh = getattr(leaves[0], "sharding", None) if leaves else None
    return sh.mesh if isinstance(sh, NamedSharding) and sh.mesh.size > 1 else None


def _aligned(batches: Iterable, mesh: Any, pad_id: int) -> Iterable[tuple[dict, Sequence[Mapping]]]:
    """Each process's batches as global batches on `mesh`: every process takes part in every round (a
    process out of batches sends padding rows), and all pad their prompts on the left to the round's
    longest bucket. Yields (global batch, this process's metadata rows)."""
    from emollm_jax import sharding

    it = iter(batches)
    while True:
        item = next(it, None)
        mine = [item is not None, item[0]["input_ids"].shape[1] if item is not None else 0,
                slots_needed(item[0]["frame_media"]) if item is not None else 1]
        everyone = np.asarray(sharding.gather_json(mine))
        if not everyone[:, 0].any():
            return
        length = int(everyone[:, 1].max())
        batch, rows = item if item is not None else batches.padding(length)
        batch = trim_media(batch, {"frame_media": int(everyone[:, 2].max())})
        pad = length - batch["input_ids"].shape[1]
        host = {k: np.asarray(batch[k]) for k in _MODEL_INPUTS + _AUDIO_INPUTS if k in batch}
        if pad:
            host["input_ids"] = np.pad(host["input_ids"], ((0, 0), (pad, 0)), constant_values=pad_id)
            host["attention_mask"] = np.pad(host["attention_mask"], ((0, 0), (pad, 0)))
        yield sharding.global_batch(host, mesh), rows


def _host_tokens(tokens: Any, mesh: Any) -> np.ndarray:
    """This process's rows of generated tokens (a global array when the model spans several devices)."""
    if mesh is None:
        return np.asarray(tokens)
    from jax.experimental import multihost_utils

    from emollm_jax import sharding

    every_row = np.asarray(multihost_utils.process_allgather(tokens, tiled=True))
    return every_row[sharding.local_rows(every_row.shape[0], mesh)]


def generate_answers(model: Any, batches: Iterable[tuple[Mapping[str, np.ndarray], Sequence[Mapping]]],
                     tokenizer: Any, *, max_new_tokens: int, stop_ids: Sequence[int],
                     total: int | None = None, desc: str = "eval",
                     generate_fn: Callable[..., Any] | None = None,
                     progress: bool = True) -> tuple[list[Mapping], list[str]]:
    """Greedy answers for every prompt of `batches` ((left-padded batch, metadata rows) pairs).

    A batch may hold padding rows beyond its metadata (fixed shapes avoid recompiles); they are ignored. Media
    slots no row uses are cut first (`trim_media`). Each batch's tokens are read back once the next batch is
    dispatched, so the pipeline makes the next batch while the device generates.
    `generate_fn` defaults to `emollm_jax.generate.generate`; it returns the new tokens `int32[B, N]`. When
    the model spans several devices (`model_mesh`), `batches` (a `pipeline.EvalBatches`) holds this
    process's prompts, each round's global batch gathers every process's, and this process's answers come
    back: every process must call this.
    """
    from tqdm.auto import tqdm

    if generate_fn is None:
        from emollm_jax.generate import generate as generate_fn
    mesh = model_mesh(model)
    rounds = (map(lambda item: (trim_media(item[0]), item[1]), batches) if mesh is None
              else _aligned(batches, mesh, tokenizer.pad_id))
    metas: list[Mapping] = []
    answers: list[str] = []

    def collect(out: Any, rows: Sequence[Mapping]) -> None:
        for row, meta in zip(_host_tokens(out, mesh), rows, strict=False):
            metas.append(meta)
            answers.append(decode_answer(row, tokenizer, stop_ids))

    pending = None  # the previous batch: its tokens are read after the next batch is dispatched
    for batch, rows in tqdm(rounds, total=total, desc=desc, unit="batch", disable=not progress):
        out = generate_fn(model, batch["input_ids"], batch["attention_mask"],
                          pixel_values=batch.get("pixel_values"), frame_media=batch.get("frame_media"),
                          audio_features=batch.get("audio_features"), audio_media=batch.get("audio_media"),
                          max_new_tokens=max_new_tokens, eos_id=tuple(int(t) for t in stop_ids),
                          pad_id=tokenizer.pad_id)
        if pending is not None:
            collect(*pending)
        pending = out, rows
    if pending is not None:
        collect(*pending)
    return metas, answers


def gather_answers(metas: Sequence[Mapping], answers: Sequence[str]) -> tuple[list[Mapping], list[str]]:
    """Every process's (metadata, answer) pairs, in stream order (each meta's `index`), on every process."""
    from emollm_jax import sharding

    pairs = [pair for part in sharding.gather_json([list(metas), list(answers)])
             for pair in zip(*part, strict=True)]
    pairs.sort(key=lambda pair: pair[0]["index"])
    return [m for m, _ in pairs], [a for _, a in pairs]


# ------------------------------------------------------------------------------------------- composition


def eval_dtype(config: Any) -> str:
    """`config.eval.dtype` (float32 for a config written before the key existed)."""
    return str(config.eval.get("dtype", "float32"))


def eval_model(config: Any, model: Any, *, donate: bool = False) -> Any:
    """The model eval and predict run: `model` cast to `config.eval.dtype` (`cast_model`), logged."""
    from emollm_jax.model_dtype import cast_model, param_dtypes

    model = cast_model(model, eval_dtype(config), donate=donate)
    log.info("eval weights and compute in %s (parameters per dtype: %s)", eval_dtype(config),
             param_dtypes(model))
    return model


def load_model(config: Any, workdir: str | os.PathLike, tokenizer: Any,
               init_from: str | None = None) -> tuple[Any, str]:
    """The model to evaluate, laid out on the configured mesh (`config.mesh`, `config.sharding_rules`) in
    `config.eval.dtype`, and where its weights came from: `init_from` (HF dir or params checkpoint) if given,
    else the latest checkpoint under `<workdir>/checkpoints`, restored straight onto the mesh."""
    import jax
    from flax import nnx

    from emollm_jax import experiment, sharding
    from emollm_jax.train import abstract_model

    model_cfg = experiment.model_config(config, vocab_size=tokenizer.vocab_size,
                                        image_token_id=tokenizer.image_token_id, init_from=init_from,
                                        audio_token_id=getattr(tokenizer, "audio_token_id", None))
    graphdef, abstract, rest = abstract_model(model_cfg, int(config.seed))
    mesh = sharding.make_mesh(dict(config.mesh))
    shardings = sharding.logical_shardings(abstract, mesh, config.sharding_rules)
    if init_from:
        model = experiment.new_model(model_cfg, int(config.seed))
        experiment.load_initial_weights(config, model, init_from)
        params = jax.device_put(nnx.state(model, nnx.Param), shardings)
        return eval_model(config, nnx.merge(graphdef, params, rest), donate=True), str(init_from)
    from emollm_jax.checkpoint import Checkpointer, restore_latest_params

    ckpt_dir = storage.path(workdir) / "checkpoints"
    step = None
    if ckpt_dir.exists():
        with Checkpointer(ckpt_dir) as ckpt:
            step = ckpt.latest_step()
    if step is None:
        raise FileNotFoundError(f"{ckpt_dir}: no checkpoint to evaluate; train first (--mode=train) or pass "
                                "--init_from=<HF dir or params checkpoint>")
    step, params = restore_latest_params(ckpt_dir, abstract, shardings)  # the newest step that verifies
    return eval_model(config, nnx.merge(graphdef, params, rest), donate=True), f"{ckpt_dir} step {step}"


def eval_batch_size(config: Any, model: Any, process_count: int = 1) -> int:
    """Prompts per process per generation batch: `config.eval.batch_size` over all processes, rounded up so
    the global batch splits evenly over the processes and the model's batch axes."""
    import math

    from emollm_jax import sharding

    mesh = model_mesh(model)
    shards = math.prod(mesh.shape[a] for a in sharding.batch_axes(config.sharding_rules)) if mesh else 1
    step = math.lcm(shards, process_count)
    return -(-int(config.eval.batch_size) // step) * step // process_count


def record_batches(config: Any, records: Any, data_root: str | os.PathLike | None, tokenizer: Any,
                   model: Any, *, prompt_prefix: Callable[[Mapping], str] | None = None,
                   max_examples: int = 0, validate: str | None = None, process_index: int = 0,
                   process_count: int = 1) -> tuple[Any, int]:
    """(batches, number of batches of this process) of left-padded prompts for `records`: a record file, or
    `data_pipeline.sources.SourceSpec`s (`data.split_sources`). This process reads the records
    `[process_index::process_count]`.

    `max_examples` > 0 evaluates the first records of each task, ceil(max_examples / tasks) of each (a quick
    eval that still covers every task). Sequence buckets are powers of two up to the decoder's context minus
    the answer budget; a longer prompt is an error naming the record.
    """
    from data_pipeline import pipeline
    from emollm_jax import data

    sources = (str(records),) if isinstance(records, str | os.PathLike) else tuple(records)
    spec = data.pipeline_spec(
        config, model.config, sources=sources, tokenizer=str(getattr(tokenizer, "name", "")),
        data_root=str(data_root) if data_root else None,
        batch_size=eval_batch_size(config, model, process_count), training=False,
        seq_buckets=data.eval_buckets(model.config, int(config.eval.max_new_tokens)),
        max_per_task=int(max_examples), prompt_prefix=prompt_prefix, validate=validate)
    batches = pipeline.make_eval_batches(spec, tokenizer=tokenizer, process_index=process_index,
                                         process_count=process_count)
    return batches, batches.num_batches


def stop_ids(config: Any, tokenizer: Any) -> list[int]:
    """Token ids that end an answer: the template's end-of-turn token, then eos."""
    from data_pipeline.text import end_of_turn_id
    from emollm_jax.data import template_name

    eot = end_of_turn_id(template_name(config), tokenizer)
    return list(dict.fromkeys([int(eot), int(tokenizer.eos_id)]))


def answer_parser(config: Any) -> AnswerParser:
    """Default synonym table, extended by `config.eval.synonyms` (a JSON file) when set."""
    path = config.eval.get("synonyms", "")
    return AnswerParser(load_synonyms(path)) if path else AnswerParser()


def eval_splits(config: Any, root: str) -> tuple[list[str], str, str]:
    """(splits to evaluate, the blank-image control's name, the silent-audio control's name):
    `config.data.eval_split`, and its controls (`config.eval.control_split`, default `<eval_split>_blank`;
    `config.eval.audio_control_split`, default `<eval_split>_silent`) when their records exist."""
    from emollm_jax.data import has_sources

    main_split = config.data.eval_split
    control = config.eval.get("control_split", "") or f"{main_split}_blank"
    silent = config.eval.get("audio_control_split", "") or f"{main_split}_silent"

    def present(split: str) -> bool:
        return split != main_split and (
            has_sources(config, split) or bool(root) and (storage.path(root) / f"{split}.jsonl").is_file())

    return [main_split] + [s for s in (control, silent) if present(s)], control, silent


def run_eval(config: Any, workdir: str | os.PathLike, *, model: Any = None, tokenizer: Any = None,
             splits: Sequence[str] | None = None, init_from: str | None = None,
             out_dir: str | os.PathLike | None = None, progress: bool = True) -> dict[str, Any]:
    """Evaluates on `splits` (default: `eval_splits`: the test split and its blank-image and silent-audio
    controls when present) and writes `<workdir>/eval/{results.json, report.md, predictions.jsonl,
    confusion_<task>.png}`. A split's records come from `config.data.sources.<split>` (else
    `<root>/<split>.jsonl`) through the same pipeline spec as training's.

    With several processes each generates answers for its share of the records
    (`[process_index::process_count]`) and the answers are gathered: the results are those of one process.
    `model`/`tokenizer` skip loading (e.g. right after training). The weights are cast to `config.eval.dtype`
    first; results.json records it (`dtype`) and the parameter count per dtype of the weights evaluated
    (`param_dtypes`). Returns the results.json content.
    """
    import jax

    from emollm_jax import data, emoprompt, experiment, model_dtype

    setup = experiment.prepare_data(config, workdir)
    tokenizer = tokenizer or experiment.load_tokenizer(setup)
    checkpoint = "in-memory model"
    if model is None:
        model, checkpoint = load_model(config, workdir, tokenizer, init_from)
    else:
        model = eval_model(config, model)
    default_splits, control, silent = eval_splits(config, setup.root)
    splits = list(splits) if splits is not None else default_splits
    prefix = emoprompt.from_config(config, setup.root, workdir)
    parser = answer_parser(config)
    stops = stop_ids(config, tokenizer)
    per_split: dict[str, dict[str, Any]] = {}
    predictions: list[Prediction] = []
    for split in splits:
        sources, _ = data.split_sources(config, split, setup.root)
        batches, total = record_batches(config, sources, setup.root, tokenizer, model, prompt_prefix=prefix,
                                        max_examples=int(config.eval.max_examples),
                                        process_index=jax.process_index(), process_count=jax.process_count())
        log.info("eval %s: %d records, %d of them on process %d of %d", split, batches.num_records,
                 batches.local_records, jax.process_index(), jax.process_count())
        metas, answers = generate_answers(
            model, batches, tokenizer, max_new_tokens=int(config.eval.max_new_tokens), stop_ids=stops,
            total=total, desc=f"eval {split}", progress=progress and jax.process_index() == 0)
        metas, answers = gather_answers(metas, answers)
        metas = [m if m.get("label") is not None else {**m, "label": m.get("answer", "")} for m in metas]
        preds = parse_predictions(metas, answers, split=split, parser=parser)
        per_split[split] = score(preds)
        predictions += preds
    results = assemble_results(per_split, splits[0], control if control != splits[0] else None,
                               checkpoint=checkpoint,
                               audio_control_split=silent if silent != splits[0] else None)
    results.update(dtype=eval_dtype(config), param_dtypes=model_dtype.param_dtypes(model))
    if jax.process_index() == 0:
        write_outputs(out_dir or storage.join(workdir, "eval"), results, predictions)
    return results

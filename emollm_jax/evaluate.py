"""EmoBench evaluation: generate answers, map them to labels, score per task, write the report.

`run_eval(config, workdir)` is `main.py --mode=eval`. Scoring follows EmoBench: accuracy per sub-task (emo_c,
emo_o, intent, hate, humor, sarcasm) and their plain mean; objective tasks (caption, vqa) are reported beside
it, not in the mean. Macro-F1 and a confusion matrix per task are our additions. An answer that cannot be
mapped to a label counts as wrong and is listed in the report.

Outputs under `<workdir>/eval/`: results.json, report.md, predictions.jsonl, confusion_<task>.png.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from emollm_jax import eval_report
from emollm_jax.answers import EMOBENCH_TASKS, OPEN_SET_TASKS, AnswerParser, normalize

OBJECTIVE_TASKS = ("caption", "vqa")

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
                              options=tuple(options)))
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
        }
    present = [t for t in EMOBENCH_TASKS if t in tasks]
    mean = float(np.mean([tasks[t]["accuracy"] for t in present])) if present else float("nan")
    return {"n": len(predictions), "tasks": tasks, "emobench_mean": mean, "emobench_tasks": present,
            "emobench_missing": [t for t in EMOBENCH_TASKS if t not in tasks]}


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
    out_dir = Path(out_dir)
    rows = [dataclasses.asdict(p) for p in predictions]
    eval_report.write_jsonl(out_dir / "predictions.jsonl",
                            ({k: v for k, v in r.items() if k != "options"} for r in rows))
    eval_report.write_json(out_dir / "results.json", results)
    report = eval_report.render_report(results, rows)
    eval_report.atomic_write(out_dir / "report.md", lambda f: f.write(report))
    for task, r in results["splits"][results["split"]]["tasks"].items():
        title = f"{task}: accuracy {100 * r['accuracy']:.1f}% (n={r['n']})"
        eval_report.plot_confusion(out_dir / f"confusion_{task}.png", np.asarray(r["confusion"]), r["labels"],
                                   title)


def assemble_results(per_split: Mapping[str, Mapping[str, Any]], main_split: str,
                     control_split: str | None, *, checkpoint: str | None = None) -> dict[str, Any]:
    """results.json content: every split's scores, the main split's headline numbers, the control drop."""
    main = per_split[main_split]
    results: dict[str, Any] = {
        "split": main_split,
        "checkpoint": checkpoint,
        "emobench_mean": main["emobench_mean"],
        "accuracy": {t: r["accuracy"] for t, r in main["tasks"].items()},
        "splits": dict(per_split),
        "control": None,
    }
    if control_split and control_split in per_split:
        control = per_split[control_split]
        results["control"] = {"split": control_split, "tasks": control["tasks"],
                              "emobench_mean": control["emobench_mean"], "drop": control_drop(main, control)}
    return results

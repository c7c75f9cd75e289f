"""Evaluation output files: results.json, report.md, predictions.jsonl, confusion_<task>.png.

Pure formatting from the dicts `evaluate.score` builds; every file is written atomically (tmp + rename, or one
upload on an object store: `data_pipeline.storage.atomic_write`) so a killed evaluation never leaves a
half-written report next to an old one.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from data_pipeline.storage import atomic_write


def _json_safe(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if isinstance(value, np.ndarray):
        return _json_safe(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_json(path: str | os.PathLike, data: Mapping[str, Any]) -> None:
    text = json.dumps(_json_safe(data), indent=1, ensure_ascii=False) + "\n"
    atomic_write(path, lambda f: f.write(text))


def write_jsonl(path: str | os.PathLike, rows: Iterable[Mapping[str, Any]]) -> None:
    def write(f) -> None:
        for row in rows:
            f.write(json.dumps(_json_safe(row), ensure_ascii=False) + "\n")

    atomic_write(path, write)


def _pct(x: float | None) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}"


def render_report(results: Mapping[str, Any], predictions: Sequence[Mapping[str, Any]]) -> str:
    """Markdown: a per-task table (accuracy, macro-F1, unparseable, each control's accuracy and drop), the
    EmoBench mean, the accuracy per task and input kind on every split, and every unparseable answer (never
    dropped)."""
    main = results["splits"][results["split"]]
    controls = [c for c in (results.get("control"), results.get("audio_control")) if c]
    lines = [f"# EmoBench evaluation: split `{results['split']}`", ""]
    if results.get("checkpoint") is not None:
        lines += [f"Checkpoint: `{results['checkpoint']}`", ""]
    header = "| task | n | accuracy (%) | macro-F1 (%) | unparseable |"
    rule = "|---|---:|---:|---:|---:|"
    for control in controls:
        header += f" accuracy on `{control['split']}` (%) | drop (points) |"
        rule += "---:|---:|"
    lines += [header, rule]
    for task, r in main["tasks"].items():
        row = f"| {task} | {r['n']} | {_pct(r['accuracy'])} | {_pct(r['macro_f1'])} | {r['unparseable']} |"
        for control in controls:
            c = control["tasks"].get(task)
            row += f" {_pct(c['accuracy']) if c else '-'} | {_pct(control['drop'].get(task))} |"
        lines.append(row)
    n_tasks = len(main["emobench_tasks"])
    mean_row = f"| **EmoBench mean** ({n_tasks} of 6) | | **{_pct(main['emobench_mean'])}** | | |"
    for control in controls:
        mean_row += f" {_pct(control['emobench_mean'])} | {_pct(control['drop'].get('emobench_mean'))} |"
    lines += [mean_row, ""]
    if main["emobench_missing"]:
        lines += [f"Missing EmoBench tasks (not in the mean): {', '.join(main['emobench_missing'])}.", ""]
    lines += ["Accuracy counts unparseable answers as wrong. The EmoBench mean is the plain mean of the six "
              "sub-task accuracies (objective tasks excluded).", ""]
    lines += _by_input(main, controls)
    bad = [p for p in predictions if p["parsed"] is None]
    lines += [f"## Unparseable answers ({len(bad)})", ""]
    if bad:
        lines += ["| split | id | task | answer | gold |", "|---|---|---|---|---|"]
        for p in bad:
            answer = p["answer"].replace("|", "\\|").replace("\n", " ") or "(empty)"
            lines.append(f"| {p['split']} | {p['id']} | {p['task']} | {answer} | {p['gold']} |")
    else:
        lines.append("None.")
    return "\n".join(lines) + "\n"


def _by_input(main: Mapping[str, Any], controls: Sequence[Mapping[str, Any]]) -> list[str]:
    """The accuracy of each (task, input kind) on the main split and on each control: a control should hit
    the inputs it blanks (images, videos, sounds) and leave the others alone. Empty when no record says its
    input kind."""
    if not any(r.get("by_media") for r in main["tasks"].values()):
        return []
    header = "| task | input | n | accuracy (%) |" + "".join(f" on `{c['split']}` (%) |" for c in controls)
    lines = ["Accuracy by input (each control takes one kind of input away):", "", header,
             "|---|---|---:|---:|" + "---:|" * len(controls)]
    for task, r in main["tasks"].items():
        for kind, m in r.get("by_media", {}).items():
            row = f"| {task} | {kind} | {m['n']} | {_pct(m['accuracy'])} |"
            for control in controls:
                c = control["tasks"].get(task, {}).get("by_media", {}).get(kind)
                row += f" {_pct(c['accuracy']) if c else '-'} |"
            lines.append(row)
    return [*lines, ""]


def plot_confusion(path: str | os.PathLike, matrix: np.ndarray, labels: Sequence[str], title: str) -> None:
    """PNG heat map: rows gold, columns predicted; the last column is "none" (unparseable or off-label)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    # A bare Figure on the Agg canvas: no pyplot state, so a notebook's inline backend is left alone.
    matrix = np.asarray(matrix)
    cols = list(labels) + ["(none)"]
    size = max(3.0, 0.55 * len(cols) + 1.5) + 0.07 * max(map(len, cols))  # room for long intent labels
    fig = Figure(figsize=(size + 1, size))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    ax.imshow(matrix, cmap="Blues", aspect="auto")
    ax.set_xticks(range(len(cols)), cols, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(labels)), list(labels), fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("gold")
    ax.set_title(title, fontsize=10)
    peak = matrix.max() if matrix.size else 0
    for (i, j), v in np.ndenumerate(matrix):
        if v:
            ax.text(j, i, str(v), ha="center", va="center", fontsize=7,
                    color="white" if v > peak / 2 else "black")
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100), binary=True)

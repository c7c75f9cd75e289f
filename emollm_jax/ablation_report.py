"""The ablation's outputs: runs grouped over seeds (mean +- std), relative improvement over the baseline
variant, `ablation.md`, `ablation.json` and the bar chart `ablation.png`.

Relative improvement (the form of the paper's "12.1% average improvement across foundation models"): for a
combination c and a variant v, S(c, v) is the EmoBench mean accuracy (the plain mean of the six sub-task
accuracies on the test split) averaged over the seeds, and

    relative(c, v) = (S(c, v) - S(c, baseline)) / S(c, baseline)

The average over combinations is the plain mean of relative(c, v) over the combinations that ran both.
Standard deviations are over seeds with ddof = 1 (none with a single seed). Formatting only; every file is
written atomically.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np

from data_pipeline import storage
from emollm_jax import eval_report
from emollm_jax.answers import EMOBENCH_TASKS

MEAN = "emobench_mean"
COLUMNS = (*EMOBENCH_TASKS, MEAN)  # the chart's panels and the table's accuracy columns


@dataclasses.dataclass(frozen=True)
class Setup:
    """What the table's header says about how the numbers were made."""

    title: str
    note: str
    baseline: str
    seeds: tuple[int, ...]
    stages: str  # e.g. "objective 30 steps, emotional 300 steps (batch 16)"
    data: str  # where the test records come from and how many per task

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict, root: str, seeds: Sequence[int]) -> Setup:
        from data_pipeline.records import iter_records

        ab = config.ablation
        parts = []
        for name in config.stage_order:
            st = config.stages[name]
            length = f"{st.steps} steps" if st.steps > 0 else f"{st.epochs:g} epochs"
            parts.append(f"{name} {length} (batch {st.batch_size})")
        split = config.data.eval_split
        counts: dict[str, int] = {}
        test = storage.path(root) / f"{split}.jsonl"
        if test.exists():
            for _, rec in iter_records(test):
                counts[rec.get("task", "")] = counts.get(rec.get("task", ""), 0) + 1
        per_task = sorted({counts[t] for t in EMOBENCH_TASKS if t in counts})
        n = "-".join(str(x) for x in per_task) or "?"
        source = f"`{root}`" if config.data.root else \
            "mini-EmoBench (synthetic, drawn by `data_pipeline.mini_emobench`)"
        data = f"{source}, {n} `{split}` records per task"
        return cls(title=ab.title or "Ablation", note=ab.note, baseline=ab.baseline,
                   seeds=tuple(sorted(set(int(s) for s in seeds))), stages=", ".join(parts), data=data)


def headline(results: Mapping[str, Any]) -> dict[str, Any]:
    """The numbers the table needs from one run's results.json: per-task accuracy, the EmoBench mean, and
    the blank-image control's mean and drop (None without a control split)."""
    control = results.get("control") or {}
    return {"accuracy": {t: results["accuracy"].get(t) for t in EMOBENCH_TASKS},
            MEAN: results[MEAN],
            "blank_mean": control.get(MEAN), "blank_drop": (control.get("drop") or {}).get(MEAN)}


def _stat(values: Sequence[float | None]) -> dict[str, float | int | None]:
    xs = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    if not xs:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": float(np.mean(xs)), "std": float(np.std(xs, ddof=1)) if len(xs) > 1 else None,
            "n": len(xs)}


def summarize(rows: Sequence[Mapping[str, Any]], baseline: str = "") -> dict[str, Any]:
    """{"groups": one entry per (combination, variant) with mean/std over its seeds of every column,
    "relative": one entry per (combination, non-baseline variant), "average": one per variant}."""
    keys = list(dict.fromkeys((r["foundation"], r["variant"]) for r in rows))
    groups = []
    for f, v in keys:
        runs = [r for r in rows if (r["foundation"], r["variant"]) == (f, v)]
        stats = {t: _stat([r["results"]["accuracy"].get(t) for r in runs]) for t in EMOBENCH_TASKS}
        stats[MEAN] = _stat([r["results"][MEAN] for r in runs])
        stats["blank_mean"] = _stat([r["results"]["blank_mean"] for r in runs])
        first = runs[0]
        groups.append({"foundation": f, "variant": v, "seeds": [r["seed"] for r in runs],
                       **{k: first[k] for k in ("vision", "projector", "text", "template", "m")},
                       "stats": stats})
    score = {(g["foundation"], g["variant"]): g["stats"][MEAN]["mean"] for g in groups}
    relative = []
    for g in groups:
        base, value = score.get((g["foundation"], baseline)), score[g["foundation"], g["variant"]]
        if not baseline or g["variant"] == baseline or base is None or value is None:
            continue
        relative.append({"foundation": g["foundation"], "variant": g["variant"], "baseline": base,
                         "value": value, "points": value - base,
                         "relative": (value - base) / base if base > 0 else None})
    average = []
    for v in dict.fromkeys(r["variant"] for r in relative):
        mine = [r for r in relative if r["variant"] == v]
        rel = [r["relative"] for r in mine if r["relative"] is not None]
        average.append({"variant": v, "combinations": len(mine), "relative_over": len(rel),
                        "baseline": float(np.mean([r["baseline"] for r in mine])),
                        "value": float(np.mean([r["value"] for r in mine])),
                        "points": float(np.mean([r["points"] for r in mine])),
                        "relative": float(np.mean(rel)) if rel else None})
    return {"baseline": baseline, "groups": groups, "relative": relative, "average": average}


def _pct(stat: Mapping[str, Any]) -> str:
    if stat["mean"] is None:
        return "-"
    text = f"{100 * stat['mean']:.1f}"
    return text if stat["std"] is None else f"{text} ± {100 * stat['std']:.1f}"


def _signed(x: float | None, scale: float = 100.0, unit: str = "") -> str:
    return "-" if x is None else f"{scale * x:+.1f}{unit}"


def _relative_row(label: str, r: Mapping[str, Any], bold: bool = False) -> str:
    rel = _signed(r["relative"], unit="%")
    if r["relative"] is not None and r.get("relative_over", r.get("combinations")) != r.get("combinations"):
        rel += f" (over {r['relative_over']})"  # the others' baseline scored 0
    return (f"| {label} | {r['variant']} | {100 * r['baseline']:.1f} | {100 * r['value']:.1f} | "
            f"{_signed(r['points'])} | {f'**{rel}**' if bold else rel} |")


def render_markdown(summary: Mapping[str, Any], setup: Setup) -> str:
    """The table a person reads: per-task accuracy per (combination, variant), then the relative
    improvement over the baseline per combination and averaged."""
    seeds = ", ".join(str(s) for s in setup.seeds)
    spread = "mean ± std over seeds (ddof 1)" if len(setup.seeds) > 1 else "one seed"
    lines = [f"# {setup.title}", "",
             f"Data: {setup.data}. Training: {setup.stages}; seeds {seeds}. "
             f"Accuracy (%) on the test split, {spread}; 'blank' = the same questions with grey images."]
    if setup.note:
        lines += ["", setup.note]
    head = ["combination", "tower", "decoder (template)", "variant", "projector", "M", *EMOBENCH_TASKS,
            "EmoBench mean", "blank mean"]
    lines += ["", "| " + " | ".join(head) + " |", "|" + "---|" * 6 + "---:|" * (len(head) - 6)]
    for g in summary["groups"]:
        st = g["stats"]
        cells = [g["foundation"], g["vision"], f"{g['text']} ({g['template']})", g["variant"], g["projector"],
                 str(g["m"]), *(_pct(st[t]) for t in EMOBENCH_TASKS), f"**{_pct(st[MEAN])}**",
                 _pct(st["blank_mean"])]
        lines.append("| " + " | ".join(cells) + " |")
    if summary["relative"]:
        base = summary["baseline"]
        lines += ["", f"## Relative improvement over `{base}`", "",
                  f"relative = (S(variant) - S({base})) / S({base}), S = the EmoBench mean accuracy (plain "
                  "mean of the six sub-task accuracies) averaged over the seeds; the average is the plain "
                  "mean of the per-combination values.", "",
                  f"| combination | variant | S({base}) (%) | S(variant) (%) | difference (points) "
                  "| relative |", "|---|---|---:|---:|---:|---:|"]
        for r in summary["relative"]:
            lines.append(_relative_row(r["foundation"], r))
        for a in summary["average"]:
            lines.append(_relative_row(f"**average over {a['combinations']}**", a, bold=True))
    return "\n".join(lines) + "\n"


def plot(summary: Mapping[str, Any], path: str | Path, title: str = "") -> None:
    """Bar chart PNG: one panel per sub-task and one for the EmoBench mean; in each, a group of bars per
    combination, one bar per variant (mean over seeds, std as the error bar)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    groups = summary["groups"]
    combos = list(dict.fromkeys(g["foundation"] for g in groups))
    variants = list(dict.fromkeys(g["variant"] for g in groups))
    by = {(g["foundation"], g["variant"]): g["stats"] for g in groups}
    width = 0.8 / max(1, len(variants))
    fig = Figure(figsize=(2.3 * len(COLUMNS) + 1.5, 3.4))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(COLUMNS), sharey=True, squeeze=False)[0]
    for ax, col in zip(axes, COLUMNS, strict=True):
        for j, v in enumerate(variants):
            stats = [by.get((c, v), {}).get(col, {"mean": None, "std": None}) for c in combos]
            heights = [100 * (s["mean"] or 0.0) for s in stats]
            errors = [100 * (s["std"] or 0.0) for s in stats]
            xs = np.arange(len(combos)) + (j - (len(variants) - 1) / 2) * width
            ax.bar(xs, heights, width, yerr=errors, capsize=2, label=v, color=f"C{j}")
        ax.set_title("EmoBench mean" if col == MEAN else col, fontsize=9)
        ax.set_xticks(range(len(combos)), combos, rotation=30, ha="right", fontsize=7)
        ax.set_ylim(0, 100)
    axes[0].set_ylabel("accuracy (%)")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper right", ncol=len(variants), fontsize=8, frameon=False)
    fig.suptitle(title, fontsize=10, x=0.01, ha="left")
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    eval_report.atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100), binary=True)


def write(workdir: str | Path, rows: Sequence[Mapping[str, Any]], setup: Setup) -> dict[str, Any]:
    """W/ablation.json (setup, every run's row, the summary), W/ablation.md and W/ablation.png."""
    workdir = storage.path(workdir)
    summary = summarize(rows, setup.baseline)
    eval_report.write_json(workdir / "ablation.json",
                           {"setup": dataclasses.asdict(setup), "runs": list(rows), "summary": summary})
    text = render_markdown(summary, setup)
    eval_report.atomic_write(workdir / "ablation.md", lambda f: f.write(text))
    plot(summary, workdir / "ablation.png", setup.title)
    return summary

"""Runs the variants of configs/ablation.py (train, then evaluate each) and writes one comparison table.

`python -m emollm_jax.ablation --config configs/ablation.py[:grid|quick] --workdir W [--variants a,b]
[--config.a.b=value ...]`

Every variant gets `W/<variant>` as its workdir and shares W/data (mini-EmoBench, generated once),
W/tokenizer and W/emoprompt_bank.json, so variants differ only in their overrides. A variant whose
`eval/results.json` exists is not rerun (delete it to redo). Output: `W/ablation.md` and `W/ablation.json`.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from emollm_jax.answers import EMOBENCH_TASKS
from emollm_jax.configuration import ConfigError, apply_overrides, flatten, load_config, split_config_args


def _pct(x: float | None) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}"


def render_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """Markdown: one row per variant, accuracy per EmoBench task, the mean, and the blank-image mean/drop."""
    head = ["variant", "projector", "M", *EMOBENCH_TASKS, "mean", "blank mean", "drop"]
    lines = ["# Ablation: EmoPrompt exemplars (M) and projector", "",
             "Accuracy (%) on the test split; 'blank' = the same questions with grey images.", "",
             "| " + " | ".join(head) + " |", "|---|---|" + "---:|" * (len(head) - 2)]
    for r in rows:
        res = r["results"]
        control = res.get("control") or {}
        cells = [r["name"], r["projector"], str(r["m"])]
        cells += [_pct(res["accuracy"].get(t)) for t in EMOBENCH_TASKS]
        cells += [f"**{_pct(res['emobench_mean'])}**", _pct(control.get("emobench_mean")),
                  _pct((control.get("drop") or {}).get("emobench_mean"))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def run(config: Any, workdir: str | Path, only: Sequence[str] | None = None) -> list[dict]:
    """Trains and evaluates each variant; returns one row per variant (name, projector, M, results)."""
    from data_pipeline import mini_emobench
    from emollm_jax import emoprompt, eval_report, evaluate, experiment, train

    workdir = Path(workdir)
    names = list(config.ablation.variants)
    if only:
        unknown = sorted(set(only) - set(names))
        if unknown:
            raise ValueError(f"--variants: unknown {unknown}; the config has {names}")
        names = [n for n in names if n in only]
    data = Path(config.data.root) if config.data.root else workdir / "data"
    if not config.data.root and not (data / "card.json").exists():
        scale = float(config.ablation.mini_scale)
        sizes = {t: (max(2, round(a * scale)), max(2, round(b * scale)))
                 for t, (a, b) in mini_emobench.DEFAULT_SIZES.items()}
        mini_emobench.generate(data, int(config.seed), sizes)
    shared = apply_overrides(config, {"data.root": str(data)})
    setup = experiment.prepare_data(shared, workdir)
    bank = Path(config.emoprompt.bank) if config.emoprompt.bank else workdir / "emoprompt_bank.json"
    rows = []
    for name in names:
        overrides = flatten(config.ablation.variants[name])
        overrides.update({"data.root": setup.root, "data.tokenizer": setup.tokenizer_path})
        if int(overrides.get("emoprompt.num_exemplars", config.emoprompt.num_exemplars)) > 0:
            probe = apply_overrides(config, {**overrides})
            emoprompt.from_config(probe, setup.root, workdir)   # builds the shared bank once
            overrides["emoprompt.bank"] = str(bank)
        cfg = apply_overrides(config, overrides)
        vdir = workdir / name
        results_file = vdir / "eval" / "results.json"
        if results_file.exists():
            results = json.loads(results_file.read_text())
        else:
            print(f"[ablation] {name}: training", flush=True)
            train.train(cfg, str(vdir))
            print(f"[ablation] {name}: evaluating", flush=True)
            results = evaluate.run_eval(cfg, vdir)
        rows.append({"name": name, "projector": cfg.model.projector.kind,
                     "m": int(cfg.emoprompt.num_exemplars), "results": results})
        eval_report.write_json(workdir / "ablation.json", {"variants": rows})
        eval_report.atomic_write(workdir / "ablation.md", lambda f: f.write(render_table(rows)))
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m emollm_jax.ablation", description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/ablation.py", help="path[:arg] of the ablation config")
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--variants", default="", help="comma-separated subset of the config's variants")
    rest, overrides = split_config_args(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(rest)
    from absl import flags

    flags.FLAGS.mark_as_parsed()  # grain workers read absl flags
    try:
        config = load_config(args.config, overrides)
    except ConfigError as e:
        parser.exit(2, f"error: {e}\n")
    only = [v for v in args.variants.split(",") if v] or None
    run(config, args.workdir, only)
    print((Path(args.workdir) / "ablation.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Runs an ablation config: every (foundation combination, variant, seed) is trained and evaluated, then one
table compares them.

`python -m emollm_jax.ablation --config configs/ablation.py[:arg] --workdir W [--variants a,b]
[--foundations x,y] [--config.a.b=value ...]`

`config.ablation` names the axes (configs/ablation.py): `foundations` and `variants` map a name to nested
config overrides (a part block naming another registered `kind` is that part's defaults plus the given
fields), `seeds` the `config.seed` of each run, `baseline` the variant the others are compared with. Run
(f, v, s) is the config with f's overrides, then v's, then `seed = s`, in `W/<f>/<v>/seed<s>`. Every run's
config is built and validated before anything trains: a combination whose parts are not registered is named
with the reason, never skipped. Runs share W/data (mini-EmoBench, generated once when `data.root` is empty)
and W/emoprompt_bank.json; each trains its own tiny tokenizer on that data with its decoder's chat template.
A run whose `eval/results.json` exists is not rerun (delete it to redo); an interrupted one resumes from its
checkpoint. After every run `W/ablation.{md,json,png}` are rewritten (`emollm_jax.ablation_report`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import ml_collections

from data_pipeline import storage
from emollm_jax import ablation_report
from emollm_jax.configuration import ConfigError, apply_overrides, load_config, split_config_args
from emollm_jax.models import catalog  # noqa: F401  (the shipped parts a combination may name)
from emollm_jax.models.parts import DECODERS, PROJECTORS, VISION_TOWERS

# Config blocks that hold a registered part, and where its kind is looked up.
PART_BLOCKS = {"model.vision": VISION_TOWERS, "model.projector": PROJECTORS, "model.text": DECODERS}


class AblationError(ValueError):
    """Runs that cannot be configured; the message names each foundation combination or variant and why."""


@dataclasses.dataclass(frozen=True)
class Run:
    """One cell of the ablation: a foundation combination, a variant and a seed, with its whole config."""

    foundation: str
    variant: str
    seed: int
    config: ml_collections.ConfigDict

    @property
    def name(self) -> str:
        return f"{self.foundation}/{self.variant}/seed{self.seed}"

    def workdir(self, root: str | Path) -> Path:
        return storage.path(root) / self.foundation / self.variant / f"seed{self.seed}"


def _get(config: ml_collections.ConfigDict, dotted: str) -> Any:
    node = config
    for part in dotted.split("."):
        node = node[part] if isinstance(node, ml_collections.ConfigDict) and part in node else None
    return node


def part_overrides(config: ml_collections.ConfigDict, tree: Mapping[str, Any],
                   prefix: str = "") -> dict[str, Any]:
    """Nested overrides -> `{dotted key: value}` for `apply_overrides`. A part block (`PART_BLOCKS`) whose
    `kind` differs from `config`'s becomes the whole block: that registered kind's defaults plus the given
    fields. An unregistered kind raises `ConfigError` naming the key and the registered kinds."""
    flat: dict[str, Any] = {}
    for key, value in dict(tree).items():
        path = f"{prefix}{key}"
        if not isinstance(value, Mapping | ml_collections.ConfigDict):
            flat[path] = value
            continue
        registry = PART_BLOCKS.get(path)
        kind = value.get("kind")
        current = _get(config, f"{path}.kind")
        if registry is not None and kind is not None and kind != current:
            if kind not in registry:
                raise ConfigError(f"config.{path}.kind={kind!r} is not a registered {registry.what} "
                                  f"(registered: {', '.join(registry.names())})")
            fields = {k: v for k, v in dict(value).items() if k != "kind"}
            try:
                flat[path] = registry.get(kind).block(**fields)
            except ConfigError as e:
                raise ConfigError(f"config.{path} ({kind}): {e}") from None
        else:
            flat.update(part_overrides(config, value, f"{path}."))
    return flat


def _select(axis: str, names: Sequence[str], only: Sequence[str] | None) -> list[str]:
    if not only:
        return list(names)
    unknown = sorted(set(only) - set(names))
    if unknown:
        raise AblationError(f"--{axis}: unknown {unknown}; the config has {list(names)}")
    return [n for n in names if n in only]


def variant_order(config: ml_collections.ConfigDict) -> list[str]:
    """The config's variants, its baseline first."""
    names = list(config.ablation.variants)
    base = config.ablation.baseline
    if base and base not in names:
        raise AblationError(f"config.ablation.baseline={base!r} is not among the variants {names}")
    return sorted(names, key=lambda n: n != base)


def plan_runs(config: ml_collections.ConfigDict, variants: Sequence[str] | None = None,
              foundations: Sequence[str] | None = None, num_devices: int | None = None) -> list[Run]:
    """Every run's config, built and (with `num_devices`) validated, before any work. Raises `AblationError`
    naming every combination or variant that cannot be configured (e.g. a tower kind nobody registered)."""
    from emollm_jax.run_config import validate_config

    ab = config.ablation
    vnames = _select("variants", variant_order(config), variants)
    fnames = _select("foundations", list(ab.foundations), foundations)
    seeds = [int(s) for s in ab.seeds]
    if not seeds or len(set(seeds)) != len(seeds):
        raise AblationError(f"config.ablation.seeds={tuple(ab.seeds)}: expected distinct seeds")
    runs, problems, failed = [], [], set()
    for f in fnames:
        try:
            fcfg = apply_overrides(config, part_overrides(config, ab.foundations[f]))
        except ConfigError as e:
            problems.append(f"foundation combination {f!r} cannot run: {e}")
            failed.add(f)
            continue
        for v in vnames:
            try:
                vcfg = apply_overrides(fcfg, part_overrides(fcfg, ab.variants[v]))
                for s in seeds:
                    cfg = apply_overrides(vcfg, {"seed": s})
                    if num_devices is not None:
                        validate_config(cfg, num_devices)
                    runs.append(Run(f, v, s, cfg))
            except ConfigError as e:
                problems.append(f"foundation combination {f!r}, variant {v!r} cannot run: {e}")
                failed.add(f)
    if problems:
        ok = [f for f in fnames if f not in failed]
        hint = f"\n(the others run with --foundations {','.join(ok)})" if ok else ""
        raise AblationError("\n".join(problems) + hint)
    return runs


def shared_data_root(config: ml_collections.ConfigDict, workdir: Path) -> str:
    """The shared data root: `config.data.root`, else mini-EmoBench generated once into W/data at
    `config.ablation.mini_scale` of its default split sizes."""
    from data_pipeline import mini_emobench

    if config.data.root:
        return str(config.data.root)
    data = workdir / "data"
    if not (data / "card.json").exists():
        scale = float(config.ablation.mini_scale)
        sizes = {t: (max(2, round(a * scale)), max(2, round(b * scale)))
                 for t, (a, b) in mini_emobench.DEFAULT_SIZES.items()}
        mini_emobench.generate(data, int(config.seed), sizes)
    return str(data)


def _shared_bank(runs: Sequence[Run], root: str, workdir: Path) -> str | None:
    """W/emoprompt_bank.json, built once from the training rationales when some run uses EmoPrompt."""
    from emollm_jax import emoprompt

    users = [r for r in runs if int(r.config.emoprompt.num_exemplars) > 0]
    if not users:
        return None
    if users[0].config.emoprompt.bank:
        return str(users[0].config.emoprompt.bank)
    emoprompt.from_config(users[0].config, root, workdir)
    return str(workdir / "emoprompt_bank.json")


def run_one(run: Run, workdir: Path, root: str, bank: str | None) -> dict[str, Any]:
    """Trains and evaluates one run (or reads its finished results); returns its row for the table."""
    from emollm_jax import evaluate, train
    from emollm_jax.data import template_name

    overrides: dict[str, Any] = {"data.root": root}
    if bank and int(run.config.emoprompt.num_exemplars) > 0:
        overrides["emoprompt.bank"] = bank
    cfg = apply_overrides(run.config, overrides)
    rdir = run.workdir(workdir)
    results_file = rdir / "eval" / "results.json"
    if results_file.exists():
        results = json.loads(results_file.read_text())
    else:
        train.train(cfg, str(rdir))
        results = evaluate.run_eval(cfg, rdir)
    model = cfg.model
    return {"foundation": run.foundation, "variant": run.variant, "seed": run.seed,
            "vision": model.vision.kind, "projector": model.projector.kind, "text": model.text.kind,
            "template": template_name(cfg), "m": int(cfg.emoprompt.num_exemplars),
            "dir": str(rdir.relative_to(workdir)), "results": ablation_report.headline(results)}


def run(config: ml_collections.ConfigDict, workdir: str | Path, variants: Sequence[str] | None = None,
        foundations: Sequence[str] | None = None,
        compile_cache: str | Path | None = None) -> list[dict[str, Any]]:
    """Plans every run (all errors first), then trains and evaluates them in turn, rewriting
    `W/ablation.{md,json,png}` after each. Returns one row per run.

    `compile_cache`: a directory for JAX's persistent compilation cache (unless one is configured already):
    runs that differ only in their seed compile the same programs, so later seeds skip compilation.
    """
    import jax

    workdir = storage.path(workdir)
    runs = plan_runs(config, variants, foundations, num_devices=jax.device_count())
    if compile_cache is not None and not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", str(compile_cache))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    root = shared_data_root(config, workdir)
    bank = _shared_bank(runs, root, workdir)
    setup = ablation_report.Setup.from_config(config, root, [r.seed for r in runs])
    rows: list[dict[str, Any]] = []
    start = time.monotonic()
    for i, r in enumerate(runs):
        elapsed = time.monotonic() - start
        print(f"[ablation] run {i + 1}/{len(runs)} {r.name} ({elapsed / 60:.1f} min so far)", flush=True)
        rows.append(run_one(r, workdir, root, bank))
        ablation_report.write(workdir, rows, setup)
    print(f"[ablation] {len(runs)} runs in {(time.monotonic() - start) / 60:.1f} min", flush=True)
    return rows


def _names(text: str) -> list[str] | None:
    return [v for v in text.split(",") if v] or None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m emollm_jax.ablation", description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/ablation.py", help="path[:arg] of the ablation config")
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--variants", default="", help="comma-separated subset of config.ablation.variants")
    parser.add_argument("--foundations", default="",
                        help="comma-separated subset of config.ablation.foundations")
    rest, overrides = split_config_args(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(rest)
    from absl import flags

    flags.FLAGS.mark_as_parsed()  # grain workers read absl flags
    try:
        config = load_config(args.config, overrides)
    except ConfigError as e:
        parser.exit(2, f"error: {e}\n")
    try:
        run(config, args.workdir, _names(args.variants), _names(args.foundations),
            compile_cache=storage.join(args.workdir, "jax_cache"))
    except (AblationError, ConfigError) as e:
        parser.exit(2, f"error: {e}\n")
    print(storage.path(args.workdir).joinpath("ablation.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())

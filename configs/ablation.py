"""Ablation on the tiny variant: EmoPrompt exemplar count M in {0, 1, 3} and MVP vs the plain MLP projector.

`python -m emollm_jax.ablation --config configs/ablation.py[:arg] --workdir W` trains and evaluates every
variant in `W/<variant>` (sharing W/data, W/tokenizer and one EmoPrompt bank) and writes `W/ablation.md`.
arg: "" (default: MVP with M = 0, 1, 3 and MLP with M = 0), "grid" (both projectors x every M), "quick"
(default set with short stages, for smoke tests). Everything else is configs/emobench.py's tiny variant.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import ml_collections

EXEMPLAR_COUNTS = (0, 1, 3)
PROJECTORS = {"mvp": "mvp", "mlp": "mlp2x_gelu"}


def _emobench():
    spec = importlib.util.spec_from_file_location("emobench_config", Path(__file__).with_name("emobench.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def variants(grid: bool = False) -> dict[str, dict[str, object]]:
    """variant name -> nested config overrides (ConfigDict keys cannot hold dots)."""
    out = {}
    for proj, kind in PROJECTORS.items():
        for m in EXEMPLAR_COUNTS:
            if grid or proj == "mvp" or m == 0:
                out[f"{proj}_m{m}"] = {"model": {"projector": {"kind": kind}},
                                       "emoprompt": {"num_exemplars": m}}
    return out


def flatten(overrides, prefix: str = "") -> dict[str, object]:
    """{"a": {"b": 1}} -> {"a.b": 1}."""
    flat: dict[str, object] = {}
    for key, value in dict(overrides).items():
        if isinstance(value, dict | ml_collections.ConfigDict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    arg = (arg or "").strip()
    if arg not in ("", "grid", "quick"):
        raise ValueError(f"configs/ablation.py: unknown argument {arg!r}; expected '', 'grid' or 'quick'")
    c = _emobench().get_config("tiny")
    if arg == "quick":
        c.stages.objective.steps = 4
        c.stages.emotional.steps = 8
    # mini_scale multiplies mini-EmoBench's default split sizes (the driver generates the shared data once).
    c.ablation = ml_collections.ConfigDict({"variants": variants(grid=arg == "grid"),
                                            "mini_scale": 0.05 if arg == "quick" else 1.0})
    return c


def apply_overrides(config: ml_collections.ConfigDict,
                    overrides: dict[str, object]) -> ml_collections.ConfigDict:
    """A copy of `config` with dotted keys set; unknown keys are an error naming the key."""
    out = ml_collections.ConfigDict(config.to_dict())
    for dotted, value in overrides.items():
        node = out
        *parents, leaf = dotted.split(".")
        for key in parents:
            if key not in node:
                raise KeyError(f"config override {dotted!r}: no key {key!r}")
            node = node[key]
        if leaf not in node:
            raise KeyError(f"config override {dotted!r}: no key {leaf!r}")
        node[leaf] = value
    return out

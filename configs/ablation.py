"""Ablation on the tiny variant: EmoPrompt exemplar count M in {0, 1, 3} and MVP vs the plain MLP projector.

`python -m emollm_jax.ablation --config configs/ablation.py[:arg] --workdir W` trains and evaluates every
variant in `W/<variant>` (sharing W/data, W/tokenizer and one EmoPrompt bank) and writes `W/ablation.md`.
arg: "" (default: MVP with M = 0, 1, 3 and MLP with M = 0), "grid" (both projectors x every M), "quick"
(default set with short stages, for smoke tests). Everything else is configs/emobench.py's tiny variant.
"""

from __future__ import annotations

from pathlib import Path

import ml_collections

from emollm_jax.configuration import ConfigError, load_config

EXEMPLAR_COUNTS = (0, 1, 3)
PROJECTORS = {"mvp": "mvp", "mlp": "mlp2x_gelu"}


def variants(grid: bool = False) -> dict[str, dict[str, object]]:
    """variant name -> nested config overrides (ConfigDict keys hold no dots: configuration.flatten)."""
    out = {}
    for proj, kind in PROJECTORS.items():
        for m in EXEMPLAR_COUNTS:
            if grid or proj == "mvp" or m == 0:
                out[f"{proj}_m{m}"] = {"model": {"projector": {"kind": kind}},
                                       "emoprompt": {"num_exemplars": m}}
    return out


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    arg = (arg or "").strip()
    if arg not in ("", "grid", "quick"):
        raise ConfigError(f"configs/ablation.py: unknown argument {arg!r}; expected '', 'grid' or 'quick'")
    c = load_config(f"{Path(__file__).with_name('emobench.py')}:tiny")
    if arg == "quick":
        c.stages.objective.steps = 4
        c.stages.emotional.steps = 8
    # mini_scale multiplies mini-EmoBench's default split sizes (the driver generates the shared data once).
    c.ablation = ml_collections.ConfigDict({"variants": variants(grid=arg == "grid"),
                                            "mini_scale": 0.05 if arg == "quick" else 1.0})
    return c

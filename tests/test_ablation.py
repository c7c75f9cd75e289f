"""configs/ablation.py variants and the ablation table."""

from pathlib import Path

import pytest

from emollm_jax.ablation import render_table
from emollm_jax.configuration import ConfigError, apply_overrides, flatten, load_config

ROOT = Path(__file__).resolve().parents[1]
ABLATION = ROOT / "configs" / "ablation.py"


def test_variants_and_overrides():
    config = load_config(ABLATION)
    assert sorted(config.ablation.variants) == ["mlp_m0", "mvp_m0", "mvp_m1", "mvp_m3"]
    assert len(load_config(f"{ABLATION}:grid").ablation.variants) == 6
    flat = flatten(config.ablation.variants["mlp_m0"])
    assert flat == {"model.projector.kind": "mlp2x_gelu", "emoprompt.num_exemplars": 0}
    cfg = apply_overrides(config, flat)
    assert cfg.model.projector.kind == "mlp2x_gelu" and config.model.projector.kind == "mvp"  # copy
    with pytest.raises(ConfigError, match="model.projector.knd"):
        apply_overrides(config, {"model.projector.knd": "x"})
    with pytest.raises(ValueError, match="unknown argument"):
        load_config(f"{ABLATION}:nope")


def test_render_table():
    results = {"accuracy": {"emo_c": 0.5, "hate": 1.0}, "emobench_mean": 0.75,
               "control": {"emobench_mean": 0.5, "drop": {"emobench_mean": 0.25}}}
    table = render_table([{"name": "mvp_m1", "projector": "mvp", "m": 1, "results": results}])
    assert "| mvp_m1 | mvp | 1 | 50.0 | - | - | 100.0 | - | - | **75.0** | 50.0 | 25.0 |" in table

"""configs/ablation.py variants and the ablation table."""

import importlib.util
from pathlib import Path

import pytest

from emollm_jax.ablation import render_table

ROOT = Path(__file__).resolve().parents[1]


def _module():
    spec = importlib.util.spec_from_file_location("ablation_config", ROOT / "configs" / "ablation.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_variants_and_overrides():
    mod = _module()
    config = mod.get_config()
    assert sorted(config.ablation.variants) == ["mlp_m0", "mvp_m0", "mvp_m1", "mvp_m3"]
    assert len(mod.get_config("grid").ablation.variants) == 6
    flat = mod.flatten(config.ablation.variants["mlp_m0"])
    assert flat == {"model.projector.kind": "mlp2x_gelu", "emoprompt.num_exemplars": 0}
    cfg = mod.apply_overrides(config, flat)
    assert cfg.model.projector.kind == "mlp2x_gelu" and config.model.projector.kind == "mvp"  # copy
    with pytest.raises(KeyError, match="model.projector.knd"):
        mod.apply_overrides(config, {"model.projector.knd": "x"})
    with pytest.raises(ValueError, match="unknown argument"):
        mod.get_config("nope")


def test_render_table():
    results = {"accuracy": {"emo_c": 0.5, "hate": 1.0}, "emobench_mean": 0.75,
               "control": {"emobench_mean": 0.5, "drop": {"emobench_mean": 0.25}}}
    table = render_table([{"name": "mvp_m1", "projector": "mvp", "m": 1, "results": results}])
    assert "| mvp_m1 | mvp | 1 | 50.0 | - | - | 100.0 | - | - | **75.0** | 50.0 | 25.0 |" in table

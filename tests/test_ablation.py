"""configs/ablation.py, the driver's run plan (combinations x variants x seeds), its table, and the reduced
ablations through `python -m emollm_jax.ablation` (slow)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from emollm_jax import ablation_report
from emollm_jax.ablation import AblationError, main, part_overrides, plan_runs
from emollm_jax.answers import EMOBENCH_TASKS
from emollm_jax.configuration import ConfigError, apply_overrides, flatten, load_config
from emollm_jax.data import template_name
from emollm_jax.experiment import model_config
from emollm_jax.models.parts import DECODERS, VISION_TOWERS

ROOT = Path(__file__).resolve().parents[1]
ABLATION = ROOT / "configs" / "ablation.py"


def test_variants_and_overrides():
    config = load_config(ABLATION)
    assert sorted(config.ablation.variants) == ["mlp_m0", "mvp_m0", "mvp_m1", "mvp_m3"]
    assert config.ablation.baseline == "mlp_m0" and tuple(config.ablation.seeds) == (0,)
    assert len(load_config(f"{ABLATION}:grid").ablation.variants) == 6
    flat = flatten(config.ablation.variants["mlp_m0"])
    assert flat == {"model.projector.kind": "mlp2x_gelu", "emoprompt.num_exemplars": 0}
    cfg = apply_overrides(config, flat)
    assert cfg.model.projector.kind == "mlp2x_gelu" and config.model.projector.kind == "mvp"  # copy
    with pytest.raises(ConfigError, match="model.projector.knd"):
        apply_overrides(config, {"model.projector.knd": "x"})
    with pytest.raises(ValueError, match="unknown argument"):
        load_config(f"{ABLATION}:nope")


def test_a_block_of_another_kind_starts_from_its_defaults():
    config = load_config(ABLATION)
    flat = part_overrides(config, {"model": {"text": {"kind": "mistral", "sliding_window": 8},
                                             "projector": {"tau": 0.2}}})
    assert flat["model.projector.tau"] == 0.2  # same kind: one key changes
    block = flat["model.text"]  # another kind: the whole block
    assert block.kind == "mistral" and block.sliding_window == 8
    assert block.max_position_embeddings == 4096 and config.model.text.max_position_embeddings == 1024
    assert "hidden_size" not in block  # no default: a combination must give it
    with pytest.raises(ConfigError, match=r"model.vision.kind='nope'.*registered: clip"):
        part_overrides(config, {"model": {"vision": {"kind": "nope"}}})
    with pytest.raises(ConfigError, match="model.text.*mistral.*no_field"):
        part_overrides(config, {"model": {"text": {"kind": "mistral", "no_field": 1}}})


def _parts(run):
    cfg = model_config(run.config, vocab_size=100, image_token_id=4)
    return cfg, template_name(run.config)


def test_foundation_runs_differ_the_way_their_families_do():
    config = load_config(f"{ABLATION}:foundations")
    siglip = "siglip" in VISION_TOWERS
    if not siglip:  # the Qwen2 half of the combination is checked on the CLIP tower
        foundations = config.ablation.foundations
        foundations.siglip_qwen2.model.vision = foundations.clip_llama.model.vision
    runs = plan_runs(config, num_devices=1)
    assert len(runs) == 3 * 2 * 3
    assert [r.seed for r in runs if (r.foundation, r.variant) == ("clip_mistral", "base")] == [0, 1, 2]
    assert {r.config.seed for r in runs} == {0, 1, 2}
    by = {(r.foundation, r.variant): r for r in runs if r.seed == 0}
    base, mvp = by["clip_llama", "base"], by["clip_llama", "mvp_emoprompt"]
    assert (_parts(base)[0].projector.kind, base.config.emoprompt.num_exemplars) == ("mlp2x_gelu", 0)
    assert (_parts(mvp)[0].projector.kind, mvp.config.emoprompt.num_exemplars) == ("mvp", 1)
    llama, t_llama = _parts(base)
    mistral, t_mistral = _parts(by["clip_mistral", "base"])
    qwen, t_qwen = _parts(by["siglip_qwen2", "mvp_emoprompt"])
    # each decoder with its own chat template (data.template ""), and the three differ
    own = [DECODERS.get(kind).chat_template for kind in ("llama", "mistral", "qwen2")]
    assert [t_llama, t_mistral, t_qwen] == own
    assert len({t_llama, t_mistral, t_qwen}) == 3
    assert (llama.text.kind, llama.text.sliding_window, llama.text.attention_bias) == ("llama", None, False)
    assert (mistral.text.kind, mistral.text.sliding_window) == ("mistral", 64)
    assert (qwen.text.kind, qwen.text.attention_bias, qwen.text.tie_word_embeddings) == ("qwen2", True, True)
    assert qwen.text.rope_theta == 1e6 and qwen.vision_feature_select == "full"
    assert qwen.projector.kind == "mvp" and qwen.vision_feature_layer == -1
    if siglip:
        assert (qwen.vision.kind, qwen.vision.num_prefix_tokens, qwen.vision.use_head) == ("siglip", 0, False)
        assert qwen.vision.preprocessing().mode == "resize" and qwen.vision.hidden_act == "gelu_pytorch_tanh"
    assert llama.vision.kind == "clip" and llama.vision.hidden_act == "quick_gelu"
    sizes = {(c.text.hidden_size, c.text.num_layers, c.vision.hidden_size) for c in (llama, mistral, qwen)}
    assert sizes == {(128, 4, 64)}  # the families differ in kind, not in size


def test_an_unregistered_part_names_its_combination(capsys):
    bogus = "ablation.foundations.siglip_qwen2.model.vision.kind=vit9"
    config = load_config(f"{ABLATION}:foundations", [bogus])
    with pytest.raises(AblationError) as e:
        plan_runs(config)
    msg = str(e.value)
    assert "'siglip_qwen2' cannot run" in msg and "vit9" in msg and "not a registered vision tower" in msg
    assert "--foundations clip_llama,clip_mistral" in msg and "clip_llama'" not in msg
    assert len(plan_runs(config, foundations=["clip_mistral"])) == 6
    with pytest.raises(AblationError, match="--foundations: unknown"):
        plan_runs(config, foundations=["nope"])
    # through the command line: exit status 2 and the reason, before anything is written
    with pytest.raises(SystemExit) as exit_:
        main(["--config", f"{ABLATION}:foundations", "--workdir", "/nonexistent/w",
              "--config.ablation.foundations.siglip_qwen2.model.vision.kind=vit9"])
    assert exit_.value.code == 2 and "'siglip_qwen2' cannot run" in capsys.readouterr().err


def test_siglip_combination_runs_once_siglip_is_registered():
    config = load_config(f"{ABLATION}:foundations")
    if "siglip" in VISION_TOWERS:
        runs = plan_runs(config, num_devices=1)
        tower = _parts(next(r for r in runs if r.foundation == "siglip_qwen2"))[0].vision
        assert tower.kind == "siglip" and tower.num_prefix_tokens == 0
    else:
        with pytest.raises(AblationError, match="'siglip_qwen2' cannot run.*'siglip' is not a registered"):
            plan_runs(config)


def _row(foundation, variant, seed, accs, blank=0.3):
    accuracy = dict(zip(EMOBENCH_TASKS, accs, strict=True))
    results = {"accuracy": accuracy, "emobench_mean": float(np.mean(accs)),
               "control": {"emobench_mean": blank, "drop": {"emobench_mean": float(np.mean(accs)) - blank}}}
    return {"foundation": foundation, "variant": variant, "seed": seed, "vision": "clip", "projector": "mvp",
            "text": "llama", "template": "vicuna_v1", "m": 0, "dir": "x",
            "results": ablation_report.headline(results)}


def test_summary_relative_improvement_table_and_chart(tmp_path):
    rng = np.random.default_rng(0)
    keys = [(f, v, s) for f in ("a", "b") for v in ("base", "mvp") for s in (0, 1)]
    acc = {k: rng.uniform(0.2, 0.9, size=6) for k in keys}
    rows = [_row(f, v, s, a) for (f, v, s), a in acc.items()]
    setup = ablation_report.Setup("T", "shortened", "base", (0, 1), "stage 3 steps (batch 2)", "mini")
    summary = ablation_report.write(tmp_path, rows, setup)

    score = {(f, v): np.mean([acc[f, v, s].mean() for s in (0, 1)]) for f, v, _ in keys}
    rel = {f: (score[f, "mvp"] - score[f, "base"]) / score[f, "base"] for f in ("a", "b")}
    got = {r["foundation"]: r["relative"] for r in summary["relative"]}
    assert got == pytest.approx(rel)
    assert summary["average"][0]["relative"] == pytest.approx((rel["a"] + rel["b"]) / 2)
    group = next(g for g in summary["groups"] if (g["foundation"], g["variant"]) == ("b", "mvp"))
    emo_c = [acc["b", "mvp", s][0] for s in (0, 1)]
    assert group["stats"]["emo_c"]["mean"] == pytest.approx(np.mean(emo_c))
    assert group["stats"]["emo_c"]["std"] == pytest.approx(np.std(emo_c, ddof=1))

    table = (tmp_path / "ablation.md").read_text()
    assert f"{100 * np.mean(emo_c):.1f} ± {100 * np.std(emo_c, ddof=1):.1f}" in table
    assert f"{100 * rel['a']:+.1f}%" in table and f"**{100 * (rel['a'] + rel['b']) / 2:+.1f}%**" in table
    assert "shortened" in table and "stage 3 steps (batch 2)" in table and "seeds 0, 1" in table
    saved = json.loads((tmp_path / "ablation.json").read_text())
    assert len(saved["runs"]) == 8 and saved["summary"]["average"][0]["variant"] == "mvp"
    with Image.open(tmp_path / "ablation.png") as im:
        assert im.format == "PNG" and im.size[0] > 1000


def _cli(tmp_path, *args):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "emollm_jax.ablation", "--workdir", str(tmp_path), *args],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=3000)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout, json.loads((tmp_path / "ablation.json").read_text())


def _check_outputs(tmp_path, saved, groups):
    table = (tmp_path / "ablation.md").read_text()
    for f, v in groups:
        assert any(line.startswith(f"| {f} |") and f"| {v} |" in line for line in table.splitlines()), (f, v)
    for run in saved["runs"]:
        results = json.loads((tmp_path / run["dir"] / "eval" / "results.json").read_text())
        assert run["results"]["emobench_mean"] == results["emobench_mean"]
    with Image.open(tmp_path / "ablation.png") as im:
        assert im.format == "PNG"
    return table


@pytest.mark.slow
def test_reduced_foundations_through_the_cli(tmp_path):
    """`:foundations_quick` (4 + 8 steps, 5% of mini-EmoBench, 2 seeds) for the combinations whose parts are
    registered; the table holds every (combination, variant), mean +- std, and the relative improvement."""
    # the two combinations whose families differ from the tiny job's (clip_llama runs in the test below)
    combos = ["clip_mistral"] + (["siglip_qwen2"] if "siglip" in VISION_TOWERS else [])
    stdout, saved = _cli(tmp_path, "--config", f"{ABLATION}:foundations_quick",
                         "--foundations", ",".join(combos))
    assert len(saved["runs"]) == len(combos) * 2 * 2
    table = _check_outputs(tmp_path, saved, [(f, v) for f in combos for v in ("base", "mvp_emoprompt")])
    assert "±" in table and "Relative improvement over `base`" in table and table in stdout
    assert f"**average over {len(combos)}**" in table and "synthetic" in table
    runs = {(r["foundation"], r["variant"], r["seed"]): r for r in saved["runs"]}
    assert runs["clip_mistral", "mvp_emoprompt", 0]["template"] == DECODERS.get("mistral").chat_template
    assert runs["clip_mistral", "mvp_emoprompt", 0]["m"] == 1 and runs["clip_mistral", "base", 1]["m"] == 0
    # each run's tokenizer knows its decoder's template: mistral_instruct's [INST] ... [/INST] are words, not
    # <unk>
    from data_pipeline.text import UNK, get_template, load_tokenizer

    tmpl = get_template(DECODERS.get("mistral").chat_template)
    scaffold = "".join(p.text for p in tmpl.render(tmpl.system, [("question", "answer")], False))
    assert "[INST]" in scaffold and "[/INST]" in scaffold
    tok = load_tokenizer(str(tmp_path / "clip_mistral" / "base" / "seed0" / "tokenizer"))
    assert tok.token_to_id(UNK) not in tok.encode(scaffold)
    # the seed is a real axis: the two seeds start from different weights
    loss = [json.loads((tmp_path / "clip_mistral" / "base" / f"seed{s}" / "metrics.jsonl").read_text()
                       .splitlines()[0])["loss"] for s in (0, 1)]
    assert loss[0] != loss[1]
    def score(f, v):
        return np.mean([runs[f, v, s]["results"]["emobench_mean"] for s in (0, 1)])

    for r in saved["summary"]["relative"]:
        base, value = score(r["foundation"], "base"), score(r["foundation"], "mvp_emoprompt")
        assert r["baseline"] == pytest.approx(base) and r["value"] == pytest.approx(value)


@pytest.mark.slow
def test_reduced_default_ablation_through_the_cli(tmp_path):
    """`:quick` with the plain-MLP baseline and MVP with M = 3 exemplars (the longest prompts)."""
    _, saved = _cli(tmp_path, "--config", f"{ABLATION}:quick", "--variants", "mlp_m0,mvp_m3")
    assert [(r["variant"], r["m"], r["projector"]) for r in saved["runs"]] == [
        ("mlp_m0", 0, "mlp2x_gelu"), ("mvp_m3", 3, "mvp")]
    table = _check_outputs(tmp_path, saved, [("clip_llama", "mlp_m0"), ("clip_llama", "mvp_m3")])
    assert "Relative improvement over `mlp_m0`" in table and "±" not in table  # one seed

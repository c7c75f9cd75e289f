"""LoRA end to end: `python -m emollm_jax.main` trains adapters (decoder and tower, with dropout) beside the
projector; the checkpoint carries them and evaluation loads them; `python -m emollm_jax.convert --workdir`
merges them into an HF Llava that transformers reads (`--to_hf`) or writes them alone in PEFT's layout
(`--lora_only`) that `peft` loads onto the HF model; a resumed run with adapters and dropout continues exactly
as an uninterrupted one (dropout's masks are keyed by the seed and the batch)."""

import json

import jax
import numpy as np
import pytest
from flax import nnx

from emollm_jax import experiment, lora
from emollm_jax.hooks import Hook
from emollm_jax.metrics import read_metrics
from tests import cli_setup
from tests.cli_setup import FAST

LORA = ("--config.lora.rank=4", "--config.lora.alpha=8.0", "--config.lora.dropout=0.1",
        "--config.lora.vision_targets=('q_proj', 'v_proj')",
        "--config.stages.emotional.trainable=('lora', 'projector')")
# A projector with an HF form and no audio tower (HF Llava has none): the model is a Llava.
LLAVA = ("--config.model.projector.kind=mlp2x_gelu", "--config.model.audio.kind=none")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """(workdir, data) of one `--mode=all` run training adapters and the projector."""
    tmp = tmp_path_factory.mktemp("lora_main")
    data = cli_setup.make_data(tmp / "data")
    workdir = tmp / "work"
    cli_setup.main(workdir, f"--config.data.root={data}", *FAST, *LORA, *LLAVA)
    return workdir, data


def _inputs(model, tok, rows=2, length=40):
    """int ids [B, T] with one image's tokens per row, pixels NHWC; from the run's own tokenizer."""
    rng = np.random.default_rng(0)
    n = model.config.tokens_per_frame
    ids = rng.integers(5, tok.vocab_size, size=(rows, length))
    ids[ids == tok.image_token_id] = 5
    ids[:, 3:3 + n] = tok.image_token_id
    size = model.config.vision.image_size
    return ids, rng.standard_normal((rows, size, size, 3)).astype(np.float32)


def _ours(model, ids, pixels):
    return np.asarray(model(ids, pixel_values=pixels))


def _hf_logits(path, ids, pixels, adapter=None):
    import torch
    import transformers

    hf = transformers.LlavaForConditionalGeneration.from_pretrained(path).eval()
    if adapter is not None:
        import peft

        hf = peft.PeftModel.from_pretrained(hf, adapter).eval()
    with torch.no_grad():
        out = hf(input_ids=torch.tensor(ids), pixel_values=torch.tensor(pixels.transpose(0, 3, 1, 2)))
    return out.logits.numpy()


@pytest.mark.slow
def test_checkpoint_carries_adapters_and_eval_uses_them(run):
    from emollm_jax.evaluate import load_model

    workdir, _ = run
    model, config = experiment.load_run(workdir)
    updates = lora.adapters(model)
    assert {p[0] for p in updates} == {"llm", "vision"}
    assert len(updates) == 2 * (model.config.text.num_layers + model.config.vision.num_layers)  # q, v each
    # Trained from B = 0: every decoder adapter, and the tower's below the layer the projector reads (the
    # last layer's output feeds nothing, so its adapters get no gradient).
    read = model.config.vision.num_hidden_states + model.config.vision_feature_layer  # layers in use
    moved = {p: bool(np.abs(np.asarray(u.b[...])).max() > 0) for p, u in updates.items()}
    assert moved == {p: p[0] == "llm" or p[3] < read for p in updates}
    # The base stayed frozen: the seed's fresh weights (up to the rounding of a jitted initialiser; one
    # Adam step would move them by ~lr = 2e-3).
    fresh = experiment.new_model(model.config, int(config.seed))
    np.testing.assert_allclose(np.asarray(model.llm.model.layers[0].self_attn.q_proj.kernel[...]),
                               np.asarray(fresh.llm.model.layers[0].self_attn.q_proj.kernel[...]), atol=1e-7)
    tok = experiment.load_tokenizer(experiment.DataSetup("", str(workdir / "tokenizer")))
    evaluated, where = load_model(config, workdir, tok)  # what --mode=eval and --mode=predict run
    assert where.endswith("step 2")
    for path, update in lora.adapters(evaluated).items():
        np.testing.assert_array_equal(np.asarray(update.b[...]), np.asarray(updates[path].b[...]))
    results = json.loads((workdir / "eval" / "results.json").read_text())
    assert len(results["accuracy"]) >= 6


@pytest.mark.slow
def test_convert_to_hf_merges_the_adapters(run, tmp_path):
    workdir, _ = run
    cli_setup.run("emollm_jax.convert", "--workdir", workdir, "--to_hf", "--out", tmp_path / "hf",
                  cwd=tmp_path)
    model, config = experiment.load_run(workdir)
    tok = experiment.load_tokenizer(experiment.DataSetup("", str(workdir / "tokenizer")))
    ids, pixels = _inputs(model, tok)
    want = _ours(model, ids, pixels)
    np.testing.assert_allclose(_hf_logits(tmp_path / "hf", ids, pixels), want, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_lora_only_export_loads_in_peft(run, tmp_path):
    from emollm_jax.convert import save_hf

    workdir, _ = run
    proc = cli_setup.run("emollm_jax.convert", "--workdir", workdir, "--lora_only",
                         "--out", tmp_path / "adapter", cwd=tmp_path)
    assert "also trained ['projector']" in proc.stderr  # the adapter file holds the adapters only
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["lora_dropout"]) == (4, 8.0, 0.1)
    model, _ = experiment.load_run(workdir)
    base = nnx.clone(model)  # the HF model PEFT adds the adapters to: this run's weights without them
    for update in lora.adapters(base).values():
        update.b[...] = np.zeros(update.b[...].shape, np.float32)
    save_hf(base, tmp_path / "base")
    tok = experiment.load_tokenizer(experiment.DataSetup("", str(workdir / "tokenizer")))
    ids, pixels = _inputs(model, tok)
    want, without = _ours(model, ids, pixels), _ours(base, ids, pixels)
    got = _hf_logits(tmp_path / "base", ids, pixels, adapter=tmp_path / "adapter")
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    assert np.abs(want - without).max() > 1e-4  # the adapters change the output


class _Stop(Exception):
    pass


class _StopAfter(Hook):
    """A hook that kills the run after global step `step` (its checkpoint, if any, is written)."""

    def __init__(self, step):
        self.step = step

    def on_step(self, info, event):
        if event.global_step == self.step:
            raise _Stop


@pytest.mark.slow
def test_resume_with_adapters_and_dropout_matches_an_uninterrupted_run(tmp_path):
    from emollm_jax import train
    from emollm_jax.configuration import load_config

    data = cli_setup.make_data(tmp_path / "data", train_per_task=2)
    overrides = [f"data.root={data}", "stage_order=('emotional',)", "stages.emotional.steps=4",
                 "stages.emotional.batch_size=8", "train.checkpoint_every=2", "lora.rank=4",
                 "lora.dropout=0.2", "train.log_every=1",
                 "stages.emotional.trainable=('lora', 'projector')", "model.text.num_layers=1"]
    config = load_config(cli_setup.CONFIG + ":tiny", overrides)
    full = train.train(config, str(tmp_path / "full"))
    with pytest.raises(_Stop):
        train.train(config, str(tmp_path / "cut"), hooks=[_StopAfter(3)])
    resumed = train.train(config, str(tmp_path / "cut"))
    assert resumed.losses["emotional"] == pytest.approx(full.losses["emotional"][2:], rel=1e-6)
    leaves = zip(jax.tree.leaves(full.params), jax.tree.leaves(resumed.params), strict=True)
    assert max(float(np.abs(np.asarray(a) - np.asarray(b)).max()) for a, b in leaves) < 1e-6
    losses = [r["loss"] for r in read_metrics(tmp_path / "full" / "metrics.jsonl")]
    assert losses == pytest.approx(full.losses["emotional"], rel=1e-6)

"""Training with sound end to end: the tiny variant on mini-EmoBench with voice records trains its audio tower
and projector (Whisper's stored positions stay put), and evaluation scores the voices, on the silent-audio
control too."""

from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from emollm_jax import evaluate, experiment, hooks, sharding, train
from emollm_jax.configuration import load_config
from emollm_jax.models.whisper import sinusoids

TINY = f"{Path(__file__).resolve().parents[1] / 'configs' / 'emobench.py'}:tiny"


class _Sound(hooks.Hook):
    """Counts the real audio windows of every training batch."""

    def __init__(self):
        self.windows = []

    def on_step(self, stage, step):
        self.windows.append(int((step.batch["audio_media"] >= 0).sum()))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("train_audio")
    c = load_config(TINY)
    c.data.update(mini_train_per_task=8, mini_test_per_task=2)
    c.model.text.update(hidden_size=64, intermediate_size=128, num_layers=2)
    c.stage_order = ("emotional",)
    c.stages.emotional.update(steps=12, batch_size=8, lr=3e-3, warmup_ratio=0.0)
    c.train.update(log_every=1, checkpoint_every=100)
    c.eval.update(batch_size=16, max_new_tokens=4)
    c.mesh.data = 1
    sound = _Sound()
    mesh = sharding.make_mesh({"data": 1}, devices=jax.devices()[:1])
    result = train.train(c, str(workdir), mesh=mesh, hooks=[sound])
    return c, workdir, result, sound.windows


def test_training_reads_sound_and_trains_the_audio_parts(run):
    config, workdir, result, windows = run
    assert (workdir / "data" / "test_silent.jsonl").exists()  # the default job's data came with voices
    assert sum(windows) > 0 and len(windows) == 12  # voice records reached the step
    losses = result.losses["emotional"]
    assert all(np.isfinite(losses)) and np.mean(losses[-3:]) < np.mean(losses[:3]), losses
    graphdef, _, rest = train.abstract_model(result.model_cfg, config.seed)
    trained = nnx.merge(graphdef, result.params, rest)
    fresh = experiment.new_model(result.model_cfg, config.seed)  # the initial weights: same seed
    moved = lambda a, b: float(np.abs(np.asarray(a[...]) - np.asarray(b[...])).max())  # noqa: E731
    assert moved(trained.audio.conv1.kernel, fresh.audio.conv1.kernel) > 0
    assert moved(trained.audio_projector.linear_1.kernel, fresh.audio_projector.linear_1.kernel) > 0
    np.testing.assert_array_equal(np.asarray(trained.audio.embed_positions[...]),
                                  sinusoids(*trained.audio.embed_positions.shape))  # fixed: never trained


def test_evaluation_scores_voices_and_the_silent_control(run):
    config, workdir, result, _ = run
    graphdef, _, rest = train.abstract_model(result.model_cfg, config.seed)
    model = nnx.merge(graphdef, result.params, rest)
    results = evaluate.run_eval(config, workdir, model=model, progress=False)
    assert set(results["splits"]) == {"test", "test_blank", "test_silent"}
    assert results["audio_control"]["split"] == "test_silent" and results["control"]["split"] == "test_blank"
    for split in ("test", "test_silent"):
        by_media = results["splits"][split]["tasks"]["emo_c"]["by_media"]
        assert {k: v["n"] for k, v in by_media.items()} == {"image": 2, "audio": 2}
    assert set(results["splits"]["test"]["tasks"]["sarcasm"]["by_media"]) == {"image", "audio"}
    report = (workdir / "eval" / "report.md").read_text()
    assert "accuracy on `test_silent` (%)" in report and "Accuracy by input" in report
    assert "| emo_c | audio | 2 |" in report and "| sarcasm | image | 2 |" in report

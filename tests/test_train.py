"""Training loop: the real tiny EmoLLM step on 8-way data parallel equals 1 device; a short two-stage
run on generated mini-EmoBench lowers the answer loss; the chunked loss equals the plain one; NaN stops it;
hooks passed to `train.train` see every step's metrics; `train.profile_steps` leaves a trace."""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from emollm_jax import experiment, hooks, sharding, train
from emollm_jax.configuration import load_config

TINY = f"{Path(__file__).resolve().parents[1] / 'configs' / 'emobench.py'}:tiny"


def _batch(cfg, b=8, t=96, k=4, seed=0):
    """A contract training batch: one image (first sample slot) or a 4-frame video per sample."""
    rng = np.random.default_rng(seed)
    per_frame = cfg.tokens_per_frame
    ids = rng.integers(5, cfg.text.vocab_size, (b, t)).astype(np.int32)
    frame_media = np.full((b, k), -1, np.int32)
    for i in range(b):
        frames = 1 if i % 2 else k
        ids[i, 3:3 + frames * per_frame] = cfg.image_token_id
        frame_media[i, :frames] = 0
    mask = np.ones((b, t), np.int32)
    mask[::3, -10:] = 0  # some right padding
    loss_mask = np.zeros((b, t), np.float32)
    loss_mask[:, t - 20:t - 10] = 1.0
    return dict(input_ids=ids, attention_mask=mask, targets=np.roll(ids, -1, 1), loss_mask=loss_mask,
                pixel_values=rng.normal(size=(b, k, 64, 64, 3)).astype(np.float32), frame_media=frame_media)


def _losses(config, mesh, steps=3):
    base = experiment.model_config(config, vocab_size=64, image_token_id=4)
    st = train.build_stage(config, 1, base, mesh, total_steps=10)
    params = train.init_params(config, st.model_cfg, st.param_shardings)
    opt = jax.jit(st.tx.init, out_shardings=st.opt_shardings)(params)
    out = []
    for i in range(steps):
        batch = sharding.global_batch(_batch(base, seed=i), mesh)
        params, opt, m = st.step_fn(params, opt, batch)
        out.append((float(m["loss"]), float(m["grad_norm"])))
    return np.array(out), params


def test_data_parallel_8_matches_1_device():
    config = load_config(TINY)
    config.stages.emotional.warmup_ratio = 0.0
    ref, p1 = _losses(config, sharding.make_mesh({"data": 1}, devices=jax.devices()[:1]))
    dp, p8 = _losses(config, sharding.make_mesh({"data": 8}))
    assert ref[0, 0] > 1.0 and ref[-1, 0] < ref[0, 0]  # it trains
    np.testing.assert_allclose(dp, ref, rtol=1e-5, atol=1e-5)
    leaves1, leaves8 = jax.tree.leaves(p1), jax.tree.leaves(p8)
    pairs = zip(leaves1, leaves8, strict=True)
    diff = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) for a, b in pairs)
    # Adam divides by sqrt(v): on gradient components near zero, reduction-order noise (~1e-7) becomes a
    # visible part of the step. Bound the parameters by 2% of the largest possible move (3 steps x peak lr).
    assert diff < 0.02 * 3 * config.stages.emotional.lr, diff


def test_fsdp_mesh_matches_too():
    config = load_config(TINY)
    config.mesh.update(data=2, fsdp=4)
    ref, _ = _losses(config, sharding.make_mesh({"data": 1}, devices=jax.devices()[:1]), steps=2)
    fs, params = _losses(config, sharding.make_mesh({"data": 2, "fsdp": 4}), steps=2)
    np.testing.assert_allclose(fs, ref, rtol=1e-5, atol=1e-5)
    q = params["llm"]["model"]["layers"][0]["self_attn"]["q_proj"]["kernel"]
    kernel = q.get_value()
    assert len(kernel.sharding.device_set) == 8 and kernel.addressable_shards[0].data.shape[0] == 128 // 4


def test_chunked_loss_equals_plain():
    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.normal(size=(16, 50)), jnp.float32)
    hidden = jnp.asarray(rng.normal(size=(2, 13, 16)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, 50, (2, 13)), jnp.int32)
    mask = jnp.asarray(rng.random((2, 13)) > 0.4, jnp.float32)

    def f(w, chunk):
        return train.token_cross_entropy(lambda h: h @ w, hidden, targets, mask, chunk)[0]

    plain, g_plain = jax.value_and_grad(f)(w, 0)
    chunked, g_chunk = jax.value_and_grad(f)(w, 4)
    logits = np.asarray(hidden @ w)
    lse = np.log(np.exp(logits).sum(-1))
    picked = np.take_along_axis(logits, np.asarray(targets)[..., None], -1)[..., 0]
    expected = ((lse - picked) * np.asarray(mask)).sum() / np.asarray(mask).sum()
    np.testing.assert_allclose(plain, expected, rtol=1e-5)
    np.testing.assert_allclose(chunked, plain, rtol=1e-6)
    np.testing.assert_allclose(g_chunk, g_plain, rtol=1e-5, atol=1e-7)


def _tiny_run_config():
    c = load_config(TINY)
    # Two buckets: short caption/VQA batches and longer (video) ones compile separately in one stage.
    c.data.update(mini_train_per_task=12, mini_test_per_task=2, max_len=160, seq_buckets=(80, 160))
    c.stages.objective.update(steps=3, batch_size=8)
    c.stages.emotional.update(steps=14, batch_size=8, lr=3e-3, warmup_ratio=0.0)
    c.train.update(log_every=1, checkpoint_every=100)
    c.mesh.data = 1
    return c


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("tiny_run")
    config = _tiny_run_config()
    mesh = sharding.make_mesh({"data": 1}, devices=jax.devices()[:1])
    return workdir, train.train(config, str(workdir), mesh=mesh)


@pytest.mark.slow
def test_short_training_lowers_the_loss_and_writes_logs(tiny_run):
    workdir, result = tiny_run
    assert result.global_step == 3 + 14
    emo = result.losses["emotional"]
    assert len(emo) == 14 and all(np.isfinite(emo))
    assert np.mean(emo[-4:]) < 0.7 * np.mean(emo[:2]), emo
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 18))
    assert {r["stage"] for r in records} == {"objective", "emotional"}
    assert all(r["tokens_per_s"] > 0 and 0 < r["mfu"] < 1 and r["supervised_tokens"] > 0 for r in records)
    assert records[3]["lr"] == pytest.approx(3e-3)  # without warmup, cosine starts at the peak
    assert (workdir / "loss_emotional.png").stat().st_size > 1000
    assert list((workdir / "tensorboard").iterdir())
    # stage ends are checkpointed: 3 (objective) and 17 (emotional)
    steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [3, 17]


@pytest.mark.slow
def test_rerun_of_a_finished_run_trains_nothing(tiny_run):
    workdir, result = tiny_run
    config = _tiny_run_config()
    mesh = sharding.make_mesh({"data": 1}, devices=jax.devices()[:1])
    again = train.train(config, str(workdir), mesh=mesh)
    assert again.global_step == result.global_step and again.losses == {}
    a, b = jax.tree.leaves(again.params), jax.tree.leaves(result.params)
    assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a, b, strict=True))


@pytest.mark.slow
def test_non_finite_loss_stops_with_stage_and_step(tiny_run, tmp_path):
    workdir, _ = tiny_run
    config = _tiny_run_config()
    config.stages.objective.lr = 1e30  # blows up after the first update
    config.stages.objective.grad_clip = 0.0
    config.stages.objective.steps = 4
    mesh = sharding.make_mesh({"data": 1}, devices=jax.devices()[:1])
    with pytest.raises(hooks.NonFiniteError, match=r"stage 'objective' step [2-4]"):
        train.train(config, str(tmp_path), mesh=mesh)


class _Recorder(hooks.Hook):
    """Writes down every call the loop makes."""

    def __init__(self):
        self.calls = []

    def on_stage_start(self, stage):
        self.calls.append(("stage_start", stage.name, stage.steps, stage.initial_step))

    def on_compile(self, stage, shape, seconds):
        self.calls.append(("compile", stage.name, shape))

    def on_step(self, stage, step):
        self.calls.append(("step", stage.name, step.stage_step, step.global_step, dict(step.metrics)))

    def on_stage_end(self, stage):
        self.calls.append(("stage_end", stage.name))

    def on_run_end(self):
        self.calls.append(("run_end",))

    def close(self):
        self.calls.append(("close",))


@pytest.fixture(scope="module")
def profiled_run(tmp_path_factory):
    """One 4-step stage with a trace of 2 steps and a recording hook."""
    workdir = tmp_path_factory.mktemp("profiled_run")
    config = _tiny_run_config()
    config.stage_order = ("objective",)
    config.stages.objective.steps = 4
    config.train.profile_steps = 2
    recorder = _Recorder()
    mesh = sharding.make_mesh({"data": 1}, devices=jax.devices()[:1])
    result = train.train(config, str(workdir), mesh=mesh, hooks=[recorder])
    return workdir, result, recorder.calls


def test_a_hook_receives_every_step_and_its_metrics(profiled_run):
    workdir, result, calls = profiled_run
    assert calls[0] == ("stage_start", "objective", 4, 0)
    assert calls[-3:] == [("stage_end", "objective"), ("run_end",), ("close",)]
    assert [c[1:] for c in calls if c[0] == "compile"] == [("objective", (8, 80))]
    steps = [c for c in calls if c[0] == "step"]
    assert [(c[2], c[3]) for c in steps] == [(1, 1), (2, 2), (3, 3), (4, 4)]
    assert [c[4]["loss"] for c in steps] == result.losses["objective"]
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    for rec, (*_, metrics) in zip(records, steps, strict=True):
        assert set(metrics) == {"loss", "grad_norm", "supervised_tokens"}
        assert all(rec[k] == v for k, v in metrics.items()), (rec, metrics)


def test_profile_steps_leaves_a_trace_under_the_workdir(profiled_run):
    workdir, _, _ = profiled_run
    traces = list((workdir / "profile").glob("plugins/profile/*/*.xplane.pb"))
    assert len(traces) == 1 and traces[0].stat().st_size > 0, traces

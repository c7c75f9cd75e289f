"""emollm_jax.mvp_inspect: the relation graph and its density, the gates, the model without a perspective."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from emollm_jax import experiment, mvp_inspect
from emollm_jax.configuration import load_config
from tests.tiny_eval_setup import ROOT, make_data, random_model, tiny_config

PERSPECTIVES = ("token", "relation", "multilevel", "global")


def _model(fusion="sum", perspectives=PERSPECTIVES, seed=0, **model):
    c = load_config(f"{ROOT / 'configs' / 'emobench.py'}:tiny")
    c.model.projector.update(perspectives=perspectives, fusion=fusion)
    c.model.update(**model)
    m = experiment.new_model(experiment.model_config(c, vocab_size=40, image_token_id=4), seed)
    if fusion == "gated_sum":  # trained-looking gates, not the all-equal initial ones
        m.projector.gate_w[...] = 0.5 * jax.random.normal(jax.random.key(seed), m.projector.gate_w.shape)
        m.projector.gate_b[...] = jnp.linspace(-0.3, 0.3, len(perspectives))
    return m


def _pixels(n=2, seed=0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=(n, 64, 64, 3)).astype(np.float32))


def _full_parts(model, pixels):
    features = model.vision_features(pixels)
    ys = {k: np.asarray(v) for k, v in model.projector.perspectives(features).items()}
    return features, ys, np.asarray(model.projector(features))


def test_without_a_perspective_under_sum_drops_its_term():
    model = _model("sum")
    features, ys, full = _full_parts(model, _pixels())
    for name in PERSPECTIVES:
        reduced = mvp_inspect.without_perspective(model, name)
        assert reduced.config.projector.perspectives == tuple(p for p in PERSPECTIVES if p != name)
        out = np.asarray(reduced.projector(features))
        np.testing.assert_allclose(out, full - np.broadcast_to(ys[name], full.shape), atol=1e-5)
    # the rest of the model is the same weights
    reduced = mvp_inspect.without_perspective(model, "relation")
    assert reduced.llm.model.embed_tokens.embedding[...] is model.llm.model.embed_tokens.embedding[...]
    np.testing.assert_array_equal(reduced.vision(_pixels()).hidden_states[-1],
                                  model.vision(_pixels()).hidden_states[-1])


def test_without_a_perspective_under_gated_sum_renormalises_the_others():
    model = _model("gated_sum", seed=3)
    pixels = _pixels()
    features, ys, full = _full_parts(model, pixels)
    gates = mvp_inspect.gate_weights(model, pixels)  # [K, N, P]
    assert gates.shape == (4, 2, 16)
    np.testing.assert_allclose(gates.sum(0), 4.0, rtol=1e-5)
    assert gates.std() > 0.01  # the perturbed gates differ between perspectives and tokens
    np.testing.assert_allclose(np.einsum("knp,knpd->npd", gates, np.stack(
        [np.broadcast_to(y, full.shape) for y in ys.values()])), full, atol=1e-5)
    for k, name in enumerate(PERSPECTIVES):
        keep = [j for j in range(4) if j != k]
        weights = 3 * gates[keep] / gates[keep].sum(0, keepdims=True)  # softmax over the others, times K-1
        want = sum(w[..., None] * np.broadcast_to(ys[PERSPECTIVES[j]], full.shape)
                   for w, j in zip(weights, keep, strict=True))
        out = np.asarray(mvp_inspect.without_perspective(model, name).projector(features))
        np.testing.assert_allclose(out, want, atol=1e-5)


def test_without_a_perspective_under_concat_removes_its_tokens():
    model = _model("concat")
    features, _, full = _full_parts(model, _pixels())  # [N, 3 * 16 + 1, D]: token, relation, multilevel, cls
    reduced = mvp_inspect.without_perspective(model, "relation")
    assert reduced.config.tokens_per_frame == 2 * 16 + 1
    np.testing.assert_allclose(np.asarray(reduced.projector(features)),
                               np.concatenate([full[:, :16], full[:, 32:]], axis=1), atol=1e-6)


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="'colour' is not one of the projector's perspectives"):
        mvp_inspect.without_perspective(_model(), "colour")
    with pytest.raises(ValueError, match="no gates"):
        mvp_inspect.gate_weights(_model("sum"), _pixels(1))
    c = load_config(f"{ROOT / 'configs' / 'emobench.py'}:tiny")
    c.model.projector.kind = "mlp2x_gelu"
    mlp = experiment.new_model(experiment.model_config(c, vocab_size=40, image_token_id=4), 0)
    with pytest.raises(ValueError, match="'mlp2x_gelu', not 'mvp'"):
        mvp_inspect.without_perspective(mlp, "token")


def test_relation_graph_and_density():
    x = np.array([[1.0, 0.0], [2.0, 0.0], [0.0, 1.0]], np.float32)  # two parallel patches, one orthogonal
    adj = mvp_inspect.relation_graph(x, 0.5)
    np.testing.assert_array_equal(adj, [[1, 1, 0], [1, 1, 0], [0, 0, 1]])
    assert mvp_inspect.edge_density(adj) == pytest.approx(1 / 3)  # 1 of the 3 pairs
    rand = np.random.default_rng(0).normal(size=(2, 16, 8)).astype(np.float32)
    assert mvp_inspect.relation_graph(rand, 0.0).shape == (2, 16, 16)
    taus = np.linspace(-1.01, 1.01, 21)
    dens = mvp_inspect.density_by_tau(rand, taus)
    assert dens[0] == 1.0 and dens[-1] == 0.0 and np.all(np.diff(dens) <= 0)
    np.testing.assert_array_equal(mvp_inspect.relation_graph(rand[0], 1.01), np.eye(16, dtype=bool))


def test_token_grid():
    assert mvp_inspect.token_grid(_model().config) == (4, 0)  # CLIP's class token dropped ("patch")
    assert mvp_inspect.token_grid(_model(vision_feature_select="full").config) == (4, 1)


def test_pixels_and_answers_match_the_pipeline(tmp_path):
    from emollm_jax import evaluate

    data, tok_path, tok = make_data(tmp_path, per_task_test=1)
    config = tiny_config(data, tok_path)
    config.model.projector.update(perspectives=("token", "relation"), fusion="gated_sum")
    model = random_model(config, tok)
    path = data / "test.jsonl"
    batches, _ = evaluate.record_batches(config, path, data, tok, model)
    batch, metas = next(iter(batches))
    records = {r["id"]: r for r in map(json.loads, path.read_text().splitlines())}
    first = records[metas[0]["id"]]
    assert first.get("image")
    pixels = mvp_inspect.image_pixels(model.config, data / first["image"])
    np.testing.assert_allclose(pixels[0], batch["pixel_values"][0, 0], atol=1e-6)

    rows = mvp_inspect.answers_by_perspective(config, tmp_path, [first, records[metas[1]["id"]]], data,
                                              model=model, tokenizer=tok)
    assert [(r["removed"], r["id"]) for r in rows] == [
        (removed, rid) for removed in ("", "token", "relation") for rid in (metas[0]["id"], metas[1]["id"])]
    assert all(isinstance(r["answer"], str) for r in rows)

"""Projectors: output shapes and token counts, the similarity graph, MVP's perspectives and fusions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.scipy.special import erf

import emollm_jax  # noqa: F401  (flax config first)
from emollm_jax.configuration import ConfigError
from emollm_jax.models.parts import PROJECTORS, VisualFeatures, part_config
from emollm_jax.models.projectors import (
    LinearProjectorConfig,
    MLPProjectorConfig,
    MVPConfig,
    similarity_graph,
)

DV, D, N, P, L = 12, 20, 3, 6, 3


def _features(seed=0, n=N, p=P):
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    return VisualFeatures(
        patches=jax.random.normal(k1, (n, p, DV)),
        levels=jax.random.normal(k2, (L, n, p, DV)),
        cls=jax.random.normal(k3, (n, DV)),
    )


def _mvp(seed=0, **kw):
    cfg = MVPConfig(levels=(-1, -2, -3), **kw)
    return cfg, cfg.build(DV, D, rngs=nnx.Rngs(seed))


def _mlp(mlp, x):
    """Reference LLaVA MLP with the exact (erf) GELU."""
    h = x @ mlp.linear_1.kernel[...] + mlp.linear_1.bias[...]
    h = 0.5 * h * (1.0 + erf(h / np.sqrt(2.0)))
    return h @ mlp.linear_2.kernel[...] + mlp.linear_2.bias[...]


@pytest.mark.parametrize(
    "kw",
    [
        {"kind": "mlp2x_gelu"},
        {"kind": "linear"},
        {"kind": "mvp", "fusion": "sum"},
        {"kind": "mvp", "fusion": "gated_sum"},
        {"kind": "mvp", "fusion": "concat"},
        {"kind": "mvp", "fusion": "concat", "perspectives": ("token", "relation")},
        {"kind": "mvp", "fusion": "concat", "perspectives": ("global",)},
        {"kind": "mvp", "fusion": "gated_sum", "perspectives": ("relation", "global")},
    ],
)
def test_shapes_and_token_counts(kw):
    kw = dict(kw)
    cls = PROJECTORS.get(kw.pop("kind"))
    cfg = cls(levels=(-1, -2, -3), **kw) if cls is MVPConfig else cls(**kw)
    out = cfg.build(DV, D, rngs=nnx.Rngs(0))(_features())
    assert out.shape == (N, cfg.num_output_tokens(P), D)
    assert np.isfinite(np.asarray(out)).all()


def test_token_counts_by_fusion():
    assert MLPProjectorConfig().num_output_tokens(576) == 576
    assert LinearProjectorConfig().num_output_tokens(576) == 576
    assert MVPConfig(fusion="sum").num_output_tokens(576) == 576
    assert MVPConfig(fusion="concat").num_output_tokens(16) == 3 * 16 + 1
    cfg = MVPConfig(fusion="concat", perspectives=("token", "multilevel"))
    assert cfg.num_output_tokens(16) == 32


def test_mlp2x_is_linear_exact_gelu_linear():
    proj = MLPProjectorConfig().build(DV, D, rngs=nnx.Rngs(1))
    f = _features()
    np.testing.assert_allclose(proj(f), _mlp(proj, f.patches), atol=1e-5)
    # The tanh approximation differs measurably on the same inputs, so this test tells the two apart.
    h = f.patches @ proj.linear_1.kernel[...] + proj.linear_1.bias[...]
    tanh_out = jax.nn.gelu(h, approximate=True) @ proj.linear_2.kernel[...] + proj.linear_2.bias[...]
    assert np.abs(np.asarray(proj(f) - tanh_out)).max() > 1e-5


def test_graph_hand_built():
    # Tokens 0 and 1 are parallel, token 2 is orthogonal, token 3 is zero: A = {0,1} block + self loops.
    x = jnp.array([[[1.0, 0.0], [2.0, 0.0], [0.0, 3.0], [0.0, 0.0]]])
    adj = np.asarray(similarity_graph(x, 0.5))[0]
    expected = np.array([[0.5, 0.5, 0, 0], [0.5, 0.5, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
    np.testing.assert_allclose(adj, expected, atol=1e-6)


def test_graph_thresholds_identity_and_complete():
    x = _features().patches
    np.testing.assert_allclose(similarity_graph(x, 1.01), np.broadcast_to(np.eye(P), (N, P, P)), atol=1e-7)
    np.testing.assert_allclose(similarity_graph(x, -1.01), np.full((N, P, P), 1.0 / P), atol=1e-6)


def test_relation_identity_graph_is_per_token_gcn_then_mlp():
    _, proj = _mvp(tau=1.01, gcn_layers=2, fusion="sum")
    rel = proj.relation
    x = _features().patches
    h = x
    for layer in rel.gcn:
        h = jax.nn.gelu(h @ layer.kernel[...] + layer.bias[...], approximate=False)
    np.testing.assert_allclose(rel(x), _mlp(rel.mlp, h), atol=1e-5)


def test_relation_complete_graph_gives_equal_tokens():
    _, proj = _mvp(tau=-1.01, fusion="sum")
    out = np.asarray(proj.relation(_features().patches))
    np.testing.assert_allclose(out, np.broadcast_to(out[:, :1], out.shape), atol=1e-5)
    assert not np.allclose(out[0, 0], out[1, 0])  # different images still differ


def test_zero_vectors_are_safe_and_gradients_finite():
    cfg, proj = _mvp(fusion="gated_sum")
    f = _features()
    f = f._replace(patches=f.patches.at[:, :2].set(0.0),  # zero patches (e.g. padding frames)
                   levels=f.levels.at[:, 0].set(0.0), cls=f.cls.at[0].set(0.0))
    graphdef, params = nnx.split(proj, nnx.Param)

    def loss(params, feats):
        return jnp.sum(nnx.merge(graphdef, params)(feats) ** 2)

    gp, gf = jax.grad(loss, argnums=(0, 1))(params, f)
    for leaf in jax.tree.leaves(gp) + jax.tree.leaves(gf):
        assert np.isfinite(np.asarray(leaf)).all()
    assert float(jnp.abs(gp["gate_w"][...]).max()) > 0  # zero-initialised gates still learn


def test_gated_sum_starts_as_sum_and_gates_then_change_it():
    _, gated = _mvp(seed=3, fusion="gated_sum")
    f = _features()
    ys = gated.perspectives(f)
    summed = sum(jnp.broadcast_to(y, (N, P, D)) for y in ys.values())
    np.testing.assert_allclose(gated(f), summed, atol=1e-5)
    gated.gate_b[...] = jnp.array([10.0, -10.0, -10.0, -10.0])  # all trust on "token"
    np.testing.assert_allclose(gated(f), 4 * ys["token"], rtol=1e-3, atol=1e-3)


def test_global_is_broadcast_added_to_every_token():
    _, proj = _mvp(fusion="sum")
    f1 = _features()
    f2 = f1._replace(cls=f1.cls + 1.0)
    delta = np.asarray(proj(f2) - proj(f1))
    np.testing.assert_allclose(delta, np.broadcast_to(delta[:, :1], delta.shape), atol=1e-5)
    assert np.abs(delta).max() > 1e-3


def test_concat_order_and_global_token():
    _, proj = _mvp(fusion="concat")
    f = _features()
    ys = proj.perspectives(f)
    out = proj(f)
    np.testing.assert_allclose(out[:, :P], ys["token"], atol=1e-6)
    np.testing.assert_allclose(out[:, P : 2 * P], ys["relation"], atol=1e-6)
    np.testing.assert_allclose(out[:, -1], _mlp(proj.global_, f.cls), atol=1e-5)


def test_multilevel_weights_select_levels():
    _, proj = _mvp(fusion="sum")
    ml = proj.multilevel
    levels = _features().levels
    ml.level_logits[...] = jnp.array([0.0, 30.0, 0.0])
    np.testing.assert_allclose(ml(levels), _mlp(ml.mlp, ml.norms[1](levels[1])), atol=1e-4)
    ml.level_logits[...] = jnp.zeros(3)
    mean = sum(ml.norms[i](levels[i]) for i in range(3)) / 3
    np.testing.assert_allclose(ml(levels), _mlp(ml.mlp, mean), atol=1e-5)


def test_global_pool_mean_ignores_cls():
    _, proj = _mvp(fusion="concat", global_pool="mean")
    f = _features()
    np.testing.assert_allclose(proj(f), proj(f._replace(cls=f.cls * 0 + 5)), atol=1e-6)


@pytest.mark.parametrize(
    "kw,field",
    [
        ({"kind": "mlp3x"}, "kind"),
        ({"kind": "mvp", "perspectives": ("token", "colour")}, "perspectives"),
        ({"kind": "mvp", "perspectives": ("token", "token")}, "perspectives"),
        ({"kind": "mvp", "fusion": "max"}, "fusion"),
        ({"kind": "mvp", "gcn_layers": 0}, "gcn_layers"),
        ({"kind": "mvp", "levels": ()}, "levels"),
        ({"kind": "mvp", "fusion": "sum", "perspectives": ("global",)}, "perspectives"),
        ({"kind": "mvp", "tau": 3.0}, "tau"),
        ({"kind": "mvp", "colour": 1}, "colour"),
    ],
)
def test_config_errors_name_the_key(kw, field):
    """The config block of a projector is checked by its registered kind; errors name the config key."""
    with pytest.raises(ConfigError, match=rf"^config\.model\.projector\.{field}\b"):
        part_config(PROJECTORS, kw, "model.projector")


def test_a_block_keeps_other_kinds_keys_when_kind_switches():
    """Switching `kind` on the command line leaves the MVP keys in the block: they are not this kind's."""
    block = {**MVPConfig.block(tau=0.3), "kind": "mlp2x_gelu"}
    assert part_config(PROJECTORS, block, "model.projector") == MLPProjectorConfig()


def test_every_param_has_logical_names():
    _, proj = _mvp(fusion="gated_sum")
    for path, var in nnx.to_flat_state(nnx.state(proj, nnx.Param)):
        names = var.get_metadata().get("out_sharding")
        assert names is not None and len(names) == var[...].ndim, path

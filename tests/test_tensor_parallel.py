"""Tensor parallelism with logical activation constraints: the tiny EmoLLM's train step on tensor 2 and 4
(8 fake devices) gives the 1-device losses, and the compiled step's collectives are the Megatron set (a
regression that adds all-gathers or resharding shows up here); `constrain` is a no-op outside a mesh."""

import collections
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from emollm_jax import experiment, sharding, train
from emollm_jax.configuration import load_config

TINY = f"{Path(__file__).resolve().parents[1] / 'configs' / 'emobench.py'}:tiny"
_KIND = re.compile(r" (all-reduce|all-gather|reduce-scatter|collective-permute|all-to-all)(?:-start)?\(")
_SHAPE = re.compile(r"= \(?\w+\[([\d,]*)\]")


def _stage(shape):
    config = load_config(TINY)
    config.mesh.update(**shape)
    config.stages.emotional.warmup_ratio = 0.0
    mesh = sharding.make_mesh(shape, devices=jax.devices()[:1] if shape == {"data": 1} else None)
    base = experiment.model_config(config, vocab_size=64, image_token_id=4)
    return config, mesh, base, train.build_stage(config, 1, base, mesh, total_steps=10)


def _losses(shape, steps=3):
    from test_train import _batch

    config, mesh, base, st = _stage(shape)
    params = train.init_params(config, st.model_cfg, st.param_shardings)
    opt = jax.jit(st.tx.init, out_shardings=st.opt_shardings)(params)
    out = []
    for i in range(steps):
        params, opt, m = st.step_fn(params, opt, sharding.global_batch(_batch(base, seed=i), mesh))
        out.append((float(m["loss"]), float(m["grad_norm"])))
    return np.array(out), params


@pytest.fixture(scope="module")
def one_device():
    return _losses({"data": 1})[0]


@pytest.mark.parametrize("shape", [{"data": 4, "tensor": 2}, {"data": 2, "tensor": 4}])
def test_tensor_parallel_matches_1_device(one_device, shape):
    got, params = _losses(shape)
    assert one_device[-1, 0] < one_device[0, 0]  # it trains
    np.testing.assert_allclose(got, one_device, rtol=1e-5, atol=1e-5)
    up = params["llm"]["model"]["layers"][0]["mlp"]["up_proj"]["kernel"].get_value()
    assert up.addressable_shards[0].data.shape[1] == up.shape[1] // shape["tensor"]  # mlp split on tensor


def collectives(hlo: str) -> list[tuple[str, tuple[int, ...]]]:
    """(kind, shape of its (first) result) of every collective in compiled HLO text."""
    out = []
    for line in hlo.splitlines():
        kind = _KIND.search(line)
        if kind:
            dims = _SHAPE.search(line).group(1)
            out.append((kind.group(1), tuple(int(d) for d in dims.split(",") if d)))
    return out


@pytest.mark.parametrize("tensor", [2, 4])
def test_tensor_parallel_step_has_only_the_expected_collectives(tensor):
    """Per decoder layer two all-reduces of the residual stream forward (after o_proj and down_proj) and two
    backward (into q|k|v and gate|up), plus the gradients' all-reduces. With tensor 4 the tiny decoder's 2 kv
    heads cannot split 4 ways, so k and v are gathered (forward) and their gradients too (backward): 4 per
    layer; with tensor 2 nothing over the decoder's sequence is gathered. The vision side adds at most two
    (MVP's patch graph reads whole feature vectors). No resharding (collective-permute, all-to-all)."""
    from test_train import _batch

    config, mesh, base, st = _stage({"data": 8 // tensor, "tensor": tensor})
    params = sharding.with_shardings(st.abstract_params, st.param_shardings)
    opt = sharding.with_shardings(st.abstract_opt, st.opt_shardings)
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sharding.data_sharding(mesh))
             for k, v in _batch(base).items()}
    found = collectives(st.step_fn.lower(params, opt, batch).compile().as_text())
    kinds = collections.Counter(kind for kind, _ in found)
    assert set(kinds) == {"all-reduce", "all-gather"}, kinds
    rows, t, layers = 8 // (8 // tensor), 96, base.text.num_layers
    residual = (rows, t, base.text.hidden_size)  # this device's rows of the decoder's [B, T, D]
    assert sum(1 for kind, s in found if kind == "all-reduce" and s == residual) == 4 * layers, found
    decoder_gathers = [s for kind, s in found if kind == "all-gather" and t in s]
    assert len(decoder_gathers) == (0 if tensor == 2 else 4 * layers), decoder_gathers
    assert kinds["all-gather"] - len(decoder_gathers) <= 2, found


def test_constrain_outside_a_mesh_is_the_identity_and_inside_places():
    x = jnp.ones((8, 6, 4))
    assert sharding.constrain(x, ("batch", "length", "embed")) is x
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    with sharding.activation_sharding(mesh):
        placed = jax.jit(lambda y: sharding.constrain(y * 2, ("batch", "length", "mlp")))(x)
        odd = jax.jit(lambda y: sharding.constrain(y, ("batch", "length", "mlp")))(jnp.ones((3, 6, 5)))
    assert placed.sharding.is_equivalent_to(NamedSharding(mesh, P(("data", "fsdp"), None, "tensor")), 3)
    assert odd.sharding.is_equivalent_to(NamedSharding(mesh, P()), 3)  # 3 and 5 divide nothing: unsplit
    one = sharding.make_mesh({}, devices=jax.devices()[:1])
    with sharding.activation_sharding(one):
        assert sharding.constrain(x, ("batch", None, None)) is x

"""`config.eval.dtype`: evaluation and prediction hold their weights and compute in the configured dtype.

The key is checked beside its field (a bad value is one line naming it); `model_dtype.cast_model` gives real
bf16 parameters whose Linears run bf16 products; and through `python -m emollm_jax.main` the evaluation after
training, `--mode=eval` and `--mode=predict` evaluate bf16 weights, which results.json and the log record.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from emollm_jax import model_dtype, run_config
from emollm_jax.configuration import ConfigError, load_config
from tests import cli_setup
from tests.cli_setup import CONFIG, FAST


def test_a_bad_dtype_is_one_line_naming_the_key(tmp_path):
    config = load_config(CONFIG, ["eval.dtype=bf16"])
    with pytest.raises(ConfigError, match=r"^config\.eval\.dtype='bf16': unknown dtype; expected one of"):
        run_config.parse_sections(config)
    run_config.parse_sections(load_config(CONFIG, ["eval.dtype=bfloat16"]))  # a known one passes
    proc = cli_setup.main(tmp_path / "w", "--mode=eval", "--config.eval.dtype=bf16", check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: config.eval.dtype='bf16': unknown dtype")
    assert not (tmp_path / "w").exists()  # refused before anything is written


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from tests.tiny_eval_setup import make_data, random_model, tiny_config

    data, tok_path, tok = make_data(tmp_path_factory.mktemp("eval_dtype"), per_task_test=1)
    config = tiny_config(data, tok_path)
    return config, tok, random_model(config, tok)


def _linears(model):
    return [m for _, m in nnx.iter_graph(model) if isinstance(m, nnx.Linear)]


def test_cast_model_holds_bf16_weights_and_runs_bf16_products(tiny):
    config, tok, model = tiny
    half = model_dtype.cast_model(model, "bfloat16")
    total = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert model_dtype.param_dtypes(half) == {"bfloat16": total}
    assert model_dtype.param_dtypes(model) == {"float32": total}  # the model given is left as it was
    assert half.config.text.dtype == half.config.vision.dtype == "bfloat16"
    assert all(m.dtype == jnp.bfloat16 and m.kernel.dtype == jnp.bfloat16 for m in _linears(half))

    ids = jnp.asarray(np.random.default_rng(0).integers(5, tok.vocab_size, (2, 12)), jnp.int32)
    assert half.llm(ids, return_hidden=True).dtype == jnp.bfloat16
    # Every product with a weight matrix takes bf16 operands (models.dots accumulates them in float32).
    graphdef, state = nnx.split(half)
    jaxpr = jax.make_jaxpr(lambda s, x: nnx.merge(graphdef, s).llm(x))(state, ids)
    dots = [e for e in _eqns(jaxpr.jaxpr) if e.primitive.name == "dot_general" and e.invars[1].aval.ndim == 2]
    assert dots and all(v.aval.dtype == jnp.bfloat16 for e in dots for v in e.invars)
    assert any(e.params["preferred_element_type"] == jnp.float32 for e in dots)

    full, low = model.llm(ids), half.llm(ids)
    scale = float(jnp.abs(full).max())
    assert float(jnp.abs(full - low.astype(jnp.float32)).max()) < 0.05 * scale  # bf16 rounding, no more
    assert not np.array_equal(np.asarray(full), np.asarray(low, np.float32))  # and it did round

    assert model_dtype.cast_model(half, "bfloat16") is half  # nothing to do
    back = model_dtype.cast_model(half, "float32")
    assert model_dtype.param_dtypes(back) == {"float32": total} and back.config.text.dtype == "float32"


def _eqns(jaxpr):
    """Every equation of a jaxpr, those of nested jaxprs (custom_vjp, pjit) included."""
    for e in jaxpr.eqns:
        yield e
        for p in e.params.values():
            inner = getattr(p, "jaxpr", p)
            if hasattr(inner, "eqns"):
                yield from _eqns(inner)


def test_cast_keeps_shardings_and_donation_frees_the_old_weights(tiny):
    from emollm_jax import sharding

    config, tok, model = tiny
    mesh = sharding.make_mesh({"data": 1, "fsdp": 8})
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    params = jax.device_put(params, sharding.logical_shardings(params, mesh, config.sharding_rules))
    laid_out = nnx.merge(graphdef, params, rest)
    old = jax.tree.leaves(nnx.state(laid_out, nnx.Param))
    half = model_dtype.cast_model(laid_out, "bfloat16", donate=True)
    new = jax.tree.leaves(nnx.state(half, nnx.Param))
    assert [x.sharding for x in new] == [x.sharding for x in old]
    assert any(len(x.sharding.device_set) == 8 and not x.sharding.is_fully_replicated for x in new)
    assert all(x.is_deleted() for x in old) and not any(x.is_deleted() for x in new)


@pytest.mark.slow
def test_bf16_eval_after_training_eval_mode_and_predict_through_main(tmp_path):
    data = cli_setup.make_data(tmp_path / "data")
    work = tmp_path / "w"
    bf16 = "--config.eval.dtype=bfloat16"

    def results():
        return json.loads((work / "eval" / "results.json").read_text())

    cli_setup.main(work, f"--config.data.root={data}", *FAST, bf16)  # --mode=all: train, then evaluate
    after_training = results()
    n = sum(after_training["param_dtypes"].values())
    assert after_training["checkpoint"] == "in-memory model"
    assert after_training["dtype"] == "bfloat16" and after_training["param_dtypes"] == {"bfloat16": n}

    cli_setup.main(work, "--mode=eval", *FAST)  # the default: float32
    assert results()["dtype"] == "float32" and results()["param_dtypes"] == {"float32": n}

    cli_setup.main(work, "--mode=eval", *FAST, bf16)
    from_checkpoint = results()
    assert from_checkpoint["checkpoint"].endswith("step 2")
    assert from_checkpoint["dtype"] == "bfloat16" and from_checkpoint["param_dtypes"] == {"bfloat16": n}
    assert from_checkpoint["accuracy"] == after_training["accuracy"]  # the same bf16 weights, both ways

    record = next(json.loads(line) for line in (data / "test.jsonl").read_text().splitlines()
                  if json.loads(line)["task"] == "emo_c")
    proc = cli_setup.main(work, "--mode=predict", f"--image={data / record['image']}", "--task=emo_c",
                          f"--question={record['conversations'][0]['value']}", *FAST, bf16)
    assert any(line.startswith("predict-0: ") for line in proc.stdout.splitlines())
    lines = [x for x in (work / "run.log").read_text().splitlines() if "eval weights and compute in" in x]
    assert [x.split("eval weights and compute in ")[1].split()[0] for x in lines] == [
        "bfloat16", "float32", "bfloat16", "bfloat16"]
    assert f"{{'bfloat16': {n}}}" in lines[-1]

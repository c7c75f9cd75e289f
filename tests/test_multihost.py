"""Two processes x 4 CPU devices train exactly like one process x 8 devices (jax.distributed + gloo).

The test starts this file as a worker script (`python tests/test_multihost.py worker`): each worker calls
`initialize_distributed` from the JAX_* environment, builds the global (data 2, fsdp 2, tensor 2) mesh, feeds
only its own rows through `global_batch`, runs jitted AdamW steps of a tiny LLaMA and prints its losses.
"""

import json
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.cli_setup import pod_env

REPO = Path(__file__).resolve().parents[1]
STEPS = 3
GLOBAL_BATCH = 8


def _local_rows(sharding, global_rows: int) -> slice:
    """Rows of a `global_rows` batch that this process's devices hold under `sharding` (contiguous)."""
    index_map = sharding.addressable_devices_indices_map((global_rows,))
    starts = sorted({idx[0].indices(global_rows)[0] for idx in index_map.values()})
    stops = sorted({idx[0].indices(global_rows)[1] for idx in index_map.values()})
    assert all(b == a for a, b in zip(stops[:-1], starts[1:], strict=True)), "rows are not contiguous"
    return slice(starts[0], stops[-1])


def _worker() -> None:
    import emollm_jax  # noqa: F401
    from emollm_jax import sharding as shd

    distributed = shd.initialize_distributed()

    import jax
    import optax
    from flax import nnx

    from emollm_jax.models.llama import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2
    )
    mesh = shd.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    assert mesh.size == 8 and jax.process_count() == (2 if distributed else 1)

    def init():
        return nnx.split(LlamaForCausalLM(cfg, rngs=nnx.Rngs(0)), nnx.Param, ...)[1:]

    graphdef = nnx.split(nnx.eval_shape(lambda: LlamaForCausalLM(cfg, rngs=nnx.Rngs(0))))[0]
    abstract, abstract_rest = jax.eval_shape(init)
    psh = shd.logical_shardings(abstract, mesh)
    rest_sh = jax.tree.map(lambda _: shd.replicated(mesh), abstract_rest)
    # Initialise directly into the global shardings: no process ever holds a full copy it must scatter.
    params, rest = jax.jit(init, out_shardings=(psh, rest_sh))()
    tx = optax.adamw(1e-2, weight_decay=0.1)
    osh = shd.optimizer_shardings(jax.eval_shape(tx.init, abstract), psh, mesh)
    opt_state = jax.jit(tx.init, out_shardings=osh)(params)

    def step(params, opt_state, rest, batch):
        def loss_fn(p):
            logits = nnx.merge(graphdef, p, rest)(batch["input_ids"])
            return optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"]).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    step = jax.jit(
        step,
        in_shardings=(psh, osh, rest_sh, shd.data_sharding(mesh)),
        out_shardings=(psh, osh, shd.replicated(mesh)),
        donate_argnums=(0, 1),
    )
    rows = _local_rows(shd.data_sharding(mesh), GLOBAL_BATCH)
    losses = []
    for i in range(STEPS):
        ids = np.random.default_rng(i).integers(0, cfg.vocab_size, (GLOBAL_BATCH, 9), dtype=np.int32)
        local = {"input_ids": ids[rows, :-1], "targets": ids[rows, 1:]}  # this process's rows only
        batch = shd.global_batch(local, mesh)
        params, opt_state, loss = step(params, opt_state, rest, batch)
        losses.append(float(loss))
    print(
        "RESULT "
        + json.dumps({"process": jax.process_index(), "rows": [rows.start, rows.stop], "losses": losses}),
        flush=True,
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _env(devices: int, **extra: str) -> dict:
    return pod_env(devices, **extra)


def _result(out: str) -> dict:
    lines = [ln for ln in out.splitlines() if ln.startswith("RESULT ")]
    assert lines, out[-3000:]
    return json.loads(lines[-1][len("RESULT ") :])


@pytest.mark.slow
def test_two_processes_match_one_process():
    cmd = [sys.executable, __file__, "worker"]
    port = _free_port()
    procs = [
        subprocess.Popen(
            cmd,
            env=_env(
                4, JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i)
            ),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    single = subprocess.run(cmd, env=_env(8), capture_output=True, text=True, timeout=300)
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=300)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert single.returncode == 0, single.stdout[-3000:] + single.stderr[-3000:]
    for p, out in zip(procs, outs, strict=True):
        assert p.returncode == 0, out[-3000:]
    ref = _result(single.stdout)
    results = sorted((_result(o) for o in outs), key=lambda r: r["process"])
    assert [r["process"] for r in results] == [0, 1]
    assert results[0]["rows"] != results[1]["rows"]  # each process really fed a different half
    assert ref["losses"][-1] < ref["losses"][0]
    for r in results:
        np.testing.assert_allclose(r["losses"], ref["losses"], rtol=0, atol=1e-5)


if __name__ == "__main__" and sys.argv[1:] == ["worker"]:
    _worker()

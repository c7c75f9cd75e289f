"""benchmarks/: every script takes `--json OUT`; the shared writer (benchmarks/results.py) computes ratios
with the right direction, records the machine and writes atomically; bench_generate's smallest run writes its
figures, its ratio against HF and its fractions of the memory roof through the command line."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
SCRIPTS = sorted(p.name for p in BENCH.glob("bench_*.py"))
sys.path.insert(0, str(BENCH))

import results  # noqa: E402


def _run(args: list[str], tmp_path: Path, timeout: int = 900) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=timeout)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def test_ratios_say_how_far_ours_is_ahead_whatever_the_unit():
    res = results.Results("benchmarks/bench_x.py")
    res.figure("ours.step", 50.0, "ms")
    res.figure("peer.step", 100.0, "ms")
    res.figure("ours.rate", 300.0, "tok/s")
    res.figure("peer.rate", 100.0, "tok/s")
    assert res.ratio("step", "ours.step", "peer.step", "peer") == pytest.approx(2.0)  # half the time
    assert res.ratio("rate", "ours.rate", "peer.rate", "peer") == pytest.approx(3.0)  # three times the rate
    assert res.ratios["step"]["peer_name"] == "peer" and res.ratios["rate"]["ours"] == "ours.rate"
    with pytest.raises(ValueError, match="ms.*tok/s"):
        res.ratio("mixed", "ours.step", "peer.rate", "peer")
    with pytest.raises(KeyError, match="no figure 'peer.missing'"):
        res.ratio("missing", "ours.step", "peer.missing", "peer")
    with pytest.raises(ValueError, match="twice"):
        res.figure("ours.step", 1.0, "ms")


def test_the_file_holds_command_machine_figures_and_ratios_and_is_replaced_atomically(tmp_path):
    out = tmp_path / "sub" / "r.json"
    res = results.Results("benchmarks/bench_x.py", {"batch": 4})
    res.figure("ours.t", 1.0, "s", "a note")
    res.figure("peer.t", 3.0, "s")
    res.ratio("t", "ours.t", "peer.t", "the peer")
    res.write(out, {"rounds": 1}, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    got = json.loads(out.read_text())
    assert got["script"] == "bench_x" and got["config"] == {"batch": 4} and got["args"] == {"rounds": 1}
    assert got["command"].startswith("python ")
    assert got["figures"]["ours.t"] == {"value": 1.0, "unit": "s", "note": "a note"}
    assert got["ratios"]["t"]["value"] == pytest.approx(3.0)
    machine = got["machine"]
    assert machine["cpu_count"] == os.cpu_count() and machine["jax_backend"] == "cpu"
    assert machine["versions"]["jax"] and machine["env"]["JAX_PLATFORMS"] == "cpu"

    bad = results.Results("benchmarks/bench_x.py")
    bad.figure("nan", float("nan"), "s")  # not valid JSON: the write fails and the old file stays
    with pytest.raises(ValueError):
        bad.write(out, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert json.loads(out.read_text()) == got
    assert sorted(p.name for p in out.parent.iterdir()) == ["r.json"]  # no temp file left behind


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_benchmark_offers_json(script, tmp_path):
    assert len(SCRIPTS) >= 6
    out = _run([str(BENCH / script), "--help"], tmp_path, timeout=300)
    assert "--json OUT" in out.stdout


def _check(path: Path, script: str, ratios: list[str]) -> dict:
    got = json.loads(path.read_text())
    assert got["script"] == script and script in got["command"] and "--json" in got["command"]
    assert got["machine"]["cpu_count"] == os.cpu_count() and got["machine"]["jax_backend"] == "cpu"
    assert set(ratios) <= set(got["ratios"]), sorted(got["ratios"])
    for name in ratios:
        ratio = got["ratios"][name]
        ours, peer = got["figures"][ratio["ours"]], got["figures"][ratio["peer"]]
        assert ours["unit"] == peer["unit"] and ours["value"] > 0 and peer["value"] > 0
        assert ratio["value"] > 0 and ratio["peer_name"]
    return got


def test_bench_generate_writes_figures_ratio_and_roof_fractions(tmp_path):
    out = _run([str(BENCH / "bench_generate.py"), "--size", "tiny", "--rounds", "1", "--reps", "1",
                "--batches", "1", "--roof-mib", "64", "--json", "gen.json"], tmp_path)
    got = _check(tmp_path / "gen.json", "bench_generate",
                 ["decode_vs_hf.b1", "decode_bf16_vs_hf.b1", "jax.b1.roof_fraction",
                  "jax_bf16.b1.roof_fraction"])
    figures = got["figures"]
    assert figures["jax.b1.roof_gbps"]["unit"] == "GB/s"
    methods = ("jax_row_sum", "numpy_sum_1_thread", "numpy_sum_threads")
    reads = [figures[f"jax.b1.read_{m}_gbps"]["value"] for m in methods]
    assert figures["jax.b1.roof_gbps"]["value"] == max(reads)
    # tiny decoder: 2 layers x (4 x 64^2 + 3 x 64 x 172) + norms + head 64 x 1000 + one embedding row, plus
    # the KV cache (2 x 2 layers x 4 heads x 96 slots x 16), float32; bf16 halves every byte
    weights = 2 * (4 * 64 * 64 + 3 * 64 * 172 + 2 * 64) + 64 + 64 * 1000 + 64
    kv = 2 * 2 * 4 * 96 * 16
    assert figures["jax.b1.bytes_per_step"]["value"] == pytest.approx((weights + kv) * 4 / 1e6)
    assert figures["jax_bf16.b1.bytes_per_step"]["value"] == pytest.approx((weights + kv) * 2 / 1e6)
    assert "of roof" in out.stdout and "tokens identical" in out.stdout


SMALLEST = {
    "bench_forward.py": (["--rounds", "1", "--reps", "1"], ["forward_vs_torch"]),
    "bench_scan.py": (["--rounds", "1", "--steps", "1"], ["compile", "step"]),
    "bench_train.py": (["--rounds", "1", "--steps", "1", "--variants", "torch_lm,jax_lm"],
                       ["jax_lm_vs_torch"]),
    "bench_input.py": (["--records", "8", "--batch", "2", "--batches", "2", "--workers", "0", "--rounds", "1",
                        "--image-size", "64", "--job-steps", "1"], ["pipeline.w0", "default_job"]),
    "bench_audio.py": (["--rounds", "1", "--reps", "1"], ["frontend_30s", "frontend_8x30s", "encoder"]),
    "bench_packing.py": (["--rounds", "1", "--steps", "1"],
                         ["packed_vs_bucketed", "packed_vs_bucketed_fine", "eval_prefill_fill"]),
    "bench_eval.py": (["--records_per_task", "1", "--batch", "2", "--new_tokens", "2", "--rounds", "1",
                       "--reps", "1"], ["eval_vs_hf_generate"]),
}


@pytest.mark.slow
@pytest.mark.parametrize("script", sorted(SMALLEST))
def test_each_benchmark_smallest_run_writes_its_ratios(script, tmp_path):
    args, ratios = SMALLEST[script]
    _run([str(BENCH / script), *args, "--json", "out.json"], tmp_path, timeout=1800)
    _check(tmp_path / "out.json", script.removesuffix(".py"), ratios)


def test_every_script_has_a_smallest_run_here():
    assert set(SCRIPTS) == set(SMALLEST) | {"bench_generate.py"}

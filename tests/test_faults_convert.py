"""`python -m emollm_jax.convert` never deletes what it did not write, checks its flags by name, and a
converted checkpoint whose bytes changed on disk is refused when read back."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import transformers

from tests.faults_cli import env, error_lines

LLM = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
           num_key_value_heads=1)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("hf") / "llama"
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLM)).save_pretrained(path)
    return path


def convert(*args) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "emollm_jax.convert", *map(str, args)]
    return subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=600)


def _tree(path):
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def _refused(proc, *named):
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    for text in named:
        assert text in last, last
    return last


def test_out_holding_user_files_is_never_replaced(tmp_path, hf_dir):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("three weeks of notes")
    for extra in ([], ["--overwrite"]):
        _refused(convert("--hf_dir", hf_dir, "--out", out, *extra), "--out", str(out))
        assert _tree(out) == {"notes.txt": b"three weeks of notes"}
    assert "--overwrite" in _refused(convert("--hf_dir", hf_dir, "--out", out), "not empty")
    assert "not written by emollm_jax" in _refused(convert("--hf_dir", hf_dir, "--out", out, "--overwrite"))


@pytest.mark.parametrize("where", ["same", "inside", "parent"])
def test_out_overlapping_the_source_is_refused(tmp_path, hf_dir, where):
    src = tmp_path / "models" / "llama"
    src.parent.mkdir()
    subprocess.run(["cp", "-r", str(hf_dir), str(src)], check=True)
    before = _tree(src.parent)
    out = {"same": src, "inside": src / "jax", "parent": src.parent}[where]
    for flags in (["--hf_dir", src, "--out", out], ["--hf_dir", src, "--out", out, "--overwrite", "--to_hf"]):
        _refused(convert(*flags), "--out", "source")
    assert _tree(src.parent) == before


def test_overwrite_replaces_only_what_the_tool_wrote(tmp_path, hf_dir):
    out = tmp_path / "ckpt"
    assert convert("--hf_dir", hf_dir, "--out", out).returncode == 0
    marker = json.loads((out / ".emollm_jax_output").read_text())
    assert marker["written_by"] == "emollm_jax.convert.save_params" and marker["source"] == str(hf_dir)
    _refused(convert("--hf_dir", hf_dir, "--out", out), "not empty", "--overwrite")
    proc = convert("--hf_dir", hf_dir, "--out", out, "--overwrite", "--dtype", "bfloat16")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((out / "convert.json").read_text())["dtype"] == "bfloat16"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp or old dirs left


def test_python_api_refuses_existing_output_unless_overwrite(tmp_path, hf_dir):
    from emollm_jax.convert import load_hf, save_hf
    from emollm_jax.convert.orbax_params import save_params
    from emollm_jax.outdir import OutputDirError

    model = load_hf(hf_dir)
    user = tmp_path / "user"
    user.mkdir()
    (user / "keep.txt").write_text("x")
    writers = {"hf": lambda p, **kw: save_hf(model, p, **kw),
               "orbax": lambda p, **kw: save_params(model, p, family="llama", hf_config={}, **kw)}
    for name, write in writers.items():
        with pytest.raises(OutputDirError, match="overwrite=True"):
            write(user)
        with pytest.raises(OutputDirError, match="not written by emollm_jax"):
            write(user, overwrite=True)
        assert _tree(user) == {"keep.txt": b"x"}
        ours = tmp_path / name
        write(ours)
        with pytest.raises(OutputDirError, match="not empty"):
            write(ours)
        write(ours, overwrite=True)


def test_dtype_is_checked_by_name(tmp_path, hf_dir):
    out = tmp_path / "out"
    line = _refused(convert("--hf_dir", hf_dir, "--out", out, "--dtype", "abc"), "--dtype abc", "not a dtype")
    assert "float32, bfloat16, float16" in line
    proc = convert("--hf_dir", hf_dir, "--out", out, "--dtype", "float64")
    _refused(proc, "--dtype float64", "not supported")
    _refused(convert("--hf_dir", hf_dir, "--out", out, "--to_hf", "--dtype", "float8_e4m3fn"), "--allow_fp8")
    proc = convert("--hf_dir", hf_dir, "--out", out, "--dtype", "float8_e4m3fn", "--allow_fp8")
    _refused(proc, "--to_hf --allow_fp8")
    _refused(convert("--hf_dir", tmp_path / "missing", "--out", out), "--hf_dir", "no such directory")
    _refused(convert("--hf_dir", hf_dir, "--out", out, "--to_hf", "--max_shard_gb", "0"), "--max_shard_gb")
    assert not out.exists()
    proc = convert("--hf_dir", hf_dir, "--out", out, "--to_hf", "--dtype", "float8_e4m3fn", "--allow_fp8")
    assert proc.returncode == 0, proc.stderr[-3000:]
    raw = (out / "model.safetensors").read_bytes()  # the header: 8-byte length, then JSON
    header = json.loads(raw[8:8 + int.from_bytes(raw[:8], "little")])
    assert {v["dtype"] for k, v in header.items() if k != "__metadata__"} == {"F8_E4M3"}


def _largest_data_file(params_dir):
    return max((p for p in params_dir.rglob("d/*") if p.is_file()), key=lambda p: p.stat().st_size)


def test_converted_checkpoint_with_changed_bytes_is_refused(tmp_path, hf_dir):
    from emollm_jax.checkpoint import CheckpointDamaged, restore_params
    from emollm_jax.convert.orbax_params import load_params

    ckpt = tmp_path / "ckpt"
    assert convert("--hf_dir", hf_dir, "--out", ckpt).returncode == 0
    model = load_params(ckpt)  # intact: reads and verifies
    f = _largest_data_file(ckpt / "params")
    data = bytearray(f.read_bytes())
    data[len(data) // 2: len(data) // 2 + 16] = b"\x7f" * 16
    f.write_bytes(bytes(data))
    proc = convert("--ckpt", ckpt, "--out", tmp_path / "hf", "--to_hf")
    assert proc.returncode == 1, proc.stderr[-3000:]
    (line,) = error_lines(proc.stderr)
    assert "damaged" in line and str(ckpt / "params") in line and "checksum" in line
    assert not (tmp_path / "hf").exists()
    # The training side reads the same directory (config.init.hf / init.params) through restore_params.
    from flax import nnx

    with pytest.raises(CheckpointDamaged, match="does not match its checksum"):
        restore_params(ckpt, nnx.to_pure_dict(nnx.state(model, nnx.Param)), None)


def test_non_finite_weights_are_not_written(tmp_path, hf_dir):
    from emollm_jax.convert import load_hf
    from emollm_jax.convert.orbax_params import save_params
    from emollm_jax.convert.safetensors_io import CheckpointError

    model = load_hf(hf_dir)
    model.model.norm.weight.value = model.model.norm.weight.value.at[0].set(np.inf)
    with pytest.raises(CheckpointError, match="NaN or inf"):
        save_params(model, tmp_path / "bad", family="llama", hf_config={})
    assert not (tmp_path / "bad").exists()

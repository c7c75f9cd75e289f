"""Benchmark results as one JSON file (`--json OUT` of every script in benchmarks/), so runs can be compared
across commits and machines.

The file holds the script's name, its command line and arguments, the machine (CPU count and model, load
average, the JAX backend the measuring processes used, package versions, the git commit), every measured
figure with its unit, and each ratio against the peer the script names:

    {"schema": 1, "script": "bench_generate", "command": "python benchmarks/bench_generate.py ...",
     "args": {...}, "time": "...", "machine": {...}, "config": {...},
     "figures": {"jax.b1.tokens_per_s": {"value": 131.0, "unit": "tok/s"}, ...},
     "ratios": {"decode_b1": {"value": 2.47, "ours": "jax.b1.tokens_per_s", "peer": "torch.b1.tokens_per_s",
                              "peer_name": "HF generate", "meaning": "ours / peer (rates): > 1 ..."}},
     "details": {...}}

A ratio is computed from two figures of the same unit so that > 1 always means ours is ahead: peer / ours
for times, ours / peer for rates and bandwidths. The file is written atomically (`data_pipeline.storage`: a
temp file renamed into place, or one upload when OUT is an object-store URL).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import shlex
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # runnable from a checkout without installing
    sys.path.insert(0, str(ROOT))

from data_pipeline.storage import atomic_write  # noqa: E402

SCHEMA = 1
TIME_UNITS = ("s", "ms", "us")  # lower is better; every other unit (tok/s, samples/s, GB/s, ...) higher
PACKAGES = ("jax", "jaxlib", "flax", "numpy", "torch", "transformers", "grain")
_PROBE = ("import json, jax; d = jax.devices(); print(json.dumps({'backend': jax.default_backend(), "
          "'device_kind': d[0].device_kind, 'device_count': len(d)}))")


def add_json_argument(parser: argparse.ArgumentParser) -> None:
    """The `--json OUT` option every benchmark script takes."""
    parser.add_argument("--json", metavar="OUT",
                        help="also write the figures, ratios, command line and machine to this JSON file")


class Results:
    """The figures and ratios of one benchmark run; `write` puts them in a JSON file with the machine."""

    def __init__(self, script: str, config: Mapping[str, Any] | None = None):
        self.script = Path(script).stem
        self.config = dict(config or {})
        self.figures: dict[str, dict[str, Any]] = {}
        self.ratios: dict[str, dict[str, Any]] = {}
        self.details: dict[str, Any] = {}  # other facts of the run worth keeping (shapes compiled, ...)

    def figure(self, name: str, value: float, unit: str, note: str | None = None) -> float:
        """Records one measured figure (its unit: s, ms, us, tok/s, samples/s, GB/s, fraction, ...)."""
        if name in self.figures:
            raise ValueError(f"figure {name!r} recorded twice")
        self.figures[name] = {"value": float(value), "unit": unit, **({"note": note} if note else {})}
        return float(value)

    def ratio(self, name: str, ours: str, peer: str, peer_name: str) -> float:
        """Ours against the peer from two recorded figures of one unit: > 1 means ours is ahead (faster,
        higher throughput); peer_name says what the peer is."""
        for figure in (ours, peer):
            if figure not in self.figures:
                raise KeyError(f"ratio {name!r}: no figure {figure!r} recorded (have {sorted(self.figures)})")
        a, b = self.figures[ours], self.figures[peer]
        if a["unit"] != b["unit"]:
            raise ValueError(f"ratio {name!r}: {ours!r} is in {a['unit']}, {peer!r} in {b['unit']}")
        lower_better = a["unit"] in TIME_UNITS
        value = b["value"] / a["value"] if lower_better else a["value"] / b["value"]
        meaning = "peer / ours (times)" if lower_better else "ours / peer (rates)"
        self.ratios[name] = {"value": value, "ours": ours, "peer": peer, "peer_name": peer_name,
                             "meaning": f"{meaning}: > 1 means ours is ahead"}
        return value

    def as_dict(self, args: argparse.Namespace | Mapping[str, Any] | None = None,
                machine_facts: Mapping[str, Any] | None = None) -> dict[str, Any]:
        args = vars(args) if isinstance(args, argparse.Namespace) else dict(args or {})
        args = {k: v for k, v in args.items() if v is not None}  # not given (a worker's hidden options)
        return {
            "schema": SCHEMA,
            "script": self.script,
            "command": shlex.join(["python", *sys.argv]),
            "args": args,
            "time": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "machine": dict(machine_facts if machine_facts is not None else machine()),
            "config": self.config,
            "figures": self.figures,
            "ratios": self.ratios,
            "details": self.details,
        }

    def write(self, path: str | os.PathLike, args: argparse.Namespace | Mapping[str, Any] | None = None,
              env: Mapping[str, str] | None = None) -> dict[str, Any]:
        """Writes the JSON file atomically; `env` is the environment the measuring processes ran with (the
        JAX backend is probed under it). Returns what was written."""
        report = self.as_dict(args, machine(env))
        text = json.dumps(report, indent=2, allow_nan=False, default=str) + "\n"  # paths as text
        atomic_write(path, lambda f: f.write(text))
        return report


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit() -> dict[str, Any] | None:
    try:
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return {"commit": head, "dirty": bool(dirty)}


def machine(env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Facts about the machine and software a figure depends on; the JAX backend is probed in a subprocess
    with `env` (the measuring processes' environment), so the parent never starts a backend of its own."""
    env = dict(os.environ if env is None else env)
    probe = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True)
    jax_facts = json.loads(probe.stdout.strip().splitlines()[-1]) if probe.returncode == 0 else {
        "backend": None, "probe_error": probe.stderr.strip().splitlines()[-1:]}
    return {
        "cpu_count": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "load_average": list(os.getloadavg()),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "jax_backend": jax_facts.pop("backend"),
        **{f"jax_{k}": v for k, v in jax_facts.items()},
        "env": {k: env[k] for k in ("JAX_PLATFORMS", "XLA_FLAGS") if k in env},
        "versions": {p: _version(p) for p in PACKAGES},
        "git": _git_commit(),
    }

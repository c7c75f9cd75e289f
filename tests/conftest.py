"""Test set-up: 8 fake CPU devices for sharding tests, absl flags parsed for grain workers, and one XLA
compilation cache for the session's processes (the CLI tests start many that compile the same tiny programs;
a hit loads the executable XLA would build again)."""

import os
import tempfile
from pathlib import Path

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      str(Path(tempfile.gettempdir()) / f"emollm_jax-tests-xla-cache-{os.getuid()}"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(4 << 30))  # bounded, and writes take a file lock

from absl import flags  # noqa: E402

flags.FLAGS.mark_as_parsed()


def pytest_collection_modifyitems(config, items):
    """Longest test files first. `pytest -n 2 --dist loadfile` hands whole files to the two workers in
    collection order (pyproject sets `--no-loadscope-reorder`, which would otherwise put files with many
    quick tests first): a multi-minute file collected last would run alone at the end. A file weighs the
    `minutes` of its slow tests' markers (`@pytest.mark.slow(minutes=12)`; 1 when not given)."""
    weight: dict = {}
    for item in items:
        mark = item.get_closest_marker("slow")
        if mark is not None:
            weight[item.path] = weight.get(item.path, 0) + mark.kwargs.get("minutes", 1)
    items.sort(key=lambda item: -weight.get(item.path, 0))  # stable: each file's tests keep their order

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

"""A made-up object store for the tests: `emotest://bucket/key` is the file `<root>/bucket/key`, where
`<root>` is `$EMOLLM_TEST_STORE`. It is reached the way `gs://` is: an `etils.epath` path class over an fsspec
filesystem (epath's own fsspec backend), and fsspec's `pipe_file(mode="create")` is an exclusive create, as
gcsfs's `ifGenerationMatch=0` is. TensorStore has no driver for a made-up scheme, so orbax's kvstore spec is
pointed at the store's directory, as orbax points `gs://` at TensorStore's gcs driver.

`install()` registers it in this process; `python -m tests.objstore MODULE ARGS...` registers it and runs
`python -m MODULE ARGS...`, so a command-line run reaches it through the code a user's run goes through.
"""

from __future__ import annotations

import os
import runpy
import sys

SCHEME = "emotest"
PREFIX = f"{SCHEME}://"
ROOT_ENV = "EMOLLM_TEST_STORE"


def local_of(url: str) -> str:
    """The file behind `url` (for the test's own inspection)."""
    return os.path.join(os.environ[ROOT_ENV], url.removeprefix(PREFIX))


def install() -> None:
    """Registers the scheme with fsspec, etils.epath and orbax (idempotent)."""
    import fsspec
    from etils import epath
    from etils.epath import backend as backend_lib
    from etils.epath import gpath, register
    from fsspec.implementations.dirfs import DirFileSystem
    from fsspec.implementations.local import LocalFileSystem

    if PREFIX in register._URI_PREFIXES_TO_CLS:
        return

    class StoreFileSystem(DirFileSystem):
        protocol = SCHEME
        cachable = False  # the root is read from the environment each time (a test may move it)

        def __init__(self, *args, **kwargs):
            # auto_mkdir: nothing has to make directories first, as in a bucket
            super().__init__(path=os.environ[ROOT_ENV], fs=LocalFileSystem(auto_mkdir=True))

        @classmethod
        def _strip_protocol(cls, path):
            path = path if isinstance(path, str) else os.fspath(path)
            return path.removeprefix(PREFIX).rstrip("/")

        def pipe_file(self, path, value, mode="overwrite", **kwargs):
            if mode != "create":
                return super().pipe_file(path, value, **kwargs)
            full = self._join(path)
            os.makedirs(os.path.dirname(full), exist_ok=True)
            fd = os.open(full, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)  # the store's precondition
            with os.fdopen(fd, "wb") as f:
                f.write(value)
            return None

    fsspec.register_implementation(SCHEME, StoreFileSystem, clobber=True)

    class _Backend(backend_lib._FileSystemSpecBackend):
        def fs(self, path):
            return fsspec.filesystem(SCHEME)

    store_backend = _Backend()

    def _mapped(parts):
        full = "/".join(os.fspath(p) for p in parts)
        return (full.replace(PREFIX, f"/{SCHEME}/", 1),) if full.startswith(PREFIX) else parts

    @register.register_path_cls(PREFIX)
    class StorePath(gpath.PosixGPath):
        if sys.version_info < (3, 12):
            def __new__(cls, *parts):
                return super().__new__(cls, *_mapped(parts))
        else:
            def __init__(self, *parts):
                super().__init__(*_mapped(parts))

        @property
        def _uri_scheme(self):
            if len(self.parts) >= 2 and self.parts[0] == "/" and self.parts[1] == SCHEME:
                return SCHEME
            return None

        @property
        def _backend(self):
            return store_backend if self._uri_scheme == SCHEME else backend_lib.os_backend

    assert isinstance(epath.Path(PREFIX + "b/x"), StorePath)
    _point_orbax_at_the_store()


def _point_orbax_at_the_store() -> None:
    from orbax.checkpoint._src.serialization import tensorstore_utils as ts_utils

    def translated(build):
        def build_for_store(directory, *args, **kwargs):
            directory = os.fspath(directory)
            for prefix in (PREFIX, f"{SCHEME}:/"):  # as given, and after orbax's os.path.normpath
                if directory.startswith(prefix):
                    directory = local_of(PREFIX + directory.removeprefix(prefix))
            return build(directory, *args, **kwargs)
        return build_for_store

    ts_utils._build_ocdbt_kvstore_tspec = translated(ts_utils._build_ocdbt_kvstore_tspec)
    ts_utils._build_non_ocdbt_kvstore_tspec = translated(ts_utils._build_non_ocdbt_kvstore_tspec)


if __name__ == "__main__":
    install()
    module, sys.argv = sys.argv[1], sys.argv[1:]
    runpy.run_module(module, run_name="__main__", alter_sys=True)

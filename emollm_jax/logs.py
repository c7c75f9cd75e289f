"""Where a run's log records go: a console a person can read, and a log file with everything.

The console (stderr, written through tqdm so progress bars stay whole) shows this project's own INFO lines
(the run, each stage, each checkpoint, the results), and every WARNING and ERROR from anyone. Everything at
INFO and above, third-party libraries included (orbax, absl, grain, jax), goes to `<workdir>/run.log`
(`run.process_<i>.log` for process i > 0 of a multi-process run). `--verbosity=1` also sends third-party INFO
to the console; `--verbosity=2` and above log DEBUG too. Processes other than 0 show only warnings and errors.

A record logged with `extra=FILE_ONLY` (details such as compile times) goes to the file only. In a workdir on
an object store the log is written to a local copy uploaded whole every 30 s and at exit
(`data_pipeline.storage.Mirror`).
"""

from __future__ import annotations

import logging
import os
import sys

from data_pipeline import storage

FILE_ONLY = {"file_only": True}
OWN_LOGGERS = ("emollm_jax", "data_pipeline")
LOG_FILE = "run.log"
_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class _ConsoleFilter(logging.Filter):
    """WARNING and above from anyone; INFO from this project (or from anyone, when `everything`)."""

    def __init__(self, everything: bool):
        super().__init__()
        self.everything = everything

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.WARNING:
            return True
        if self.everything:
            return True
        own = record.name.split(".")[0] in OWN_LOGGERS
        return own and not getattr(record, "file_only", False)


class _ConsoleFormatter(logging.Formatter):
    """`HH:MM:SS message` for INFO; the level and logger name too for anything else."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.exc_info:
            message += "\n" + self.formatException(record.exc_info)
        stamp = self.formatTime(record, "%H:%M:%S")
        if record.levelno == logging.INFO:
            return f"{stamp} {message}"
        return f"{stamp} {record.levelname} {record.name}: {message}"


class _TqdmHandler(logging.Handler):
    """Writes records above the progress bars instead of through them."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm.auto import tqdm

            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # noqa: BLE001  (logging must never raise)
            self.handleError(record)


_OURS: list[logging.Handler] = []


def configure(verbosity: int = 0, process_index: int = 0) -> None:
    """The console half: replaces absl's handler (which prints every library's INFO) with the console above.
    Call once the process index is known; `add_file` adds the log file once the workdir exists."""
    from absl import logging as absl_logging

    root = logging.getLogger()
    root.removeHandler(absl_logging.get_absl_handler())
    for handler in _OURS:
        root.removeHandler(handler)
    _OURS.clear()
    root.setLevel(logging.DEBUG if verbosity >= 2 else logging.INFO)
    console = _TqdmHandler()
    console.setFormatter(_ConsoleFormatter())
    console.addFilter(_ConsoleFilter(everything=verbosity >= 1))
    if process_index != 0:
        console.setLevel(logging.WARNING)
    root.addHandler(console)
    _OURS.append(console)


class _MirroredFileHandler(logging.FileHandler):
    """A FileHandler on a `storage.Mirror`'s local copy, uploading it as records come and when closed."""

    def __init__(self, mirror: storage.Mirror):
        super().__init__(mirror.local, mode="a", encoding="utf-8")
        self.mirror = mirror

    def flush(self) -> None:
        super().flush()
        try:
            self.mirror.push()
        except Exception:  # noqa: BLE001  (logging must never raise; the next push retries)
            pass

    def close(self) -> None:
        super().close()
        self.mirror.close()


def add_file(workdir: str | os.PathLike, process_index: int = 0) -> str:
    """Appends every record at the root's level to the run's log file in `workdir` (a local path or a URL);
    returns its path."""
    name = LOG_FILE if process_index == 0 else f"run.process_{process_index}.log"
    path = storage.join(workdir, name)
    mirror = storage.Mirror(path)
    handler = _MirroredFileHandler(mirror) if mirror.remote else logging.FileHandler(path, mode="a",
                                                                                      encoding="utf-8")
    handler.setFormatter(logging.Formatter(_FORMAT))
    logging.getLogger().addHandler(handler)
    _OURS.append(handler)
    return path

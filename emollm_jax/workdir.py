"""The workdir lock: one run at a time writes a workdir.

`<workdir>/run.lock` holds JSON naming its holder (host, pid, the process's start time, mode, since when, a
random nonce). It is created atomically: the complete file is written under a private name and hard-linked
into place, so it exists whole or not at all, and of two starters exactly one link succeeds. A run that
finds it is refused at once, naming the holder.

A lock is stale, and is taken over, when its holder
- ran on this host and that process is gone (no such pid, or the pid now belongs to a process started at
  another time);
- ran on another host and its heartbeat is older than `STALE_AFTER_S` (5 minutes): the holder touches the
  file every `HEARTBEAT_S` (30 s) from a background thread, since hosts cannot see each other's processes.
  On a shared filesystem a run on another host that hangs keeps its heartbeat and its lock.
Taking over is free of races: a starter that judges a lock stale first creates
`run.lock.<nonce>.takeover` exclusively, re-reads the lock and removes it only if it is still the one judged
stale (same nonce); then it goes through the atomic create like any starter. A takeover file left by a
starter killed in those few milliseconds is not guessed at: the error says which files to remove.

Multi-host runs: process 0 takes the lock for the whole run; every process learns the outcome at a barrier,
so all refuse together.

A workdir on an object store (`gs://bucket/run`) has the same lock, built from what a store offers
(`data_pipeline.storage`): the lock and takeover objects are created with an if-not-exists precondition
(GCS `ifGenerationMatch=0`, S3 `If-None-Match`), so of two starters exactly one creates each; the heartbeat
uploads the lock again (after checking it still names this holder) and its age is the object's update time
as the store reports it. Without a precondition (epath over TensorFlow's gfile, no fsspec implementation
for the scheme) the create is check-then-write with a read-back, which refuses a second run started
seconds later but not one started within the same second.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import os
import secrets
import socket
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from data_pipeline import storage

log = logging.getLogger(__name__)

LOCK_NAME = "run.lock"
HEARTBEAT_S = 30.0
STALE_AFTER_S = 300.0


class WorkdirBusy(RuntimeError):
    """Another run holds the workdir (the message names it and says what to do)."""


@dataclasses.dataclass(frozen=True)
class Holder:
    """Who holds a lock. `started` is the process's start time as the OS counts it ("" where unknown), so a
    pid reused by a later process is not taken for the holder."""

    host: str
    pid: int
    started: str
    mode: str
    since: str
    nonce: str

    @classmethod
    def me(cls, mode: str) -> Holder:
        since = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
        return cls(socket.gethostname(), os.getpid(), _process_start(os.getpid()) or "", mode, since,
                   secrets.token_hex(8))

    def describe(self) -> str:
        return f"pid {self.pid} on host {self.host} (mode {self.mode}, since {self.since})"


def _process_start(pid: int) -> str | None:
    """Start time of `pid` in clock ticks since boot (Linux /proc; None elsewhere or when gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22; fields after the command name start at 3


def _running_here(holder: Holder) -> bool:
    try:
        os.kill(holder.pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process: it exists
    start = _process_start(holder.pid)
    return start is None or not holder.started or start == holder.started


def _read(path: Any) -> tuple[Holder | None, float]:
    """(holder, seconds since its last heartbeat); (None, 0) when there is no lock any more."""
    try:
        text, mtime = path.read_text(), storage.mtime(path)
    except FileNotFoundError:
        return None, 0.0
    age = time.time() - mtime
    try:
        return Holder(**json.loads(text)), age
    except (json.JSONDecodeError, TypeError):  # not ours or damaged: judged by its age alone
        return Holder(host="?", pid=-1, started="", mode="?", since="?", nonce=f"unreadable-{mtime}"), age


def _stale(holder: Holder, age: float) -> str | None:
    """Why `holder`'s lock is stale, or None when it must be respected."""
    if holder.host == socket.gethostname():
        return None if _running_here(holder) else f"process {holder.pid} is not running"
    if age > STALE_AFTER_S:
        return f"no heartbeat for {age:.0f} s (> {STALE_AFTER_S:.0f} s)"
    return None


def _create(path: Any, holder: Holder) -> bool:
    """Atomically creates the lock naming `holder` (whole or not at all); False if one exists."""
    return storage.create_exclusive(path, (json.dumps(dataclasses.asdict(holder)) + "\n").encode())


def _take_over(path: Any, stale: Holder, why: str) -> None:
    """Removes the lock `stale` if it is still in place, racing safely with other starters (module doc)."""
    claim = path.with_name(f"{path.name}.{stale.nonce}.takeover")
    if not storage.create_exclusive(claim, b""):
        try:
            claim_age = time.time() - storage.mtime(claim)
        except FileNotFoundError:
            return  # that takeover just finished
        if claim_age > 10:
            raise WorkdirBusy(f"{path}: a takeover of the stale lock of {stale.describe()} was interrupted; "
                              f"if no run uses this workdir, remove {path} and {claim}") from None
        time.sleep(0.05)  # another starter is taking it over right now
        return
    try:
        current, _ = _read(path)
        if current is not None and current.nonce == stale.nonce:
            path.unlink()
            log.warning("%s: took over the stale lock of %s: %s", path, stale.describe(), why)
    finally:
        claim.unlink(missing_ok=True)


class WorkdirLock:
    """A held lock: heartbeats until `release()` (also as a context manager)."""

    def __init__(self, path: Any, holder: Holder):
        self.path, self.holder = path, holder
        self._stop = threading.Event()
        self._beat = threading.Thread(target=self._heartbeat, name="workdir-lock-heartbeat", daemon=True)
        self._beat.start()

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                if storage.is_remote(self.path):  # an upload: never over a lock another run took over
                    current, _ = _read(self.path)
                    if current is None or current.nonce != self.holder.nonce:
                        continue
                storage.touch(self.path)
            except Exception:  # noqa: BLE001  (a failed beat is retried at the next one)
                pass

    def release(self) -> None:
        self._stop.set()
        current, _ = _read(self.path)
        if current is not None and current.nonce == self.holder.nonce:
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> WorkdirLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class _NotHeld:
    """What processes other than 0 hold in a multi-host run: nothing to release."""

    def release(self) -> None:
        pass


def acquire(workdir: str | os.PathLike, mode: str) -> WorkdirLock:
    """Takes `<workdir>/run.lock` for this process, taking over a stale one; `WorkdirBusy` if a live run
    holds it. `workdir` must exist."""
    path = storage.path(storage.absolute(workdir)) / LOCK_NAME
    me = Holder.me(mode)
    for _ in range(20):
        if _create(path, me):
            return WorkdirLock(path, me)
        other, age = _read(path)
        if other is None:
            continue  # released meanwhile
        why = _stale(other, age)
        if why is None:
            raise WorkdirBusy(f"{path.parent}: in use by {other.describe()}; wait for it to finish or use "
                              f"another --workdir (if that run is gone, remove {path})")
        _take_over(path, other, why)
    raise WorkdirBusy(f"{path}: could not take the lock: other runs are starting in this workdir right now")


def lock_run(workdir: str | os.PathLike, mode: str, process_index: int = 0,
             process_count: int = 1) -> WorkdirLock | _NotHeld:
    """The lock for a run of `process_count` processes: process 0 takes it; all raise `WorkdirBusy` together
    when it could not (every process must call this at the same point)."""
    held: WorkdirLock | _NotHeld = _NotHeld()
    error = None
    if process_index == 0:
        try:
            held = acquire(workdir, mode)
        except WorkdirBusy as e:
            error = e
    if process_count > 1:
        from jax.experimental import multihost_utils

        ok = int(multihost_utils.broadcast_one_to_all(np.int32(error is None)))
        if not ok and error is None:
            error = WorkdirBusy(f"{workdir}: in use by another run (process 0 names it)")
    if error is not None:
        raise error
    return held

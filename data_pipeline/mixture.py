"""Which records a stream reads, and in what proportions.

A stream (a training stage, an evaluation split) reads the records of its sources whose task it wants. Before
anything is read for training, `select` goes once over every source's index (task, id, place of each record):

- a record that cannot be parsed, has no task or an unknown one, or uses an id seen before in the stream is
  charged to the error budget, named by its own file and line (every stream reading the source reports it);
- with upfront validation, so is every record of a wanted task that fails the schema checks;
- the rest, of a wanted task, are the stream's records, in source order.

`parts` then groups them for mixing. Without weights the stream is their concatenation: every record once per
epoch, so tasks and sources keep their natural proportions. Source weights give each source a share of the
samples, task weights each task a share; with both, a source's share is split among its tasks by the task
weights. Parts are `Picked`: random access over (source, record) pairs, which is all Grain needs.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from data_pipeline.records import TASKS, ErrorBudget, FirstSeen


@dataclasses.dataclass
class Picks:
    """The records a stream reads: `pairs` int64[N, 2] of (source number, record index), in source order, and
    the task of each."""

    sources: list[Any]
    pairs: np.ndarray
    tasks: list[str]

    def __len__(self) -> int:
        return len(self.tasks)

    def where(self, source: int | None = None, task: str | None = None) -> np.ndarray:
        """Row numbers of the picks of `source` and/or `task`, in order."""
        keep = np.ones(len(self), bool)
        if source is not None:
            keep &= self.pairs[:, 0] == source
        if task is not None:
            keep &= self._task_array == task
        return np.flatnonzero(keep)

    @functools.cached_property
    def _task_array(self) -> np.ndarray:
        return np.asarray(self.tasks, dtype=str)


class Picked:
    """Random access to some picks: element k is the k-th picked record's `Example` (see `sources`), with its
    source's media root under "root". Picklable (Grain workers get a copy)."""

    def __init__(self, picks: Picks, rows: np.ndarray | None = None):
        self.sources = picks.sources
        self.pairs = picks.pairs if rows is None else picks.pairs[rows]

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, k: int) -> dict[str, Any]:
        source, index = self.pairs[k]
        src = self.sources[int(source)]
        return {**src[int(index)], "root": src.data_root}


def _index_problems(src: Any, i: int, entry: Any, validate: str) -> list:
    """The problems of a record the index could not give a known task: its parse errors, or the schema
    check's verdict (which names a missing or unknown task); [] when validation is off."""
    if entry.errors:
        return list(entry.errors)
    return [] if validate == "none" else src.problems(i)


def select(sources: Sequence[Any], *, tasks: Sequence[str] | None, validate: str, budget: ErrorBudget,
           max_per_task: int = 0) -> Picks:
    """The stream's records (see the module docstring). `tasks` None: every task. `max_per_task` > 0 keeps
    the first ceil(max_per_task / tasks present) records of each task (a quick evaluation that still covers
    every task). Raises `ErrorBudgetExceeded` past the budget and ValueError when nothing is left."""
    seen = FirstSeen()
    pairs: list[tuple[int, int]] = []
    picked_tasks: list[str] = []
    for s, src in enumerate(sources):
        invalid = src.invalid() if validate == "upfront" else {}
        for i, entry in enumerate(src.index()):
            if entry.task not in TASKS:
                problems = invalid.get(i) or _index_problems(src, i, entry, validate)
                if problems:
                    budget.skip(problems)
                    continue
            if tasks is not None and entry.task not in tasks:
                continue
            duplicate = seen.check(entry.id, entry.source, entry.line) if validate != "none" else None
            if duplicate or i in invalid:
                budget.skip([duplicate] if duplicate else invalid[i])
                continue
            pairs.append((s, i))
            picked_tasks.append(entry.task)
    if not pairs:
        names = ", ".join(getattr(src, "name", "?") for src in sources)
        wanted = f" of tasks {list(tasks)}" if tasks is not None else ""
        raise ValueError(f"{names}: no valid record{wanted}")
    picks = Picks(list(sources), np.asarray(pairs, np.int64).reshape(-1, 2), picked_tasks)
    return _first_per_task(picks, max_per_task) if max_per_task > 0 else picks


def _first_per_task(picks: Picks, max_examples: int) -> Picks:
    per_task = math.ceil(max_examples / len(set(picks.tasks)))
    count: collections.Counter[str] = collections.Counter()
    rows = []
    for k, task in enumerate(picks.tasks):
        count[task] += 1
        if count[task] <= per_task:
            rows.append(k)
    return Picks(picks.sources, picks.pairs[rows], [picks.tasks[k] for k in rows])


def parts(picks: Picks, *, source_weights: Sequence[float] | None, tasks: Sequence[str] | None,
          task_weights: Sequence[float] | None) -> tuple[list[Picked], list[float] | None]:
    """(parts, mixing weights or None for a single part): see the module docstring. A weighted task with no
    record is a ValueError naming it; a weighted source without records of the stream's tasks drops out."""
    if task_weights is not None:
        missing = [t for t in tasks if not len(picks.where(task=t))]
        if missing:
            raise ValueError(f"task weights name {missing}, but the sources hold no valid record of them")
    if source_weights is None and task_weights is None:
        return [Picked(picks)], None
    groups = [(s, None) for s in range(len(picks.sources))] if task_weights is None else (
        [(None, t) for t in tasks] if source_weights is None
        else [(s, t) for s in range(len(picks.sources)) for t in tasks])
    share = _group_shares(picks, source_weights, tasks, task_weights)
    out = [(Picked(picks, picks.where(s, t)), share[(s, t)]) for s, t in groups if share.get((s, t), 0) > 0]
    return [p for p, _ in out], [w for _, w in out]


def _group_shares(picks: Picks, source_weights, tasks, task_weights) -> dict[tuple, float]:
    """(source or None, task or None) -> share of the samples, summing to 1."""
    raw: dict[tuple, float] = {}
    if task_weights is None:
        for s, w in enumerate(source_weights):
            if len(picks.where(source=s)):
                raw[(s, None)] = float(w)
    elif source_weights is None:
        raw = {(None, t): float(w) for t, w in zip(tasks, task_weights, strict=True)}
    else:
        for s, ws in enumerate(source_weights):
            present = {t: float(w) for t, w in zip(tasks, task_weights, strict=True)
                       if len(picks.where(s, t))}
            for t, wt in present.items():
                raw[(s, t)] = float(ws) * wt / sum(present.values())
    total = sum(raw.values())
    return {k: v / total for k, v in raw.items()}


def task_shares(picks: Picks, *, source_weights: Sequence[float] | None, tasks: Sequence[str] | None,
                task_weights: Sequence[float] | None) -> dict[str, float]:
    """The expected share of each task among the stream's samples, in `TASKS` order."""
    present = [t for t in TASKS if t in set(picks.tasks)]
    if source_weights is None and task_weights is None:
        counts = collections.Counter(picks.tasks)
        return {t: counts[t] / len(picks) for t in present}
    shares: collections.Counter[str] = collections.Counter()
    for (s, t), share in _group_shares(picks, source_weights, tasks, task_weights).items():
        if t is not None:
            shares[t] += share
            continue
        rows = picks.where(source=s)
        for task, n in collections.Counter(picks.tasks[r] for r in rows).items():
            shares[task] += share * n / len(rows)
    return {t: shares[t] for t in present if shares[t] > 0}

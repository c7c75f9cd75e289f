"""HF <-> ours key tables: rows of `(hf_pattern, our_pattern, hook)` with per-key hooks.

Parts declare their tables as plain rows (`PartConfig.hf_key_table()`, hook given by name); this module
turns rows into a `KeyMap` that maps names both ways. `{i}` in a pattern stands for a layer index and must
appear on both sides; our patterns are dotted paths into the model's `nnx.State` (integers are list indices).
A row whose hook is "ignore" names an HF key skipped on purpose (an old buffer, a redundant tied head).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from emollm_jax.models.layers import resample_posemb


@dataclasses.dataclass(frozen=True)
class Hook:
    """`load(hf_array, target_shape) -> ours`, `save(ours) -> hf_array`."""

    name: str
    load: Callable[[np.ndarray, tuple[int, ...]], np.ndarray]
    save: Callable[[np.ndarray], np.ndarray]

    def __repr__(self) -> str:
        return self.name


def _resample(x: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """A position table resampled to the target's patch grid (a tower run at another image size)."""
    if x.shape == shape or x.ndim != 2 or x.shape[1] != shape[1]:
        return x  # equal, or a mismatch fill_model reports
    prefix = 0 if math.isqrt(shape[0]) ** 2 == shape[0] else 1
    return np.asarray(resample_posemb(x, math.isqrt(shape[0] - prefix)))


NONE = Hook("none", lambda x, shape: x, lambda x: x)
# torch Linear [out, in] <-> nnx.Linear [in, out]
TRANSPOSE = Hook("transpose", lambda x, shape: x.T, lambda x: x.T)
# torch Conv1d/Conv2d [O, I, *k] <-> nnx.Conv [*k, I, O]
CONV = Hook("conv", lambda x, shape: x.transpose(*range(2, x.ndim), 1, 0),
            lambda x: x.transpose(x.ndim - 1, x.ndim - 2, *range(x.ndim - 2)))
# position embeddings, bilinearly resampled to the configured image size on load
POSEMB = Hook("posemb", _resample, lambda x: x)
# an HF key skipped on purpose (no parameter of ours; never written back)
IGNORE = Hook("ignore", lambda x, shape: x, lambda x: x)
HOOKS: dict[str, Hook] = {h.name: h for h in (NONE, TRANSPOSE, CONV, POSEMB, IGNORE)}


def hook(name: str) -> Hook:
    try:
        return HOOKS[name]
    except KeyError:
        raise ValueError(f"unknown key-table hook {name!r}; known: {sorted(HOOKS)}") from None


@dataclasses.dataclass(frozen=True)
class Rule:
    hf: str
    ours: str
    hook: Hook = NONE

    def hf_regex(self) -> re.Pattern:
        return re.compile(re.escape(self.hf).replace(r"\{i\}", r"(?P<i>\d+)") + r"\Z")

    def ours_regex(self) -> re.Pattern:
        return re.compile(re.escape(self.ours).replace(r"\{i\}", r"(?P<i>\d+)") + r"\Z")


@dataclasses.dataclass(frozen=True)
class KeyMap:
    """HF <-> ours key table for one model in one layout. `ignore` lists regexes of HF keys deliberately
    not loaded."""

    rules: tuple[Rule, ...]
    ignore: tuple[str, ...] = ()

    @classmethod
    def table(cls, rows: Iterable[tuple[str, str, Any]], ignore: Iterable[str] = ()) -> KeyMap:
        """From rows `(hf, ours, hook)`, the hook a `Hook` or its name ("ignore": skip that HF key), and
        `ignore` regexes of HF keys to skip (e.g. a whole text half of a CLIPModel)."""
        rules = tuple(Rule(hf, ours, hook(h) if isinstance(h, str) else h) for hf, ours, h in rows)
        return cls(rules, tuple(ignore))

    def with_prefix(self, hf_prefix: str = "", ours_prefix: str = "") -> KeyMap:
        """The same table nested under prefixes (e.g. Llava: `language_model.` / `llm.`)."""
        rules = tuple(Rule(hf_prefix + r.hf, ours_prefix + r.ours, r.hook) for r in self.rules)
        ignore = tuple(re.escape(hf_prefix) + p for p in self.ignore)
        return KeyMap(rules, ignore)

    def rename_hf(self, rename: Callable[[str], str]) -> KeyMap:
        """The same table with each HF key (and ignore pattern's literal) passed through `rename`; for
        layouts that move a part's keys around (a Llava decoder's `model.` body under `language_model.`)."""
        if self.ignore:
            raise ValueError("rename_hf: a table with ignore regexes cannot be renamed; use 'ignore' rows")
        return KeyMap(tuple(Rule(rename(r.hf), r.ours, r.hook) for r in self.rules))

    def __add__(self, other: KeyMap) -> KeyMap:
        return KeyMap(self.rules + other.rules, self.ignore + other.ignore)

    def _compiled(self):
        if not hasattr(self, "_cache"):
            object.__setattr__(self, "_cache", [(r, r.hf_regex(), r.ours_regex()) for r in self.rules])
            object.__setattr__(self, "_ignore_re", [re.compile(p + r"\Z") for p in self.ignore])
        return self._cache

    def to_ours(self, hf_key: str) -> tuple[str, Hook] | None:
        """HF key -> (our dotted path, hook); None when ignored; KeyError when no rule matches."""
        for rule, hf_re, _ in self._compiled():
            m = hf_re.match(hf_key)
            if m:
                return None if rule.hook is IGNORE else (_fill(rule.ours, m), rule.hook)
        if any(p.match(hf_key) for p in self._ignore_re):
            return None
        raise KeyError(hf_key)

    def to_hf(self, our_key: str) -> tuple[str, Hook]:
        for rule, _, ours_re in self._compiled():
            m = ours_re.match(our_key) if rule.hook is not IGNORE else None
            if m:
                return _fill(rule.hf, m), rule.hook
        raise KeyError(our_key)


def _fill(pattern: str, m: re.Match) -> str:
    return pattern.replace("{i}", m.group("i")) if "i" in m.groupdict() else pattern


def find_prefix(keys: set[str], probe: str, candidates: Iterable[str]) -> str | None:
    """The first candidate prefix p with `p + probe` in keys (layout detection from key names)."""
    for p in candidates:
        if p + probe in keys:
            return p
    return None

"""Key paths of pytrees (params, optimizer states, nnx.State) as plain names: the one place that unwraps
jax's key entries (`DictKey.key`, `GetAttrKey.name`, `SequenceKey.idx`, ...)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import jax


def key_name(entry: Any) -> str | int:
    """One key-path entry -> its dict key, attribute name or sequence index (anything else: as is)."""
    for attr in ("key", "name", "idx"):
        if hasattr(entry, attr):
            return getattr(entry, attr)
    return entry


def path_keys(path: Iterable[Any], *, drop_value: bool = True) -> tuple[str | int, ...]:
    """A key path -> tuple of names; the trailing `.value` of an nnx Variable is dropped (`drop_value`)."""
    path = tuple(path)
    if drop_value and path and isinstance(path[-1], jax.tree_util.GetAttrKey) and path[-1].name == "value":
        path = path[:-1]
    return tuple(key_name(k) for k in path)


def path_str(path: Iterable[Any], sep: str = "/") -> str:
    """A key path -> "a/b/0" (or with another separator)."""
    return sep.join(str(k) for k in path_keys(path))


def flat_leaves(tree: Any, sep: str = "/") -> dict[str, Any]:
    """{path string: leaf} of every leaf of `tree`."""
    return {path_str(p, sep): leaf for p, leaf in jax.tree_util.tree_leaves_with_path(tree)}

"""Config files, overrides and typed config sections.

`load_config("configs/emobench.py:vicuna7b", ["stages.emotional.lr=1e-5"])` is the one way a config is made
(by `main`, the ablation driver, the benchmarks and the tests): the file's `get_config(variant)`, then
`apply_overrides`, which parses string values as `--config.a.b=value` flags are parsed and coerces them to the
type of the key they replace.

Each block of `config.*` is a frozen dataclass that checks its own fields (a `Section`, defined in the module
that reads the block).

A section's defaults are its dataclass defaults (config files start from `Section.defaults()` and change
what differs), and `Section.from_config(config.x, "x")` turns the ml_collections block back into the typed
object, refusing unknown keys and out-of-range values with one line that names the key:

    config.stages.emotional.lr=-1.0: must be positive

Range checks live in each section's `check()` (beside the fields); cross-field rules (mesh vs devices, batch
vs data parallelism) are `emollm_jax.run_config.validate_config`'s. This module imports no other module of the
project, so every module can define its section here without an import cycle.
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import importlib.util
import os
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import ml_collections
from ml_collections import config_dict

S = TypeVar("S", bound="Section")


class ConfigError(ValueError):
    """A config value that makes no sense; the message names the key (`config.a.b=value: why`)."""


class FieldError(ValueError):
    """Raised by `Section.fail`; `from_config` turns it into a `ConfigError` naming the config key."""

    def __init__(self, owner: str, field: str, value: Any, message: str):
        self.owner, self.field, self.value, self.message = owner, field, value, message
        super().__init__(f"{owner}.{field}={value!r}: {message}")


def _plain(value: Any) -> Any:
    """ConfigDict values -> plain Python (lists -> tuples, nested ConfigDicts -> dicts)."""
    if isinstance(value, ml_collections.ConfigDict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return tuple(_plain(v) for v in value)
    return value


@dataclasses.dataclass(frozen=True)
class Section:
    """Base of every typed config block. Subclasses are frozen dataclasses; `check()` raises `self.fail`."""

    # Fields a section keeps in the config but that are not dataclass fields (e.g. a registry's `kind`).
    config_only: ClassVar[tuple[str, ...]] = ()

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):  # tuples stay hashable and comparable whatever the caller passed
            v = getattr(self, f.name)
            if isinstance(v, list):
                object.__setattr__(self, f.name, tuple(v))
        self.check()

    def check(self) -> None:
        """Range checks of this section's fields; raise with `self.fail(field, why)`."""

    def fail(self, field: str, message: str) -> typing.NoReturn:
        raise FieldError(type(self).__name__, field, getattr(self, field, None), message)

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_config(cls: type[S], block: Mapping[str, Any] | ml_collections.ConfigDict, where: str,
                    **given: Any) -> S:
        """The typed section of `config.<where>`; `given` fills fields the config leaves to the run (e.g. a
        vocabulary size from the tokenizer). Unknown keys and bad values raise `ConfigError` naming the
        key."""
        data = {k: _plain(v) for k, v in dict(block).items() if k not in cls.config_only}
        names = set(cls.field_names())
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(f"config.{where}.{unknown[0]}: unknown key; {cls.__name__} has "
                              f"{', '.join(sorted(names))}")
        data.update(given)
        try:
            return cls(**data)
        except FieldError as e:
            raise ConfigError(f"config.{where}.{e.field}={e.value!r}: {e.message}") from None
        except TypeError as e:  # a required field missing
            raise ConfigError(f"config.{where}: {e}") from None

    @classmethod
    def defaults(cls, **overrides: Any) -> ml_collections.ConfigDict:
        """A ConfigDict of the section's defaults (with `overrides`), for config files to start from. Fields
        whose default is None become typed placeholders, so `--config.x.y=3` can still set them."""
        hints = typing.get_type_hints(cls)
        out: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            if f.name in overrides:
                value = overrides.pop(f.name)
            elif f.default is not dataclasses.MISSING:
                value = f.default
            elif f.default_factory is not dataclasses.MISSING:
                value = f.default_factory()
            else:
                continue
            out[f.name] = _placeholder(hints.get(f.name)) if value is None else value
        if overrides:
            raise ConfigError(f"{cls.__name__}.defaults: unknown fields {sorted(overrides)}")
        return ml_collections.ConfigDict(out)

    def to_config(self) -> ml_collections.ConfigDict:
        return type(self).defaults(**{f.name: getattr(self, f.name) for f in dataclasses.fields(self)})


def _placeholder(hint: Any) -> Any:
    """A typed None for ml_collections (`int | None` -> placeholder(int)); untyped None otherwise."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if len(args) == 1 and args[0] in (int, float, str, bool):
        return config_dict.placeholder(args[0])
    return None


# ------------------------------------------------------------------------------------ files and overrides

Overrides = Mapping[str, Any] | Sequence[str]


def split_spec(spec: str | os.PathLike) -> tuple[str, str | None]:
    """`"configs/emobench.py:mid"` -> ("configs/emobench.py", "mid"); no `:variant` -> (path, None)."""
    spec = os.fspath(spec)
    cut = spec.find(".py:")
    if cut < 0:
        return spec, None
    return spec[:cut + 3], spec[cut + 4:]


def load_config(spec: str | os.PathLike, overrides: Overrides = ()) -> ml_collections.ConfigDict:
    """`get_config(variant)` of the config file `spec` = `path[:variant]`, with `overrides` applied (see
    `apply_overrides`). A missing file, or one without `get_config`, is a `ConfigError`."""
    path, variant = split_spec(spec)
    if not Path(path).is_file():
        raise ConfigError(f"--config {path}: no such file")
    module_spec = importlib.util.spec_from_file_location(f"_emollm_config_{Path(path).stem}", path)
    if module_spec is None or module_spec.loader is None:
        raise ConfigError(f"--config {path}: not a python file")
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"--config {path}: the file defines no get_config()")
    config = module.get_config() if variant is None else module.get_config(variant)
    return apply_overrides(config, overrides)


def parse_value(text: str) -> Any:
    """A flag's text as a Python value, as ml_collections' config flags read it: a literal (`3`, `1e-5`,
    `('a', 'b')`, `True` / `true`), else the text itself."""
    if text in ("true", "false"):
        text = text.capitalize()
    try:
        return ast.literal_eval(text)
    except (SyntaxError, ValueError):
        return text


def _pairs(overrides: Overrides) -> list[tuple[str, Any, bool]]:
    """(dotted key, value, whether the value is flag text to parse) of each override."""
    if isinstance(overrides, Mapping):
        return [(k, v, isinstance(v, str)) for k, v in overrides.items()]
    out = []
    for item in overrides:
        key, sep, text = str(item).partition("=")
        if not sep:
            raise ConfigError(f"config override {item!r}: expected key=value")
        out.append((key, text, True))
    return out


def _block(config: ml_collections.ConfigDict, key: str) -> tuple[ml_collections.ConfigDict, str]:
    """The ConfigDict holding the dotted `key`, and the key's last part; unknown keys are a `ConfigError`."""
    parts = key.split(".")
    node, where = config, "config"
    for depth, part in enumerate(parts):
        if not isinstance(node, ml_collections.ConfigDict):
            raise ConfigError(f"config.{key}: {where}={node!r} is a value, not a block of keys")
        if part not in node:
            raise ConfigError(f"config.{key}: unknown key; {where} has {', '.join(sorted(node.keys()))}")
        if depth < len(parts) - 1:
            node, where = node[part], f"{where}.{part}"
    return node, parts[-1]


def _coerce(key: str, value: Any, want: type, nullable: bool) -> Any:
    """`value` as the type `want` of the key it replaces (int -> float, list -> tuple); else `ConfigError`."""
    if value is None or want is type(None):
        if value is None and not (nullable or want is type(None)):
            raise ConfigError(f"config.{key}=None: expected {want.__name__}")
        return value
    numeric = isinstance(value, int | float) and not isinstance(value, bool)
    if want is float and numeric:
        return float(value)
    if want is tuple and isinstance(value, list | tuple):
        return tuple(value)
    if issubclass(want, ml_collections.ConfigDict) and isinstance(value, Mapping | ml_collections.ConfigDict):
        return value
    if want is int and isinstance(value, bool) or not isinstance(value, want):
        raise ConfigError(f"config.{key}={value!r}: expected {want.__name__}, got {type(value).__name__}")
    return value


OVERRIDES_KEY = "overrides"  # a config that has this key records there the keys `apply_overrides` set


def apply_overrides(config: ml_collections.ConfigDict, overrides: Overrides) -> ml_collections.ConfigDict:
    """A copy of `config` with each dotted key set. `overrides`: a mapping `{"a.b": value}` or `"a.b=value"`
    strings. String values are parsed like `--config.a.b=value` flags (`parse_value`; a string key keeps the
    text as given) and coerced to the type of the existing value; a key holding a plain None takes any type,
    a typed placeholder (`config_dict.placeholder(int)`) its type or None. An unknown key or a value of the
    wrong type is a `ConfigError` naming the key.

    When `config` has an `overrides` key (the shipped config files start it as `()`), the dotted keys set
    here are appended to it: what a run was given, as opposed to what its config file says (the model
    config a pretrained checkpoint implies replaces the latter only; `emollm_jax.init_config`)."""
    out = copy.deepcopy(config)
    given: list[str] = []
    for key, value, is_text in _pairs(overrides):
        given.append(key)
        node, leaf = _block(out, key)
        want = node.get_type(leaf)
        # None is allowed where the key holds None now, or a typed placeholder (ml_collections keeps those as
        # FieldReferences and has no public accessor for that).
        nullable = node[leaf] is None or isinstance(node._fields[leaf], config_dict.FieldReference)
        if is_text:
            parsed = parse_value(value)
            keep_text = want is str and not isinstance(parsed, str) and not (parsed is None and nullable)
            value = value if keep_text else parsed
        value = _coerce(key, value, want, nullable)
        try:
            node[leaf] = value
        except (TypeError, ValueError) as e:
            raise ConfigError(f"config.{key}={value!r}: {e}") from None
    if OVERRIDES_KEY in out and given:
        out[OVERRIDES_KEY] = tuple(dict.fromkeys([*out[OVERRIDES_KEY], *given]))
    return out


def flatten(tree: Mapping[str, Any] | ml_collections.ConfigDict, prefix: str = "") -> dict[str, Any]:
    """Nested blocks -> dotted keys: `{"a": {"b": 1}}` -> `{"a.b": 1}` (ConfigDict keys cannot hold dots)."""
    flat: dict[str, Any] = {}
    for key, value in dict(tree).items():
        if isinstance(value, Mapping | ml_collections.ConfigDict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def split_config_args(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """(the other arguments, the overrides as "a.b=value") of a command line with `--config.a.b=value`,
    `--config.a.b value`, or the boolean forms `--config.a.b` / `--noconfig.a.b`. `--config path` itself and
    everything after `--` are left to the flag parser."""
    rest: list[str] = []
    overrides: list[str] = []
    args = list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        i += 1
        if arg == "--":
            rest += args[i - 1:]
            break
        if arg.startswith("--noconfig."):
            overrides.append(f"{arg[len('--noconfig.'):]}=False")
        elif not arg.startswith("--config."):
            rest.append(arg)
        elif "=" in arg:
            overrides.append(arg[len("--config."):])
        elif i < len(args) and not args[i].startswith("--"):
            overrides.append(f"{arg[len('--config.'):]}={args[i]}")
            i += 1
        else:  # a bare boolean flag
            overrides.append(f"{arg[len('--config.'):]}=True")
    return rest, overrides

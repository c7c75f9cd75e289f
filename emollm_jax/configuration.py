"""Typed config sections: each block of `config.*` is a frozen dataclass that checks its own fields.

A section's defaults are its dataclass defaults (config files start from `Section.defaults()` and change
what differs), and `Section.from_config(config.x, "x")` turns the ml_collections block back into the typed
object, refusing unknown keys and out-of-range values with one line that names the key:

    config.stages.emotional.lr=-1.0: must be positive

Range checks live in each section's `check()` (beside the fields); cross-field rules (mesh vs devices, batch
vs data parallelism) are `validate_config`'s.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping
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

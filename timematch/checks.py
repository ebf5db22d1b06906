"""Range and choice checks of config dataclasses: one line naming the key and what is allowed."""

from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing
from typing import Any

from timematch.errors import ConfigError


def check_range(config: Any, key: str, low: float, high: float, low_open: bool = False, high_open: bool = False) -> None:
    """Raise :class:`ConfigError` naming ``key`` and its allowed range when out of it."""
    value = getattr(config, key)
    if value is None and key in _nullable(type(config)):
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{type(config).__name__}.{key}={value!r} is not a number; allowed: [{low}, {high}]")
    default = getattr(type(config), key, None)
    if isinstance(default, int) and not isinstance(default, bool) and not isinstance(value, int):
        raise ConfigError(f"{type(config).__name__}.{key}={value!r} is not an integer; allowed: [{low}, {high}]")
    too_low = value <= low if low_open else value < low
    too_high = value >= high if high_open else value > high
    if too_low or too_high or (isinstance(value, float) and math.isnan(value)):
        left = "(" if low_open else "["
        right = ")" if high_open else "]"
        raise ConfigError(
            f"{type(config).__name__}.{key}={value!r} is out of range; allowed: {left}{low}, {high}{right}"
        )


@functools.cache
def _nullable(cls: type) -> frozenset[str]:
    """The keys of ``cls`` typed ``X | None``: there None is a value (``steps_per_epoch=None``: one
    pass over the data); elsewhere it is an empty ``--set key=`` and rejected."""
    hints = typing.get_type_hints(cls)
    return frozenset(key for key, hint in hints.items() if types.NoneType in typing.get_args(hint))


def unknown_fields(cls: type, values: Any) -> tuple[list[str], list[str]]:
    """``(unknown, valid)``: the keys of mapping ``values`` that dataclass ``cls`` has no field
    for, and its fields, both sorted (the caller's error names them)."""
    valid = {field.name for field in dataclasses.fields(cls)}
    return sorted(set(values) - valid), sorted(valid)


def check_choice(config: Any, key: str, choices: tuple[str, ...]) -> None:
    value = getattr(config, key)
    if not isinstance(value, str) or value not in choices:
        raise ConfigError(f"{type(config).__name__}.{key}={value!r}; valid: {', '.join(choices)}")


def check_flag(config: Any, key: str) -> None:
    """Raise :class:`ConfigError` unless ``key`` is true or false."""
    value = getattr(config, key)
    if not isinstance(value, bool):
        raise ConfigError(f"{type(config).__name__}.{key}={value!r} must be true or false")


def check_flags(config: Any) -> None:
    """:func:`check_flag` on every key of dataclass ``config`` whose default is true or false, so
    that a flag without its own check still refuses ``--set ...balanced_source=maybe``."""
    for field in dataclasses.fields(config):
        if isinstance(field.default, bool):
            check_flag(config, field.name)

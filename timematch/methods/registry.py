"""The method registry: one registered name per method module, one contract.

Every method module under :mod:`timematch.methods` defines a frozen config dataclass with
the published defaults and a :class:`~timematch.methods.base.Method` subclass, and registers
it with :func:`register`. Unknown names and unknown config keys are errors that list the
valid choices.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, TypeVar

from timematch.checks import unknown_fields
from timematch.errors import ConfigError

_REGISTRY: dict[str, type] = {}
#: What a method's training may read (``Method.trains_on``).
TRAINS_ON = ("source", "target", "both")

T = TypeVar("T", bound=type)


def register(name: str):
    """Class decorator that registers a method class under ``name`` (duplicates raise)."""

    def decorate(cls: T) -> T:
        if name in _REGISTRY:
            raise ConfigError(f"method {name!r} is registered twice ({_REGISTRY[name]} and {cls})")
        short = getattr(cls, "short_name", None)  # run names show it: see Method.short_name
        if not isinstance(short, str) or not 0 < len(short) <= 6 or " " in short:
            raise ConfigError(f"method {name!r}: short_name must be 1-6 characters without spaces, got {short!r}")
        taken = [other for other, known in _REGISTRY.items() if known.short_name == short]
        if taken:
            raise ConfigError(f"method {name!r}: short_name {short!r} is already {taken[0]!r}'s")
        trains_on = getattr(cls, "trains_on", None)
        if trains_on not in TRAINS_ON:
            raise ConfigError(f"method {name!r}: trains_on must be one of {TRAINS_ON}, got {trains_on!r}")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorate


def method_names() -> list[str]:
    """All registered method names, sorted."""
    return sorted(_REGISTRY)


def get_method(name: str) -> type:
    """The method class registered as ``name``."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ConfigError(
            f"unknown method {name!r}; valid methods: {', '.join(method_names())}"
        ) from None


def methods_in_table_order(names=None) -> list[str]:
    """``names`` (default: every registered method) sorted by their ``table_order`` (the
    paper's row order), unregistered names last by name."""
    names = method_names() if names is None else list(dict.fromkeys(names))
    return sorted(names, key=lambda n: (_REGISTRY[n].table_order if n in _REGISTRY else float("inf"), n))


def source_model_method() -> type:
    """The one method whose training is the source models' training and whose default trial
    evaluates the pretrained source model (``evaluates_source_model``)."""
    found = [cls for cls in _REGISTRY.values() if cls.evaluates_source_model]
    if len(found) != 1:
        raise ConfigError(f"exactly one method must set evaluates_source_model; found {[c.name for c in found]}")
    return found[0]


def config_class(name: str) -> type:
    """The frozen config dataclass of method ``name``."""
    return get_method(name).config_class


def config_fields(name: str) -> dict[str, Any]:
    """Config key -> default value of method ``name``."""
    return {f.name: getattr(config_class(name)(), f.name) for f in dataclasses.fields(config_class(name))}


def build_config(name: str, overrides: Mapping[str, Any] | None = None):
    """The method's config with ``overrides`` applied and validated.

    Raises :class:`ConfigError` on an unknown key (listing the valid ones) or on a value
    outside its allowed range (the config's ``__post_init__`` checks ranges).
    """
    cls = config_class(name)
    overrides = dict(overrides or {})
    unknown, valid = unknown_fields(cls, overrides)
    if unknown:
        raise ConfigError(f"unknown config key(s) {unknown} for method {name!r}; valid keys: {', '.join(valid)}")
    return cls(**overrides)

"""Search spaces: ``search_spaces/<method>.yaml`` -> Optuna distributions over a method's config keys.

One file per method; each top-level key is a key of the method's config dataclass
(:func:`timematch.methods.config_fields`) and maps to one distribution::

    lr:               {type: float, low: 1.0e-5, high: 1.0e-3, log: true}
    max_temporal_shift: {type: int, low: 30, high: 90, step: 10}
    ema_decay:        {type: categorical, choices: [0.99, 0.999, 0.9999]}

Everything is checked at start-up, before any training: unknown keys, a type that does not
fit the config value, ``low > high``, ``log`` with ``low <= 0``, and bounds or choices the
method's config itself rejects.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import optuna.distributions as od
import yaml

from timematch.checks import check_flags
from timematch.errors import ConfigError
from timematch.methods import build_config, config_fields

KINDS = ("float", "int", "categorical")
_KEYS = {"float": {"type", "low", "high", "log"}, "int": {"type", "low", "high", "step", "log"},
         "categorical": {"type", "choices"}}


def space_path(directory: Path, method: str) -> Path:
    return Path(directory) / f"{method}.yaml"


def load_space(directory: Path, method: str) -> dict[str, dict[str, Any]]:
    """The validated search space of ``method`` as plain dicts (JSON-serialisable)."""
    path = space_path(directory, method)
    where = f"search-space file {path}"
    if not path.is_file():
        have = sorted(p.stem for p in Path(directory).glob("*.yaml"))
        raise ConfigError(
            f"{where}: not found; no search space for method {method!r} (spaces exist for: "
            f"{', '.join(have) or 'none'}); write one or run it with --no-search"
        )
    try:
        document = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{where}: not valid YAML ({err})") from None
    return validate_space(document, method, where)


def validate_space(document: Any, method: str, where: str = "search space") -> dict[str, dict[str, Any]]:
    """Check a parsed search-space document against ``method``'s config; return it normalised."""
    if not isinstance(document, dict) or not document:
        raise ConfigError(f"{where}: expected a mapping of config key -> distribution")
    fields = config_fields(method)
    space = {}
    for key, spec in document.items():
        if key not in fields:
            raise ConfigError(
                f"{where}: {key!r} is not a config key of method {method!r}; valid keys: {', '.join(sorted(fields))}"
            )
        space[key] = _validate_one(spec, key, fields[key], method, f"{where}: {key}")
    return space


def _validate_one(spec: Any, key: str, default: Any, method: str, where: str) -> dict[str, Any]:
    if not isinstance(spec, dict) or spec.get("type") not in KINDS:
        raise ConfigError(f"{where}: expected {{type: {' | '.join(KINDS)}, ...}}, got {spec!r}")
    kind = spec["type"]
    unknown = sorted(set(spec) - _KEYS[kind])
    if unknown:
        raise ConfigError(
            f"{where}: unknown field(s) {unknown} for a {kind} distribution; valid: {sorted(_KEYS[kind])}"
        )
    if kind == "categorical":
        choices = spec.get("choices")
        if not isinstance(choices, list) or not choices:
            raise ConfigError(f"{where}: 'choices' must be a non-empty list")
        for choice in choices:
            _check_value(method, key, choice, where)
        return {"type": kind, "choices": list(choices)}
    if isinstance(default, bool) or (default is not None and not isinstance(default, (int, float))):
        raise ConfigError(f"{where}: {key} is not numeric (default {default!r}); use type: categorical")
    if kind == "float" and isinstance(default, int) and default is not None:
        raise ConfigError(f"{where}: {key} is an integer (default {default!r}); use type: int")
    missing = [name for name in ("low", "high") if name not in spec]
    if missing:
        raise ConfigError(f"{where}: missing {missing}")
    low, high = spec["low"], spec["high"]
    numbers = (int,) if kind == "int" else (int, float)
    for name, value in (("low", low), ("high", high)):
        if isinstance(value, bool) or not isinstance(value, numbers):
            raise ConfigError(f"{where}: {name}={value!r} must be {'an integer' if kind == 'int' else 'a number'}")
    log = bool(spec.get("log", False))
    if low > high:
        raise ConfigError(f"{where}: low={low} > high={high}; swap them")
    if log and low <= 0:
        raise ConfigError(f"{where}: log scale needs low > 0, got low={low}")
    normalised: dict[str, Any] = {"type": kind, "low": low, "high": high, "log": log}
    if kind == "int":
        step = spec.get("step", 1)
        if isinstance(step, bool) or not isinstance(step, int) or step < 1:
            raise ConfigError(f"{where}: step={step!r} must be a positive integer")
        if log and step != 1:
            raise ConfigError(f"{where}: an int distribution on a log scale needs step 1 (Optuna's rule)")
        normalised["step"] = step
    for value in (low, high):
        _check_value(method, key, value, where)
    return normalised


def _check_value(method: str, key: str, value: Any, where: str) -> None:
    """The method's own config must accept every value the space can produce (checked at the ends)."""
    try:
        check_flags(build_config(method, {key: value}))
    except ConfigError as err:
        raise ConfigError(f"{where}: value {value!r} is rejected by the method's config ({err})") from None
    except TypeError as err:
        raise ConfigError(f"{where}: value {value!r} does not fit ({err})") from None


def to_optuna(space: dict[str, dict[str, Any]]) -> dict[str, od.BaseDistribution]:
    """Optuna distributions of a validated space."""
    out: dict[str, od.BaseDistribution] = {}
    for key, spec in space.items():
        if spec["type"] == "float":
            out[key] = od.FloatDistribution(float(spec["low"]), float(spec["high"]), log=spec["log"])
        elif spec["type"] == "int":
            out[key] = od.IntDistribution(spec["low"], spec["high"], log=spec["log"], step=spec["step"])
        else:
            out[key] = od.CategoricalDistribution(spec["choices"])
    return out


def contains(space: dict[str, dict[str, Any]], values: dict[str, Any]) -> bool:
    """Whether ``values`` (one per key of ``space``) is a point the space can sample."""
    for key, spec in space.items():
        value = values.get(key)
        if spec["type"] == "categorical":
            if value not in spec["choices"]:
                return False
        elif value is None or isinstance(value, bool) or not spec["low"] <= value <= spec["high"]:
            return False
        elif spec["type"] == "int" and (value - spec["low"]) % spec["step"] != 0:
            return False
    return True

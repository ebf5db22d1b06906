"""Profiles: ``experiments/profiles/<name>.yaml``, the budgets of a launch.

A profile holds the number of folds and of Optuna trials, a ``budget`` every method gets
(epochs, steps per epoch, batch size: a new method needs no line here), per-method config
overrides (only what differs), the overrides of the source-model training, data overrides
(:class:`~timematch.data.dataset.DataConfig`), the ASHA settings (:class:`Scheduler`),
per-trial resources (:class:`Resources`) and retries. ``--set section.key=value`` on the
command line changes one entry. The file is parsed and checked once, here: unknown sections
and keys are errors naming the file (or the ``--set``) and the valid ones.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from timematch.checks import check_flags
from timematch.data.dataset import DataConfig
from timematch.errors import ConfigError
from timematch.methods import build_config, get_method, method_names, source_model_method

SECTIONS = ("description", "folds", "trials", "data", "pretrain", "budget", "methods", "scheduler", "resources",
            "retries")
#: What ``budget`` may set: every method's config has these (the source model's is ``pretrain``).
BUDGET_KEYS = ("epochs", "steps_per_epoch", "batch_size")
SCHEDULER_KEYS = ("grace_period", "reduction_factor")  # Scheduler's fields
RESOURCE_KEYS = ("cpus_per_trial", "gpus_per_trial", "max_concurrent_per_group")


@dataclass(frozen=True)
class Scheduler:
    """ASHA within each searched group (:class:`~timematch.runner.search.GroupedASHA`), on epochs:
    a trial runs at least ``grace_period`` epochs; at each rung ``1/reduction_factor`` go on."""

    grace_period: int = 1
    reduction_factor: float = 2.0

    @classmethod
    def parse(cls, values: dict[str, Any], where: str) -> "Scheduler":
        """The ``scheduler`` section of a profile, checked (errors name ``where`` and the key)."""
        _only(values, SCHEDULER_KEYS, "scheduler", where)
        grace = _count(values.get("grace_period", cls.grace_period), "scheduler.grace_period", where, minimum=1)
        reduction = values.get("reduction_factor", cls.reduction_factor)
        if not _finite(reduction) or reduction <= 1:
            raise ConfigError(f"{where}: scheduler.reduction_factor={reduction!r} must be a number > 1")
        return cls(grace, float(reduction))

    def __str__(self) -> str:
        return f"grace period {self.grace_period} epochs, reduction factor {self.reduction_factor:g}"


@dataclass(frozen=True)
class Resources:
    """Per-trial resources as a profile asks for them; ``"auto"`` is decided from the cluster
    (:func:`timematch.runner.resources.trial_resources`)."""

    cpus_per_trial: float | str = "auto"
    gpus_per_trial: float | str = "auto"
    max_concurrent_per_group: int | str = "auto"

    @classmethod
    def parse(cls, values: dict[str, Any], where: str) -> "Resources":
        _only(values, RESOURCE_KEYS, "resources", where)
        for key in ("cpus_per_trial", "gpus_per_trial"):
            value = values.get(key, "auto")
            if value != "auto" and (not _finite(value) or value < 0):
                raise ConfigError(f"{where}: resources.{key}={value!r} must be 'auto' or a number >= 0")
        concurrent = values.get("max_concurrent_per_group", "auto")
        if concurrent != "auto" and (isinstance(concurrent, bool) or not isinstance(concurrent, int) or concurrent < 1):
            raise ConfigError(
                f"{where}: resources.max_concurrent_per_group={concurrent!r} must be 'auto' or an integer >= 1"
            )
        return cls(values.get("cpus_per_trial", "auto"), values.get("gpus_per_trial", "auto"), concurrent)


@dataclass(frozen=True)
class Profile:
    """A validated profile. ``resources`` values may be ``"auto"`` (decided from the cluster)."""

    name: str
    description: str
    folds: int
    trials: int
    data: dict[str, Any] = field(default_factory=dict)
    pretrain: dict[str, Any] = field(default_factory=dict)
    methods: dict[str, dict[str, Any]] = field(default_factory=dict)
    scheduler: Scheduler = field(default_factory=Scheduler)
    resources: Resources = field(default_factory=Resources)
    retries: int = 1
    budget: dict[str, Any] = field(default_factory=dict)

    def data_config(self) -> DataConfig:
        return DataConfig.from_dict(self.data)

    def method_overrides(self, method: str) -> dict[str, Any]:
        """The profile's config of ``method``: the budget, then what the profile names for it
        (none for the source-model method: its training is ``pretrain``)."""
        if get_method(method).evaluates_source_model:
            return dict(self.methods.get(method, {}))
        return {**self.budget, **self.methods.get(method, {})}


def profile_names(directory: Path) -> list[str]:
    return sorted(p.stem for p in Path(directory).glob("*.yaml"))


def load_profile(directory: Path, name: str, sets: list[str] | tuple[str, ...] = ()) -> Profile:
    """Read, override (``sets``: ``section.key=value``) and validate profile ``name``."""
    names = profile_names(directory)
    if name not in names:  # a name, not a path: experiments/profiles/<name>.yaml
        raise ConfigError(f"--profile: unknown profile {name!r}; valid profiles: {', '.join(names) or 'none'}")
    path = Path(directory) / f"{name}.yaml"
    where = f"profile file {path}"
    try:
        document = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{where}: not valid YAML ({err})") from None
    if not isinstance(document, dict):
        raise ConfigError(f"{where}: expected a mapping with sections {', '.join(SECTIONS)}")
    profile = validate_profile(document, name, where)  # the file alone: its errors name the file
    for count, item in enumerate(sets, start=1):  # each --set in turn: its errors name the --set
        profile = validate_profile(apply_sets(document, sets[:count]), name, _set_label(item))
    return profile


def _set_label(item: str) -> str:
    """Where an override came from, as errors name it: ``--set KEY=VALUE`` (quoted if unprintable)."""
    return f"--set {item if item.isprintable() else repr(item)}"


def apply_sets(document: dict[str, Any], sets: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """Apply ``--set a.b.c=value`` overrides (values parsed as YAML: ``3``, ``1e-4``, ``true``)."""
    document = copy.deepcopy(document)
    for item in sets:
        dotted, sep, raw = item.partition("=")
        keys = [k for k in dotted.strip().split(".") if k]
        if not sep or not keys:
            raise ConfigError(f"{_set_label(item)}: expected SECTION.KEY=VALUE, e.g. methods.timematch.epochs=5")
        if keys[0] not in SECTIONS:
            raise ConfigError(f"{_set_label(item)}: unknown profile section {keys[0]!r}; valid: {', '.join(SECTIONS)}")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            value = raw
        node = document
        for key in keys[:-1]:
            child = node.get(key)
            if child is None:
                child = node[key] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"{_set_label(item)}: {key!r} is not a section")
            node = child
        node[keys[-1]] = value
    return document


def validate_profile(document: dict[str, Any], name: str, where: str) -> Profile:
    unknown = sorted(set(document) - set(SECTIONS))
    if unknown:
        raise ConfigError(f"{where}: unknown section(s) {unknown}; valid: {', '.join(SECTIONS)}")
    folds = _count(document.get("folds", 1), "folds", where, minimum=1)
    trials = _count(document.get("trials", 0), "trials", where, minimum=0)
    retries = _count(document.get("retries", 1), "retries", where, minimum=0)
    data = _mapping(document.get("data"), "data", where)
    try:
        data_config = DataConfig.from_dict(data)
    except ConfigError as err:
        raise ConfigError(f"{where}: data: {err}") from None
    if folds > data_config.n_folds:
        raise ConfigError(f"{where}: folds={folds} but the data has n_folds={data_config.n_folds}")
    pretrain = _mapping(document.get("pretrain"), "pretrain", where)
    try:
        check_flags(build_config(source_model_method().name, pretrain))
    except ConfigError as err:
        raise ConfigError(f"{where}: pretrain: {err}") from None
    budget = _mapping(document.get("budget"), "budget", where)
    _only(budget, BUDGET_KEYS, "budget", where)
    methods = _mapping(document.get("methods"), "methods", where)
    registered = method_names()
    for method, overrides in methods.items():
        if method not in registered:
            raise ConfigError(f"{where}: methods: unknown method {method!r}; valid methods: {', '.join(registered)}")
        if get_method(method).evaluates_source_model and overrides:
            raise ConfigError(
                f"{where}: methods.{method}: set the source model's training under 'pretrain:' "
                "(the source-only baseline is the pretrained source model)"
            )
        _mapping(overrides, f"methods.{method}", where)
    for method in registered:  # every method with the budget, so a new one is checked too
        if get_method(method).evaluates_source_model:
            continue
        values = {**budget, **(methods.get(method) or {})}
        try:
            check_flags(build_config(method, values))
        except ConfigError as err:
            section = f"methods.{method}" if method in methods else f"budget (for {method})"
            raise ConfigError(f"{where}: {section}: {err}") from None
    scheduler = Scheduler.parse(_mapping(document.get("scheduler"), "scheduler", where), where)
    resources = Resources.parse(_mapping(document.get("resources"), "resources", where), where)
    return Profile(
        name=name, description=str(document.get("description", "")), folds=folds, trials=trials,
        data=data, pretrain=pretrain, methods={m: dict(o or {}) for m, o in methods.items()}, budget=budget,
        scheduler=scheduler, resources=resources, retries=retries,
    )


def _finite(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)


def _count(value: Any, key: str, where: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{where}: {key}={value!r} must be an integer >= {minimum}")
    return value


def _mapping(value: Any, key: str, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: {key} must be a mapping, got {value!r}")
    return dict(value)


def _only(values: dict[str, Any], allowed: tuple[str, ...], key: str, where: str) -> None:
    unknown = sorted(set(values) - set(allowed))
    if unknown:
        raise ConfigError(f"{where}: {key}: unknown key(s) {unknown}; valid: {', '.join(allowed)}")

"""What Ray Tune hands a trial as its ``config``, typed: Tune needs a plain dict, the runner
reads it through these classes only (parsed once, unknown keys rejected).

- an adaptation trial: :class:`AdaptConfig` (its group, its number in the group, the sampled
  hyper-parameters), made by :class:`~timematch.runner.search.GroupedSearch`;
- a training on a source tile (stage 1): :class:`TrainingConfig` (the task's key), a grid.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from timematch.checks import unknown_fields


def _parse(cls, config: Mapping[str, Any] | None):
    config = dict(config or {})
    unknown, valid = unknown_fields(cls, config)
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown key(s) {unknown} in a trial config; valid: {valid}")
    return cls(**config)


@dataclass(frozen=True)
class AdaptConfig:
    """An adaptation trial: group ``group``, number ``number`` in it (0 is the defaults where
    the group has them), ``params`` sampled by its group's Optuna study (empty: the defaults)."""

    group: str
    number: int = 0
    params: dict[str, Any] = field(default_factory=dict)
    #: An array of this many trials of the group trained as one (:mod:`timematch.runner.trial_arrays`:
    #: each member's params come from the group's study, ``number`` is the array's); 0: one trial.
    members: int = 0

    def to_tune(self) -> dict[str, Any]:
        tune = {"group": self.group, "number": self.number, "params": dict(self.params)}
        return {**tune, "members": self.members} if self.members else tune

    @classmethod
    def of(cls, config: Mapping[str, Any] | None) -> "AdaptConfig":
        return _parse(cls, config)


@dataclass(frozen=True)
class TrainingConfig:
    """A stage-1 trial: the training of :class:`~timematch.runner.plan.PretrainTask` ``task``."""

    task: str

    @classmethod
    def of(cls, config: Mapping[str, Any] | None) -> "TrainingConfig":
        return _parse(cls, config)


def config_key(config: Mapping[str, Any] | None) -> str:
    """The plan item a trial's config names (its group id or its task key), for labels and tags."""
    config = config or {}
    return str(config.get("group") or config.get("task") or "")

"""The contract every method follows, and the settings every method shares.

A method owns its model(s) and says what one training step computes: given a source
batch and a target batch (numpy dicts, see :mod:`timematch.data.dataset`, already moved
to tensors), :meth:`Method.training_step` returns the loss and a dict of logs. The shared
loop in :func:`timematch.training.fit` does everything else.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from timematch.data.dataset import Domain
from timematch.errors import ConfigError


def check_range(config: Any, key: str, low: float, high: float, low_open: bool = False, high_open: bool = False) -> None:
    """Raise :class:`ConfigError` naming ``key`` and its allowed range when out of it."""
    value = getattr(config, key)
    if value is None:
        return
    too_low = value <= low if low_open else value < low
    too_high = value >= high if high_open else value > high
    if too_low or too_high or (isinstance(value, float) and math.isnan(value)):
        left = "(" if low_open else "["
        right = ")" if high_open else "]"
        raise ConfigError(
            f"{type(config).__name__}.{key}={value!r} is out of range; allowed: {left}{low}, {high}{right}"
        )


def check_choice(config: Any, key: str, choices: tuple[str, ...]) -> None:
    value = getattr(config, key)
    if value not in choices:
        raise ConfigError(f"{type(config).__name__}.{key}={value!r}; valid: {', '.join(choices)}")


@dataclass(frozen=True)
class TrainConfig:
    """Settings every method shares. ``steps_per_epoch=None`` means one pass over the
    labelled training parcels."""

    epochs: int = 20
    steps_per_epoch: int | None = 500
    batch_size: int = 128
    lr: float = 1e-4
    weight_decay: float = 1e-4
    focal_gamma: float = 1.0

    def __post_init__(self) -> None:
        check_range(self, "epochs", 0, 100_000)
        check_range(self, "steps_per_epoch", 1, 10_000_000)
        check_range(self, "batch_size", 2, 65_536)
        check_range(self, "lr", 0.0, 10.0, low_open=True)
        check_range(self, "weight_decay", 0.0, 1.0)
        check_range(self, "focal_gamma", 0.0, 10.0)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class Method:
    """Base class of the methods. Subclasses set ``config_class`` and override
    :meth:`sample` and :meth:`training_step`, and the hooks they need."""

    name: ClassVar[str]
    config_class: ClassVar[type[TrainConfig]] = TrainConfig
    #: Starts from the source model (False: trains from scratch, e.g. the upper bound).
    starts_from_source: ClassVar[bool] = True
    #: Epoch metric whose best epoch's weights are kept (None: keep the last epoch).
    select_best_by: ClassVar[str | None] = None

    def __init__(self, config: TrainConfig, model: torch.nn.Module, source: Domain, target: Domain,
                 device: torch.device) -> None:
        self.config = config
        self.model = model
        self.source = source
        self.target = target
        self.device = device

    # -- what the loop asks ------------------------------------------------------------

    def steps_per_epoch(self) -> int:
        if self.config.steps_per_epoch is not None:
            return self.config.steps_per_epoch
        return max(1, len(self.source.labelled("train")) // self.config.batch_size)

    def build_optimizer(self, total_steps: int) -> tuple[torch.optim.Optimizer, Any]:
        """Adam with weight decay and cosine annealing to 0 over all steps (published)."""
        optimizer = torch.optim.Adam(self.model.parameters(), lr=self.config.lr, weight_decay=self.config.weight_decay)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, total_steps))
        return optimizer, schedule

    def sample(self, rng: np.random.Generator) -> dict[str, dict[str, np.ndarray]]:
        """The numpy batches of one step (runs in the data thread)."""
        raise NotImplementedError

    def training_step(self, batch: dict[str, dict[str, torch.Tensor]]) -> tuple[torch.Tensor, dict[str, float]]:
        """Loss of one step and its logs."""
        raise NotImplementedError

    def start_epoch(self, epoch: int, rng: np.random.Generator, logs: list[str]) -> dict[str, float]:
        return {}

    def after_step(self) -> None:
        """Called after each optimiser step (e.g. to update an EMA teacher)."""

    def end_epoch(self, epoch: int, logs: list[str]) -> dict[str, float]:
        return {}

    def eval_model(self) -> torch.nn.Module:
        """The model evaluated each epoch and returned at the end."""
        return self.model

    def eval_shift(self) -> int:
        """Days added to target positions when evaluating (0 for every method here)."""
        return 0

    def extra_state(self) -> dict[str, Any]:
        """Method state beyond the model and optimiser, for checkpoints."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        pass

    def info(self) -> dict[str, Any]:
        """Method outputs worth keeping with the result (e.g. shift scores)."""
        return {}

"""FixMatch (Sohn et al., NeurIPS 2020) as used in the TimeMatch paper: TimeMatch without
temporal shift estimation.

Each step: a (class-balanced) source batch, strong view, with its labels; a target batch
seen twice. The teacher (EMA of the student, eval mode) labels the weak target view;
samples with max probability > ``pseudo_threshold`` train the student on their strong
view:

    L = focal(f(x_s), y_s) + trade_off * mean_{i: max p_i > tau} focal(f(A(x_t,i)), argmax p_i)

with domain-specific batch norm (source and target forwarded separately), Adam and a
cosine schedule, and the teacher updated as an EMA of the student after each step.

On a GPU the whole target batch is forwarded with the unconfident samples weighted out of
the loss and the batch statistics (rather than selected), so the step keeps its shape and
runs as a CUDA graph; on a CPU they are selected, which saves their work. The shift
(TimeMatch's; 0 here) is a device tensor set at each epoch's start.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from timematch.data.views import Batch
from timematch.methods.base import Method, TrainConfig, check_choice, check_range
from timematch.methods.pseudo_label import (
    PseudoLabelStats,
    ema_update,
    macro_f1,
    make_teacher,
    pseudo_labels,
    supervised_and_pseudo_loss,
)
from timematch.methods.registry import register
from timematch.training import StepContext

OUTPUTS = ("student", "teacher")


@dataclass(frozen=True)
class FixMatchConfig(TrainConfig):
    epochs: int = 20
    steps_per_epoch: int | None = 500
    lr: float = 1e-4
    pseudo_threshold: float = 0.9
    trade_off: float = 2.0
    ema_decay: float = 0.9999
    domain_specific_bn: bool = True
    balanced_source: bool = True
    output: str = "student"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range(self, "pseudo_threshold", 0.0, 1.0, low_open=True)
        check_range(self, "trade_off", 0.0, 1000.0)
        check_range(self, "ema_decay", 0.0, 1.0)
        check_choice(self, "output", OUTPUTS)


@register("fixmatch")
class FixMatch(Method):
    """Teacher-student pseudo-labelling with no temporal shift (d = 0 throughout)."""

    config_class = FixMatchConfig
    config: FixMatchConfig
    table_order = 80.0
    short_name = "FM"

    def __init__(self, config, model, source, target, device) -> None:
        super().__init__(config, model, source, target, device)
        self.teacher = self.own("teacher", make_teacher(model), trainable=False)
        # days added to target positions for the teacher, and to source positions for the
        # student: tensors, read by the captured step and set in place at each epoch's start
        self._shifts = torch.zeros(2, dtype=torch.int64, device=device)
        self._stats = PseudoLabelStats(len(source.classes), device)
        self.class_prior: np.ndarray | None = None

    @property
    def target_shift(self) -> int:
        return int(self._shifts[0])

    @property
    def source_shift(self) -> int:
        return int(self._shifts[1])

    def set_shifts(self, target: int, source: int) -> None:
        self._shifts.copy_(torch.tensor([target, source], dtype=torch.int64))

    def sample(self) -> dict[str, Batch]:
        size = self.config.batch_size
        source, target = self.views.source, self.views.target
        parcels = target.draw_train(size)
        return {
            "source": source.strong(source.draw_labelled(size, self.config.balanced_source)),
            "target_weak": target.weak(parcels),
            "target_strong": target.strong(parcels),
        }

    def training_step(self, batch: dict[str, Batch], context: StepContext) -> tuple[torch.Tensor, dict]:
        cfg = self.config
        weak = batch["target_weak"]
        labels, confident = pseudo_labels(self.teacher, weak.shifted(self._shifts[0]), cfg.pseudo_threshold)
        self._stats.add(labels, confident, weak.label)
        loss, logs = supervised_and_pseudo_loss(
            self.model, batch["source"].shifted(self._shifts[1]), batch["target_strong"], labels, confident,
            cfg.trade_off, cfg.focal_gamma, cfg.domain_specific_bn, self.static_shapes,
        )
        logs["pseudo_label_count"] = confident.float().sum()
        return loss, logs

    def after_step(self, context: StepContext) -> None:
        ema_update(self.teacher, self.model, self.config.ema_decay)

    def end_epoch(self, epoch: int, logs: list[str]) -> dict[str, float]:
        pseudo, confusion, confident = self._stats.read()
        if pseudo.sum() > 0:
            self.class_prior = pseudo
        metrics = {}
        if confident == 0:
            logs.append(
                f"no target sample passed the pseudo-label threshold ({self.config.pseudo_threshold}) "
                "this epoch: the student trained on source data only"
            )
            metrics["pseudo_label_f1"] = float("nan")
        else:
            metrics["pseudo_label_f1"] = macro_f1(confusion)  # analysis only
        return metrics

    def eval_model(self) -> torch.nn.Module:
        return self.teacher if self.config.output == "teacher" else self.model

    def extra_state(self) -> dict[str, Any]:
        return {
            "target_shift": self.target_shift,
            "source_shift": self.source_shift,
            "class_prior": None if self.class_prior is None else self.class_prior.tolist(),
        }

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.set_shifts(int(state["target_shift"]), int(state["source_shift"]))
        prior = state["class_prior"]
        self.class_prior = None if prior is None else np.asarray(prior, dtype=np.float64)

"""FixMatch (Sohn et al., NeurIPS 2020) as used in the TimeMatch paper: TimeMatch without
temporal shift estimation.

Each step: a (class-balanced) source batch, strong view, with its labels; a target batch
seen twice. The teacher (EMA of the student, eval mode) labels the weak target view;
samples with max probability > ``pseudo_threshold`` train the student on their strong
view:

    L = focal(f(x_s), y_s) + trade_off * mean_{i: max p_i > tau} focal(f(A(x_t,i)), argmax p_i)

with domain-specific batch norm (source and target forwarded separately), Adam and a
cosine schedule, and the teacher updated as an EMA of the student after each step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from sklearn.metrics import f1_score

from timematch.data.dataset import ClassBalancedSampler, uniform_sampler
from timematch.methods.base import Method, TrainConfig, check_choice, check_range
from timematch.methods.pseudo_label import (
    ema_update,
    histogram,
    make_teacher,
    pseudo_labels,
    select,
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
        self._source_sampler = ClassBalancedSampler(source.labels, source.labelled("train"), config.balanced_source)
        self._target_sampler = uniform_sampler(target.split.train)
        # days added to target positions for the teacher, and to source positions for the student
        self.target_shift = 0
        self.source_shift = 0
        self._epoch_pseudo: list[np.ndarray] = []
        self._epoch_confident: list[tuple[np.ndarray, np.ndarray]] = []
        self.class_prior: np.ndarray | None = None

    def sample(self, rng: np.random.Generator) -> dict:
        size = self.config.batch_size
        target = self._target_sampler(size, rng)
        return {
            "source": self.source.strong_batch(self._source_sampler(size, rng), rng),
            "target_weak": self.target.weak_batch(target, rng),
            "target_strong": self.target.strong_batch(target, rng),
        }

    def training_step(self, batch: dict, context: StepContext) -> tuple[torch.Tensor, dict[str, float]]:
        cfg = self.config
        labels, confident = pseudo_labels(self.teacher, batch["target_weak"], self.target_shift, cfg.pseudo_threshold)
        self._epoch_pseudo.append(labels.cpu().numpy())
        true = batch["target_weak"]["label"]
        self._epoch_confident.append((labels[confident].cpu().numpy(), true[confident].cpu().numpy()))
        source = dict(batch["source"])
        if self.source_shift:
            source["positions"] = source["positions"] + self.source_shift
        target = select(batch["target_strong"], confident)
        loss, logs = supervised_and_pseudo_loss(
            self.model, source, target, labels[confident], cfg.trade_off, cfg.focal_gamma, cfg.domain_specific_bn
        )
        logs["pseudo_label_count"] = float(confident.sum())
        return loss, logs

    def after_step(self, context: StepContext) -> None:
        ema_update(self.teacher, self.model, self.config.ema_decay)

    def end_epoch(self, epoch: int, logs: list[str]) -> dict[str, float]:
        n_classes = len(self.source.classes)
        if self._epoch_pseudo:
            self.class_prior = histogram(np.concatenate(self._epoch_pseudo), n_classes)
        predicted = np.concatenate([p for p, _ in self._epoch_confident]) if self._epoch_confident else np.zeros(0)
        true = np.concatenate([t for _, t in self._epoch_confident]) if self._epoch_confident else np.zeros(0)
        self._epoch_pseudo, self._epoch_confident = [], []
        metrics = {}
        if len(predicted) == 0:
            logs.append(
                f"no target sample passed the pseudo-label threshold ({self.config.pseudo_threshold}) "
                "this epoch: the student trained on source data only"
            )
            metrics["pseudo_label_f1"] = float("nan")
        else:
            labelled = true >= 0  # analysis only: target labels never enter training
            metrics["pseudo_label_f1"] = (
                float(f1_score(true[labelled], predicted[labelled], average="macro", zero_division=0))
                if labelled.any() else float("nan")
            )
        return metrics

    def eval_model(self) -> torch.nn.Module:
        return self.teacher if self.config.output == "teacher" else self.model

    def extra_state(self) -> dict[str, Any]:
        return {
            "target_shift": int(self.target_shift),
            "source_shift": int(self.source_shift),
            "class_prior": None if self.class_prior is None else self.class_prior.tolist(),
        }

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.target_shift = int(state["target_shift"])
        self.source_shift = int(state["source_shift"])
        prior = state["class_prior"]
        self.class_prior = None if prior is None else np.asarray(prior, dtype=np.float64)

"""Source-only training: the starting point of every adaptation method, and a baseline.

The model is trained on the labelled source tile with focal loss (gamma 1), Adam
(lr 1e-3, weight decay 1e-4) and cosine annealing, on the strong view (64 pixels, 30
dates), and the weights of the epoch with the best *source* validation macro F1 are kept.
Evaluated on the target tile it is the "source-only" baseline (Nyborg et al. 2022).

Temporal shift augmentation is off by default, as published (the paper found that a source
model trained with it makes shift estimation fail; ``benchmarks/quality.py`` measures it on
the data at hand); the shift-augmented baseline is its own method,
:mod:`timematch.methods.shift_aug`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from timematch.data.dataset import MAX_SHIFT_AUG, Domain
from timematch.data.views import Batch, DomainViews, model_outputs
from timematch.losses import focal_loss
from timematch.methods.base import Method, TrainConfig, check_range
from timematch.methods.registry import register
from timematch.training import StepContext


@dataclass(frozen=True)
class SourceOnlyConfig(TrainConfig):
    epochs: int = 100
    steps_per_epoch: int | None = None
    lr: float = 1e-3
    balanced_sampling: bool = False
    shift_aug: bool = False
    shift_aug_max: int = 60
    shift_aug_p: float = 0.5

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range(self, "shift_aug_max", 0, MAX_SHIFT_AUG)
        check_range(self, "shift_aug_p", 0.0, 1.0)


class SupervisedMethod(Method):
    """Supervised training on one domain's labelled train split (``train_domain``)."""

    config: SourceOnlyConfig
    trains_on = "source"

    @property
    def train_domain(self) -> Domain:
        return self.source

    @property
    def train_views(self) -> DomainViews:
        """The views of :attr:`train_domain`."""
        return self.views.source if self.train_domain is self.source else self.views.target

    def steps_per_epoch(self) -> int:
        if self.config.steps_per_epoch is not None:
            return self.config.steps_per_epoch
        return max(1, len(self.train_domain.labelled("train")) // self.config.batch_size)

    def max_date_shift(self) -> int:
        return self.config.shift_aug_max if self.config.shift_aug else 0

    def sample(self) -> dict[str, Batch]:
        cfg = self.config
        views = self.train_views
        parcels = views.draw_labelled(cfg.batch_size, cfg.balanced_sampling)
        if cfg.shift_aug:
            return {"source": views.strong(parcels, cfg.shift_aug_max, cfg.shift_aug_p)}
        return {"source": views.strong(parcels)}

    def training_step(self, batch: dict[str, Batch], context: StepContext) -> tuple[torch.Tensor, dict]:
        x = batch["source"]
        logits, _ = model_outputs(self.model, x)
        return focal_loss(logits, x.label, self.config.focal_gamma), {}


@register("source_only")
class SourceOnly(SupervisedMethod):
    """Train on the source tile, keep the best epoch by source validation macro F1."""

    config_class = SourceOnlyConfig
    starts_from_source = False
    select_best_by = "source_val_f1"
    table_order = 0.0
    short_name = "SO"
    reference = True
    evaluates_source_model = True

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

import numpy as np
import torch

from timematch.data.dataset import MAX_SHIFT_AUG, ClassBalancedSampler, Domain
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

    def __init__(self, config, model, source, target, device) -> None:
        super().__init__(config, model, source, target, device)
        domain = self.train_domain
        self._sampler = ClassBalancedSampler(domain.labels, domain.labelled("train"), config.balanced_sampling)

    @property
    def train_domain(self) -> Domain:
        return self.source

    def steps_per_epoch(self) -> int:
        if self.config.steps_per_epoch is not None:
            return self.config.steps_per_epoch
        return max(1, len(self.train_domain.labelled("train")) // self.config.batch_size)

    def sample(self, rng: np.random.Generator) -> dict:
        domain = self.train_domain
        parcels = self._sampler(self.config.batch_size, rng)
        cfg = self.config
        if cfg.shift_aug:
            return {"source": domain.strong_batch(parcels, rng, cfg.shift_aug_max, cfg.shift_aug_p)}
        return {"source": domain.strong_batch(parcels, rng)}

    def training_step(self, batch: dict, context: StepContext) -> tuple[torch.Tensor, dict[str, float]]:
        x = batch["source"]
        logits, _ = self.model(x["pixels"], x["mask"], x["positions"], x["geom"])
        return focal_loss(logits, x["label"], self.config.focal_gamma), {}


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

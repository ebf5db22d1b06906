"""The upper bound: the same supervised training, on the *target* tile's labels.

Not an adaptation method: it shows what a model trained in the target region reaches.
The best epoch is chosen on the target validation split (the labels are used anyway).
"""

from __future__ import annotations

from dataclasses import dataclass

from timematch.data.dataset import Domain
from timematch.methods.registry import register
from timematch.methods.source_only import SourceOnlyConfig, SupervisedMethod


@dataclass(frozen=True)
class UpperBoundConfig(SourceOnlyConfig):
    pass


@register("upper_bound")
class UpperBound(SupervisedMethod):
    config_class = UpperBoundConfig
    starts_from_source = False
    trains_on = "target"  # with the source's class list and band statistics: see Method.trains_on
    select_best_by = "target_val_f1"
    table_order = 100.0
    short_name = "UB"
    reference = True

    @property
    def train_domain(self) -> Domain:
        return self.target

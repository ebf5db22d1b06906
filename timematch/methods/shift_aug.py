"""Source-only with temporal shift augmentation: the TimeMatch paper's separate baseline.

Source-only training (:mod:`timematch.methods.source_only`: focal loss, Adam 1e-3, cosine
schedule, best epoch by source validation macro F1) from scratch, with every training
sample's date positions shifted by one random integer in [-``shift_aug_max``,
``shift_aug_max``] days with probability ``shift_aug_p``: a model meant to be robust to
the regional shift rather than to estimate it. (The source models the adaptation methods
start from are trained without it, as published: the paper found that it makes shift
estimation fail; ``benchmarks/quality.py`` measures that on the data at hand.)
"""

from __future__ import annotations

from dataclasses import dataclass

from timematch.methods.registry import register
from timematch.methods.source_only import SourceOnlyConfig, SupervisedMethod


@dataclass(frozen=True)
class ShiftAugConfig(SourceOnlyConfig):
    shift_aug: bool = True


@register("shift_aug")
class ShiftAugmented(SupervisedMethod):
    config_class = ShiftAugConfig
    starts_from_source = False
    select_best_by = "source_val_f1"
    table_order = 10.0
    short_name = "SA"

"""TimeMatch (Nyborg, Pelletier, Lefevre, Assent; ISPRS J. Photogramm. Remote Sens. 188, 2022).

FixMatch's teacher-student pseudo-labelling, with the temporal shift between the target
and source regions estimated and corrected:

1. Initialisation: the source model scores shifts d in [-max, max] with the inception
   score; the search range becomes [0, max] or [-max, 0] by the sign of the estimate d0,
   and the target class distribution c_hat is the histogram of predictions of all target
   training parcels at d0 (of a fixed uniform sample of ``data.eval_parcels`` of them when
   the profile sets one: the paper predicts all of them, which grows with the tile).
2. Each epoch: d is re-estimated with the AM score (given c_hat) on ``sample_size``
   target batches; the teacher labels target data at positions + d, and the source is
   shifted by -d so the student learns target-aligned timing. After the first epoch's
   estimate the search narrows to [min(d, 0), max(d, 0)]. c_hat for the next epoch is
   the histogram of all pseudo labels (argmax, before thresholding) of this epoch.

Ablations by config: ``estimator`` (am, is, ent, acc), ``ema_decay=0``,
``domain_specific_bn=False``, ``balanced_source=False``, ``source_shift=False``,
``output='teacher'``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from timematch.data.dataset import MAX_SHIFT_AUG
from timematch.methods.base import MethodInfo, check_choice, check_range
from timematch.methods.fixmatch import FixMatch, FixMatchConfig
from timematch.data.views import Batch
from timematch.methods.pseudo_label import histogram
from timematch.methods.registry import register
from timematch.shift import ESTIMATORS, ShiftScores, estimate_shift
from timematch.evaluation import predict


@dataclass(frozen=True)
class TimeMatchConfig(FixMatchConfig):
    max_temporal_shift: int = 60
    estimator: str = "am"
    init_estimator: str = "is"
    sample_size: int = 100  # target batches per shift estimation
    source_shift: bool = True

    #: read by the shift estimation, outside the step
    array_varying: ClassVar[tuple[str, ...]] = ("max_temporal_shift", "sample_size")

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range(self, "max_temporal_shift", 0, MAX_SHIFT_AUG)
        check_range(self, "sample_size", 1, 100_000)
        check_choice(self, "estimator", ESTIMATORS)
        check_choice(self, "init_estimator", ESTIMATORS)


@register("timematch")
class TimeMatch(FixMatch):
    config_class = TimeMatchConfig
    config: TimeMatchConfig
    table_order = 90.0
    short_name = "TM"

    def __init__(self, config, model, source, target, device) -> None:
        super().__init__(config, model, source, target, device)
        self.search_range: tuple[int, int] | None = None
        self.narrowed = False
        self.shift_scores: list[ShiftScores] = []

    def max_date_shift(self) -> int:
        return self.config.max_temporal_shift

    def _estimation_batches(self, rng: np.random.Generator) -> list[Batch]:
        """``sample_size`` weak target batches; all training parcels once when the tile holds fewer.
        (Their labels stay unread unless an estimator is the ACC oracle.)"""
        size = self.config.batch_size
        parcels = self.target.split.train
        wanted = self.config.sample_size * size
        chosen = torch.as_tensor(rng.permutation(parcels)[: min(wanted, len(parcels))], device=self.views.target.device)
        return [self.views.target.weak(chosen[start : start + size]).to(self.device)
                for start in range(0, len(chosen), size)]

    def _estimate(self, batches, low: int, high: int, estimator: str, epoch: int, logs: list[str]) -> int:
        scores = estimate_shift(self.teacher, batches, range(low, high + 1), estimator, self.class_prior)
        self.shift_scores.append(scores)
        logs.append(f"{estimator.upper()} shift estimate {scores.estimate:+d} days (searched [{low}, {high}])")
        return scores.estimate

    def start_epoch(self, epoch: int, rng: np.random.Generator, logs: list[str]) -> dict[str, float]:
        cfg = self.config
        batches = self._estimation_batches(rng)
        n_parcels = sum(len(b) for b in batches)
        if n_parcels < cfg.sample_size * cfg.batch_size:
            logs.append(f"shift estimation uses all {n_parcels} target training parcels "
                        f"(fewer than sample_size x batch_size = {cfg.sample_size * cfg.batch_size})")
        if self.search_range is None:  # initialisation
            d0 = self._estimate(batches, -cfg.max_temporal_shift, cfg.max_temporal_shift, cfg.init_estimator, epoch, logs)
            self.search_range = (0, cfg.max_temporal_shift) if d0 >= 0 else (-cfg.max_temporal_shift, 0)
            # the class prior from the pseudo-labels of the target's training parcels (their
            # fixed evaluation sample: uniform, their labels are not read)
            prior_parcels = self.target.evaluation_sample(self.target.split.train, "train", by_class=False)
            probs, _ = predict(self.teacher, self.target, prior_parcels, self.device, shift=d0)
            self.class_prior = histogram(probs.argmax(1), len(self.source.classes))
        d = self._estimate(batches, *self.search_range, cfg.estimator, epoch, logs)
        if not self.narrowed:
            self.search_range = (min(d, 0), max(d, 0))
            self.narrowed = True
        self.set_shifts(d, -d if cfg.source_shift else 0)
        return {"estimated_shift": float(d)}

    def extra_state(self) -> dict[str, Any]:
        state = super().extra_state()
        state.update(
            search_range=None if self.search_range is None else list(self.search_range),
            narrowed=self.narrowed,
            shift_scores=[s.to_dict() for s in self.shift_scores],
        )
        return state

    def load_extra_state(self, state: dict[str, Any]) -> None:
        super().load_extra_state(state)
        self.search_range = None if state["search_range"] is None else tuple(state["search_range"])
        self.narrowed = bool(state["narrowed"])
        self.shift_scores = [
            ShiftScores(np.asarray(s["shifts"]), np.asarray(s["scores"]), s["estimator"], s["estimate"])
            for s in state["shift_scores"]
        ]

    def info(self) -> MethodInfo:
        return MethodInfo(shift_scores=tuple(s.to_dict() for s in self.shift_scores),
                          estimated_shift=int(self.target_shift))

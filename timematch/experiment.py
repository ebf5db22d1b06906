"""Run one experiment with the library alone (no Ray, no MLflow).

An experiment is (source tile, target tile, method, fold, config). Every adaptation method
starts from a source model trained with source-only training on the source tile's train
split (best epoch by source validation macro F1); :func:`pretrain_source` trains it and
:func:`run_experiment` adapts it to the target tile and evaluates on the target test split.

The distributed runner (:mod:`timematch.runner`) calls exactly these functions inside
Ray Tune trials; tests and notebooks call them directly::

    spec = ExperimentSpec(data_root=root, source="DK", target="FR1", method="timematch")
    pretrained = pretrain_source(spec)
    result = run_experiment(spec, pretrained)
    print(result.metrics["test_macro_f1"])
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from timematch.data.dataset import DataConfig

#: Metrics every epoch report may carry (a method reports the ones that apply to it).
EPOCH_METRICS = (
    "train_loss",
    "target_val_f1",  # macro F1 on the target validation split (uses target labels)
    "source_val_f1",  # macro F1 on the source validation split (no target labels)
    "target_im_score",  # information maximisation on target train (no target labels)
    "estimated_shift",
    "pseudo_label_count",
    "pseudo_label_f1",  # analysis only
    "lr",
)

#: Metrics of the final evaluation on the target test split (reported, never used for selection).
TEST_METRICS = ("test_macro_f1", "test_accuracy", "test_weighted_f1", "test_kappa")


@dataclass(frozen=True)
class ExperimentSpec:
    """Everything that defines one experiment.

    ``source`` and ``target`` are short tile names (DK, FR1, FR2, AT1) or
    ``country/tile/year`` paths. ``method_config`` overrides the method's published
    defaults; ``pretrain_config`` overrides source-only training's defaults for the
    source model the method starts from.
    """

    data_root: Path
    source: str
    target: str
    method: str
    fold: int = 0
    method_config: Mapping[str, Any] = field(default_factory=dict)
    pretrain_config: Mapping[str, Any] = field(default_factory=dict)
    data: DataConfig = field(default_factory=DataConfig)
    model: str = "pse_ltae"
    seed: int = 0
    device: str | None = None  # None: CUDA when present, else CPU
    cache_dir: Path | None = None

    def replace(self, **changes: Any) -> "ExperimentSpec":
        return dataclasses.replace(self, **changes)


@dataclass
class EpochReport:
    """What one epoch of training produced: ``epoch`` counts from 1."""

    epoch: int
    metrics: dict[str, float]
    logs: list[str] = field(default_factory=list)


#: ``on_epoch(report, state)``: ``state()`` returns a checkpoint (tensors and plain Python
#: values only, loadable with ``torch.load(weights_only=True)``) to resume from.
EpochCallback = Callable[[EpochReport, Callable[[], dict]], None]


@dataclass
class PretrainedSource:
    """A source model trained with source-only training, as adaptation methods start from it.

    ``state_dict`` holds the weights of the best epoch by source validation macro F1;
    ``normalizer`` the per-band statistics used for both domains; ``key`` identifies the
    inputs it was trained from (see :func:`pretrain_key`).
    """

    key: str
    classes: list[str]
    state_dict: dict[str, Any]
    normalizer: dict[str, Any]
    history: list[EpochReport]
    best_epoch: int
    source_val_f1: float
    info: dict[str, Any] = field(default_factory=dict)

    def save(self, path: Path) -> Path:
        """Write to ``path`` (a ``.pt`` file loadable with ``torch.load(weights_only=True)``)."""
        raise NotImplementedError

    @classmethod
    def load(cls, path: Path) -> "PretrainedSource":
        """Read a file written by :meth:`save`, safely (no arbitrary unpickling)."""
        raise NotImplementedError


@dataclass
class ExperimentResult:
    """The outcome of one experiment.

    ``metrics`` holds the final target-test metrics (:data:`TEST_METRICS`) and the last
    epoch's selection metrics; ``report`` the per-class precision/recall/F1/support;
    ``confusion`` the confusion matrix (rows true, columns predicted, in ``classes`` order);
    ``shift_scores`` for shift-estimating methods: one entry per estimation with
    ``shifts``, ``scores``, ``estimator`` and ``estimate``.
    """

    spec: ExperimentSpec
    classes: list[str]
    metrics: dict[str, float]
    report: dict[str, dict[str, float]]
    confusion: Any  # np.ndarray (K, K)
    history: list[EpochReport]
    model: Any  # torch.nn.Module, on CPU, eval mode
    config: dict[str, Any]
    shift_scores: list[dict[str, Any]] = field(default_factory=list)


def pretrain_key(spec: ExperimentSpec) -> str:
    """A stable hash of every input that determines the source model of ``spec``."""
    raise NotImplementedError


def pretrain_source(
    spec: ExperimentSpec,
    on_epoch: EpochCallback | None = None,
    resume_state: dict | None = None,
) -> PretrainedSource:
    """Train the source model of ``spec`` (source-only training on ``spec.source``, fold ``spec.fold``)."""
    raise NotImplementedError


def run_experiment(
    spec: ExperimentSpec,
    pretrained: PretrainedSource | None = None,
    on_epoch: EpochCallback | None = None,
    resume_state: dict | None = None,
) -> ExperimentResult:
    """Run ``spec.method`` from ``pretrained`` (trained here when None and the method needs it)."""
    raise NotImplementedError

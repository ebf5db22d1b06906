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

import copy
import dataclasses
import hashlib
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from timematch.checkpoint import atomic_torch_save, read_payload
from timematch.data.dataset import DataConfig, Domain, Normalizer, open_domains
from timematch.data.tiles import resolve_tile
from timematch.errors import ConfigError, DatasetError
from timematch.evaluation import pick_device, predict, score_labelled
from timematch.selection import CRITERIA, ORACLE, epoch_selection
from timematch.methods import build_config, get_method, source_model_method
from timematch.methods.base import MethodInfo
from timematch.models import build_model
from timematch.movement import MOVEMENT_METRICS, MovementProbe
from timematch.training import EpochCallback, EpochReport, Execution, StepPath, Timings, TrainingState, fit

logger = logging.getLogger("timematch")

#: Metrics every epoch report may carry (a method reports the ones that apply to it).
EPOCH_METRICS = (
    "train_loss",
    "target_val_f1",  # macro F1 on the target validation split (uses target labels)
    "source_val_f1",  # macro F1 on the source validation split (no target labels)
    "target_im_score",  # information maximisation on target validation predictions (no target labels)
    *(name for name in CRITERIA if name not in ("source_val_f1", "target_im_score")),  # timematch.selection
    "estimated_shift",
    "pseudo_label_count",
    "pseudo_label_f1",  # analysis only
    "lr",
    *MOVEMENT_METRICS,  # adaptation methods: how far the model moved from the source model (timematch.movement)
)

#: Metrics of the final evaluation on the target test split (reported, never used for selection).
TEST_METRICS = ("test_macro_f1", "test_accuracy", "test_weighted_f1", "test_kappa")


@dataclass(frozen=True)
class ExperimentSpec:
    """Everything that defines one experiment.

    ``source`` and ``target`` are short tile names (DK, FR1, FR2, AT1) or
    ``country/tile/year`` paths. ``method_config`` overrides the method's published
    defaults; ``pretrain_config`` overrides source-only training's defaults for the
    source model the method starts from. ``precision`` (``fp32``, ``bf16``) is part of what
    is computed; ``device``, ``cuda_graph`` and ``gpu_share`` only say how (see
    :class:`timematch.training.Execution`).
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
    precision: str = "fp32"
    cuda_graph: bool = True
    gpu_share: float = 1.0

    def __post_init__(self) -> None:
        self.execution()  # rejects a bad precision or share before any work

    def replace(self, **changes: Any) -> "ExperimentSpec":
        return dataclasses.replace(self, **changes)

    def execution(self) -> Execution:
        return Execution(precision=self.precision, cuda_graph=self.cuda_graph, gpu_share=self.gpu_share)


@dataclass
class PretrainedSource:
    """A source model trained with source-only training, as adaptation methods start from it.

    ``state_dict`` holds the weights of the best epoch by source validation macro F1;
    ``normalizer`` the per-band statistics used for both domains; ``key`` identifies the
    inputs it was trained from (:attr:`SourceTraining.key`).
    """

    key: str
    classes: list[str]
    state_dict: dict[str, Any]
    normalizer: dict[str, Any]
    history: list[EpochReport]
    best_epoch: int
    source_val_f1: float
    #: the training's full config, where its time went and how its steps ran
    config: dict[str, Any] = field(default_factory=dict)
    timings: Timings = field(default_factory=Timings)
    step_path: StepPath = field(default_factory=StepPath)

    def save(self, path: Path) -> Path:
        """Write to ``path`` atomically (a ``.pt`` file loadable with ``torch.load(weights_only=True)``)."""
        path = Path(path)
        payload = {
            "format": 1,
            "key": self.key,
            "classes": list(self.classes),
            "state_dict": self.state_dict,
            "normalizer": self.normalizer,
            "history": [h.to_dict() for h in self.history],
            "best_epoch": self.best_epoch,
            "source_val_f1": self.source_val_f1,
            "info": json.loads(json.dumps({"timings": self.timings.to_dict(), "config": self.config,
                                           "step_path": self.step_path.to_dict()}, default=str)),
        }
        atomic_torch_save(payload, path)
        return path

    @classmethod
    def load(cls, path: Path) -> "PretrainedSource":
        """Read a file written by :meth:`save`, safely (``weights_only``: no arbitrary unpickling)."""
        payload = read_payload(path, "source-model file")
        if payload.get("format") != 1:
            raise DatasetError(f"{path}: not a source-model file written by this version")
        info = payload["info"]
        return cls(
            key=payload["key"],
            classes=list(payload["classes"]),
            state_dict=payload["state_dict"],
            normalizer=payload["normalizer"],
            history=[EpochReport.from_dict(h) for h in payload["history"]],
            best_epoch=int(payload["best_epoch"]),
            source_val_f1=float(payload["source_val_f1"]),
            config=dict(info.get("config", {})),
            timings=Timings.from_dict(info.get("timings", {})),
            step_path=StepPath.from_dict(info.get("step_path", {})),
        )


@dataclass
class ExperimentResult:
    """The outcome of one experiment.

    ``metrics`` holds the final target-test metrics (:data:`TEST_METRICS`) and the final
    model's selection metrics (``target_val_f1`` and every criterion of :mod:`timematch.selection`);
    ``report`` the per-class precision/recall/F1/support; ``confusion`` the confusion
    matrix (rows true, columns predicted, in ``classes`` order); ``shift_scores`` for
    shift-estimating methods: one entry per estimation with ``shifts``, ``scores``,
    ``estimator`` and ``estimate``; ``normalizer`` the band statistics the model reads its
    inputs with (:meth:`Normalizer.to_dict`), which prediction needs
    (:class:`timematch.serving.ParcelPredictor`); ``predictions`` the class index it predicts
    for each labelled parcel of the target test split, in the split's order (what the report
    compares between methods). An adaptation method's ``metrics`` also hold how far its
    returned model moved from the source model (:data:`~timematch.movement.MOVEMENT_METRICS`).
    """

    spec: ExperimentSpec
    classes: list[str]
    metrics: dict[str, float]
    report: dict[str, dict[str, float]]
    confusion: np.ndarray
    history: list[EpochReport]
    model: torch.nn.Module
    config: dict[str, Any]
    shift_scores: list[dict[str, Any]] = field(default_factory=list)
    timings: Timings = field(default_factory=Timings)
    normalizer: dict[str, Any] = field(default_factory=dict)
    step_path: StepPath = field(default_factory=StepPath)
    predictions: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int16))


@dataclass(frozen=True)
class SourceTraining:
    """The training on the source tile alone (stage 1) that a trial starts from or evaluates.

    ``method`` is whose training it is: the source-model method's for *the source model*
    (:attr:`is_source_model`), which adaptation methods start from and the source-only baseline
    evaluates; or a method trained from scratch on the source alone (shift augmentation), whose
    trials evaluate their own training. ``spec`` is that training as a spec of the source-model
    method, its ``method_config`` fully resolved: it reads nothing of the target, so one
    training serves every target of the source tile. ``key`` names it (and its cached model).
    """

    spec: ExperimentSpec
    method: str
    key: str

    @property
    def is_source_model(self) -> bool:
        return self.method == self.spec.method


def source_training(spec: ExperimentSpec) -> SourceTraining | None:
    """Which training on the source tile alone the trial ``spec`` uses; None for a method that
    uses none (the upper bound: trained from scratch on the target). The one rule, for the
    plan's stage-1 tasks, the trials' tags and :func:`run_experiment`:

    - the source-only baseline (``evaluates_source_model``) evaluates the source model trained
      with ``pretrain_config`` and its own config;
    - a method trained from scratch on the source alone
      (:meth:`~timematch.methods.base.Method.trained_on_source_alone`: ``shift_aug``) evaluates
      its own training, with its config: being the source-model method's training with that
      config, it shares its key and cache;
    - an adaptation method (``starts_from_source``) starts from the source model trained with
      ``pretrain_config``.
    """
    model_method = source_model_method().name
    method = get_method(spec.method)
    if method.evaluates_source_model:
        whose, overrides = model_method, {**spec.pretrain_config, **spec.method_config}
    elif method.trained_on_source_alone():
        whose, overrides = spec.method, dataclasses.asdict(build_config(spec.method, spec.method_config))
    elif method.starts_from_source:
        whose, overrides = model_method, dict(spec.pretrain_config)
    else:
        return None
    training = spec.replace(method=model_method, method_config=overrides, pretrain_config=overrides,
                            target=spec.source)
    return SourceTraining(spec=training, method=whose, key=_training_key(training))


def _training_key(p: ExperimentSpec) -> str:
    """A stable hash of every input that determines the training ``p`` (a spec of the
    source-model method): the key of its cached model."""
    inputs = {
        # 2: batches drawn on the device (timematch.data.views): the same inputs train another model
        "version": 2,
        "data_root": str(Path(p.data_root).expanduser().resolve()),
        "source": resolve_tile(p.source),
        "fold": p.fold,
        "seed": p.seed,
        "model": p.model,
        "data": dataclasses.asdict(p.data),
        "config": dataclasses.asdict(build_config(p.method, p.method_config)),
    }
    if p.precision != "fp32":
        inputs["precision"] = p.precision
    text = json.dumps(inputs, sort_keys=True, default=str)
    return f"{resolve_tile(p.source).replace('/', '_')}-fold{p.fold}-{hashlib.sha256(text.encode()).hexdigest()[:16]}"


def _seed(spec: ExperimentSpec) -> int:
    return int(spec.seed) * 1000 + int(spec.fold)


def _open(spec: ExperimentSpec, target: str | None = None, pretrained: PretrainedSource | None = None
          ) -> tuple[Domain, Domain]:
    """The domains of ``spec``; normalised as ``pretrained`` (a source model) was, when given."""
    return open_domains(
        Path(spec.data_root), spec.source, target or spec.target, spec.fold, spec.data, spec.cache_dir,
        progress=logger.info, normalizer=None if pretrained is None else Normalizer.from_dict(pretrained.normalizer),
    )


def pretrain_source(
    spec: ExperimentSpec,
    on_epoch: EpochCallback | None = None,
    resume_state: TrainingState | None = None,
    target: Domain | None = None,
) -> PretrainedSource:
    """Train on the source tile alone (:func:`source_training`: the source model of ``spec``,
    or a source-only or shift-augmented training), fold ``spec.fold``, keeping the epoch with
    the best source validation macro F1.

    ``target``: a target domain to compute the epochs' target criteria on (a trial of one
    scenario); without one, the epochs log source metrics only. The target is only evaluated,
    never trained on: the same inputs give the same model with any target or none."""
    training = source_training(spec)
    if training is None:
        raise ConfigError(f"{spec.method} trains on no source model: it is trained from scratch by run_experiment")
    p = training.spec
    config = build_config(p.method, p.method_config)
    device = pick_device(p.device)
    source, _ = _open(p, target=p.source)
    torch.manual_seed(_seed(p))
    model = build_model(p.model, num_classes=len(source.classes)).to(device)
    method = get_method(p.method)(config, model, source, source if target is None else target, device)
    logger.info("pretraining on %s (fold %d, %d classes) on %s", source.tile, p.fold, len(source.classes), device)
    fitted = fit(method, _seed(p), on_epoch, resume_state, log=logger.info, execution=p.execution())
    return PretrainedSource(
        key=training.key,
        classes=list(source.classes),
        state_dict={k: v.detach().cpu() for k, v in model.state_dict().items()},
        normalizer=source.normalizer.to_dict(),
        history=fitted.history,
        best_epoch=int(fitted.best_epoch),
        source_val_f1=float(fitted.best_value),
        config=dataclasses.asdict(config),
        timings=fitted.timings,
        step_path=fitted.step_path,
    )


def run_experiment(
    spec: ExperimentSpec,
    pretrained: PretrainedSource | None = None,
    on_epoch: EpochCallback | None = None,
    resume_state: TrainingState | None = None,
) -> ExperimentResult:
    """Run ``spec.method`` from ``pretrained`` (trained here when None and the method needs it),
    then evaluate once on the target test split.

    A method trained on the source alone (``source_only``, ``shift_aug``: one training per
    source tile serves every scenario of it) reuses ``pretrained`` when it is this trial's
    training (:func:`source_training`) and only evaluates it (one epoch report carries its
    selection metrics); otherwise it trains it here.
    """
    method_cls = get_method(spec.method)
    config = build_config(spec.method, spec.method_config)  # rejects bad keys and ranges before any work
    if method_cls.trained_on_source_alone():
        device = pick_device(spec.device)
        source, target = _open(spec)
        training = source_training(spec)
        if pretrained is None or pretrained.key != training.key:
            pretrained = pretrain_source(spec, on_epoch, resume_state, target=target)
            history, best_epoch = pretrained.history, pretrained.best_epoch
        else:
            history, best_epoch = [], 0
        model = _from_pretrained(spec, pretrained, source, target, device)
        if not history:
            report = EpochReport(epoch=1, metrics=epoch_selection(model, source, target, device, _seed(spec)),
                                 logs=[f"reused the training {pretrained.key} on the source tile"])
            history = [report]
            if on_epoch:
                on_epoch(report, lambda: None)
        return _evaluated(spec, config, model, source, target, device, history, best_epoch, pretrained.timings,
                          pretrained.step_path, MethodInfo(), None)
    trial = build_trial(spec, pretrained)
    logger.info("%s: %s -> %s, fold %d, on %s", spec.method, trial.source.tile, trial.target.tile, spec.fold,
                trial.device)
    fitted = fit(trial.method, trial.seed, on_epoch, resume_state, log=logger.info, execution=spec.execution(),
                 measure=trial.measure)
    return trial.evaluate(fitted)


@dataclass
class Trial:
    """A trial of a method that trains (not one that evaluates a training on the source alone),
    built and ready to train: its method (the model inside), domains and device, and the probe of
    how far it moves from its source model. :func:`run_experiment` trains it with
    :func:`~timematch.training.fit`; an array of trials (:func:`timematch.arrays.fit_array`)
    trains several; :meth:`evaluate` turns the training into the :class:`ExperimentResult`."""

    spec: ExperimentSpec
    config: Any
    method: Any
    source: Domain
    target: Domain
    device: torch.device
    probe: MovementProbe | None

    @property
    def seed(self) -> int:
        """The seed its training draws from (the spec's seed and fold)."""
        return _seed(self.spec)

    def measure(self) -> dict[str, float]:
        return {} if self.probe is None else self.probe.measure(self.method.eval_model())

    def evaluate(self, fitted: Any) -> ExperimentResult:
        """The result of the training ``fitted`` (a :class:`~timematch.training.FitResult`)."""
        method = self.method
        best_epoch = fitted.best_epoch if method.select_best_by else 0
        return _evaluated(self.spec, self.config, method.eval_model(), self.source, self.target, self.device,
                          fitted.history, best_epoch, fitted.timings, fitted.step_path, method.info(), self.probe)


def build_trial(spec: ExperimentSpec, pretrained: PretrainedSource | None = None) -> Trial:
    """The :class:`Trial` of ``spec`` (a method that trains), from ``pretrained`` when it starts
    from the source model (trained here when None). The random stream is seeded from the spec
    before the method builds its own modules, so a trial builds the same wherever it runs."""
    return build_trials([spec], pretrained)[0]


def build_trials(specs: list[ExperimentSpec], pretrained: PretrainedSource | None = None) -> list[Trial]:
    """:func:`build_trial` of each of ``specs``, which differ only in the method's config (the
    members of an array of trials, :mod:`timematch.arrays`): the tiles are opened, and the source
    model's test predictions (the movement probe's baseline) made, once for all of them."""
    first = specs[0]
    if any(s.replace(method_config=first.method_config) != first for s in specs):
        raise ValueError("build_trials: the specs differ in more than the method's config")
    method_cls = get_method(first.method)
    device = pick_device(first.device)
    if method_cls.starts_from_source and pretrained is None:
        pretrained = pretrain_source(first)
    source, target = _open(first, pretrained=pretrained if method_cls.starts_from_source else None)
    probe, start = None, None
    if method_cls.starts_from_source:
        start = _from_pretrained(first, pretrained, source, target, device)
        probe = MovementProbe(start, target, device)  # a copy of the source model: the methods change theirs
    trials = []
    for spec in specs:
        config = build_config(spec.method, spec.method_config)
        if start is not None:
            model = copy.deepcopy(start)
        else:
            torch.manual_seed(_seed(spec))
            model = build_model(spec.model, num_classes=len(source.classes)).to(device)
        torch.manual_seed(_seed(spec))
        method = method_cls(config, model, source, target, device)
        trials.append(Trial(spec, config, method, source, target, device, probe))
    return trials


def _evaluated(spec: ExperimentSpec, config: Any, model: torch.nn.Module, source: Domain, target: Domain,
               device: torch.device, history: list[EpochReport], best_epoch: int, timings: Timings,
               step_path: StepPath, info: MethodInfo, probe: MovementProbe | None) -> ExperimentResult:
    """Evaluate ``model`` once on the target test split: the experiment's result."""
    probs, labels = predict(model, target, target.labelled("test"), device)
    test = score_labelled(probs, labels, target.classes)
    metrics = {f"test_{k}": test[k] for k in ("macro_f1", "accuracy", "weighted_f1", "kappa")}
    # the selection metrics of the returned model: its best epoch when the method keeps one
    by_epoch = {h.epoch: h for h in history}
    chosen = by_epoch.get(best_epoch) or (history[-1] if history else None)
    for key in (ORACLE, *CRITERIA):
        if chosen is not None and key in chosen.metrics:
            metrics[key] = chosen.metrics[key]
    if info.estimated_shift is not None:
        metrics["estimated_shift"] = float(info.estimated_shift)
    if probe is not None:
        metrics.update(probe.measure(model, predictions=probs.argmax(1)))
    model = model.to("cpu").eval()
    return ExperimentResult(
        spec=spec, classes=list(source.classes), metrics=metrics, report=test["report"],
        confusion=test["confusion"], history=history, model=model, config=dataclasses.asdict(config),
        shift_scores=list(info.shift_scores), timings=timings, normalizer=target.normalizer.to_dict(),
        step_path=step_path, predictions=probs.argmax(1).astype(np.int16),
    )


def _from_pretrained(
    spec: ExperimentSpec, pretrained: PretrainedSource, source: Domain, target: Domain, device: torch.device
) -> torch.nn.Module:
    if list(pretrained.classes) != list(source.classes):
        raise ConfigError(
            f"source model {pretrained.key} was trained on classes {pretrained.classes}, but this experiment's "
            f"class list is {source.classes}; retrain it (delete the cached file) or use the same data settings"
        )
    normalizer = Normalizer.from_dict(pretrained.normalizer)
    source.normalizer = target.normalizer = normalizer
    model = build_model(spec.model, num_classes=len(source.classes))
    model.load_state_dict(pretrained.state_dict)
    return model.to(device)

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
import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from timematch.data.dataset import DataConfig, Domain, Normalizer, open_domains
from timematch.data.tiles import resolve_tile
from timematch.errors import ConfigError, DatasetError
from timematch.evaluation import evaluate, pick_device
from timematch.selection import CRITERIA, ORACLE, epoch_selection
from timematch.methods import build_config, get_method, source_model_method
from timematch.models import build_model
from timematch.training import EpochCallback, EpochReport, Execution, fit

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
        """Write to ``path`` atomically (a ``.pt`` file loadable with ``torch.load(weights_only=True)``)."""
        path = Path(path)
        payload = {
            "format": 1,
            "key": self.key,
            "classes": list(self.classes),
            "state_dict": self.state_dict,
            "normalizer": self.normalizer,
            "history": [{"epoch": h.epoch, "metrics": h.metrics, "logs": h.logs} for h in self.history],
            "best_epoch": self.best_epoch,
            "source_val_f1": self.source_val_f1,
            "info": json.loads(json.dumps(self.info, default=str)),
        }
        atomic_torch_save(payload, path)
        return path

    @classmethod
    def load(cls, path: Path) -> "PretrainedSource":
        """Read a file written by :meth:`save`, safely (``weights_only``: no arbitrary unpickling)."""
        try:
            payload = torch.load(Path(path), map_location="cpu", weights_only=True)
        except Exception as err:
            raise DatasetError(f"{path}: not a readable source-model file ({type(err).__name__}: {err})") from None
        if not isinstance(payload, dict) or payload.get("format") != 1:
            raise DatasetError(f"{path}: not a source-model file written by this version")
        return cls(
            key=payload["key"],
            classes=list(payload["classes"]),
            state_dict=payload["state_dict"],
            normalizer=payload["normalizer"],
            history=[EpochReport(**h) for h in payload["history"]],
            best_epoch=int(payload["best_epoch"]),
            source_val_f1=float(payload["source_val_f1"]),
            info=payload["info"],
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
    (:class:`timematch.serving.ParcelPredictor`).
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
    timings: dict[str, float] = field(default_factory=dict)
    normalizer: dict[str, Any] = field(default_factory=dict)
    #: How the training steps ran: ``path`` (``cuda_graph`` or ``eager``), ``reason``,
    #: ``placement`` (where the tiles were), ``precision``.
    step_path: dict[str, str] = field(default_factory=dict)


def atomic_torch_save(obj: Any, path: Path) -> None:
    """``torch.save`` to a temporary sibling, then rename: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def source_training_spec(spec: ExperimentSpec) -> ExperimentSpec:
    """The training on the source tile alone that ``spec`` evaluates or starts from, as a spec
    of the source-model method (its ``method_config`` fully resolved).

    - an adaptation method (``starts_from_source``): the source model it starts from, trained
      with ``pretrain_config``;
    - a method trained from scratch on the source alone
      (:meth:`~timematch.methods.base.Method.trained_on_source_alone`: ``source_only``,
      ``shift_aug``): its own training, with its config. It reads nothing of the target, so
      one training serves every target of the source tile; being the source-model method's
      training with that config, it shares its key (:func:`pretrain_key`) and cache.
    """
    name = source_model_method().name
    method = get_method(spec.method)
    if method.evaluates_source_model:
        overrides = {**spec.pretrain_config, **spec.method_config}
    elif method.trained_on_source_alone():
        overrides = dataclasses.asdict(build_config(spec.method, spec.method_config))
    else:
        overrides = dict(spec.pretrain_config)
    return spec.replace(method=name, method_config=overrides, pretrain_config=overrides, target=spec.source)


def pretrain_key(spec: ExperimentSpec) -> str:
    """A stable hash of every input that determines the source-tile training of ``spec``
    (:func:`source_training_spec`): the key of its cached model."""
    p = source_training_spec(spec)
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


def _open(spec: ExperimentSpec, target: str | None = None) -> tuple[Domain, Domain]:
    return open_domains(
        Path(spec.data_root), spec.source, target or spec.target, spec.fold, spec.data, spec.cache_dir,
        progress=logger.info,
    )


def pretrain_source(
    spec: ExperimentSpec,
    on_epoch: EpochCallback | None = None,
    resume_state: dict | None = None,
    target: Domain | None = None,
) -> PretrainedSource:
    """Train on the source tile alone (:func:`source_training_spec`: the source model of
    ``spec``, or a source-only or shift-augmented training), fold ``spec.fold``, keeping the
    epoch with the best source validation macro F1.

    ``target``: a target domain to compute the epochs' target criteria on (a trial of one
    scenario); without one, the epochs log source metrics only. The target is only evaluated,
    never trained on: the same inputs give the same model with any target or none."""
    p = source_training_spec(spec)
    config = build_config(p.method, p.method_config)
    device = pick_device(p.device)
    source, _ = _open(p, target=p.source)
    torch.manual_seed(_seed(p))
    model = build_model(p.model, num_classes=len(source.classes)).to(device)
    method = get_method(p.method)(config, model, source, source if target is None else target, device)
    logger.info("pretraining on %s (fold %d, %d classes) on %s", source.tile, p.fold, len(source.classes), device)
    outcome = fit(method, _seed(p), on_epoch, resume_state, log=logger.info, execution=p.execution())
    return PretrainedSource(
        key=pretrain_key(spec),
        classes=list(source.classes),
        state_dict={k: v.detach().cpu() for k, v in model.state_dict().items()},
        normalizer=source.normalizer.to_dict(),
        history=outcome["history"],
        best_epoch=int(outcome["best_epoch"]),
        source_val_f1=float(outcome["best_value"]),
        info={"timings": outcome["timings"], "config": dataclasses.asdict(config), "step_path": outcome["step_path"]},
    )


def run_experiment(
    spec: ExperimentSpec,
    pretrained: PretrainedSource | None = None,
    on_epoch: EpochCallback | None = None,
    resume_state: dict | None = None,
) -> ExperimentResult:
    """Run ``spec.method`` from ``pretrained`` (trained here when None and the method needs it),
    then evaluate once on the target test split.

    A method trained on the source alone (``source_only``, ``shift_aug``: one training per
    source tile serves every scenario of it) reuses ``pretrained`` when its key is this
    training's (:func:`pretrain_key`) and only evaluates it (one epoch report carries its
    selection metrics); otherwise it trains it here.
    """
    method_cls = get_method(spec.method)
    config = build_config(spec.method, spec.method_config)  # rejects bad keys and ranges before any work
    device = pick_device(spec.device)
    source, target = _open(spec)
    timings: dict[str, float] = {}
    info: dict[str, Any] = {}
    if method_cls.trained_on_source_alone():
        if pretrained is None or pretrained.key != pretrain_key(spec):
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
                on_epoch(report, lambda: {})
        timings = pretrained.info.get("timings", {})
        step_path = pretrained.info.get("step_path", {})
    else:
        if method_cls.starts_from_source:
            if pretrained is None:
                pretrained = pretrain_source(spec)
            model = _from_pretrained(spec, pretrained, source, target, device)
        else:
            torch.manual_seed(_seed(spec))
            model = build_model(spec.model, num_classes=len(source.classes)).to(device)
        method = method_cls(config, model, source, target, device)
        logger.info("%s: %s -> %s, fold %d, on %s", spec.method, source.tile, target.tile, spec.fold, device)
        outcome = fit(method, _seed(spec), on_epoch, resume_state, log=logger.info, execution=spec.execution())
        history, timings, info = outcome["history"], outcome["timings"], method.info()
        step_path = outcome["step_path"]
        best_epoch = outcome["best_epoch"] if method_cls.select_best_by else 0
        model = method.eval_model()
    test = evaluate(model, target, "test", device)
    metrics = {f"test_{k}": test[k] for k in ("macro_f1", "accuracy", "weighted_f1", "kappa")}
    # the selection metrics of the returned model: its best epoch when the method keeps one
    by_epoch = {h.epoch: h for h in history}
    chosen = by_epoch.get(best_epoch) or (history[-1] if history else None)
    for key in (ORACLE, *CRITERIA):
        if chosen is not None and key in chosen.metrics:
            metrics[key] = chosen.metrics[key]
    if "estimated_shift" in info:
        metrics["estimated_shift"] = float(info["estimated_shift"])
    model = model.to("cpu").eval()
    return ExperimentResult(
        spec=spec, classes=list(source.classes), metrics=metrics, report=test["report"],
        confusion=test["confusion"], history=history, model=model, config=dataclasses.asdict(config),
        shift_scores=info.get("shift_scores", []), timings=timings, normalizer=target.normalizer.to_dict(),
        step_path=step_path,
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

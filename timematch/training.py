"""The training loop every method shares: epochs, evaluation, checkpoints.

A method (see :mod:`timematch.methods.base`) says what one step computes; this module
builds its optimisers (from the method's parameter groups and config), places its tiles
(:func:`timematch.data.views.place_views`: on the GPU when they fit), hands the steps to a
:class:`~timematch.step_engine.StepEngine` (eager, or one CUDA graph replayed; nothing read
back to the host inside an epoch), switches the method's modules between train and eval
mode, stops on a non-finite loss (at the end of its epoch, naming the first bad step),
evaluates each epoch, keeps the best epoch when the method asks for it, and hands a
resumable :class:`~timematch.checkpoint.TrainingState` to the caller's ``on_epoch`` callback.
Its result is a :class:`FitResult` (history, best epoch, :class:`Timings`, :class:`StepPath`);
:class:`StepContext` is the engine's, :class:`Execution` (how a training runs: precision, CUDA
graph, GPU share) :mod:`timematch.execution`'s.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from timematch.checkpoint import BestEpoch, EpochReport, TrainingState, snapshot
from timematch.data.views import place_views
from timematch.errors import NonFiniteLoss
from timematch.execution import PRECISIONS, Execution
from timematch.selection import epoch_selection
from timematch.step_engine import LearningRate, StepContext, StepEngine, build_optimizer

__all__ = ["Execution", "EpochReport", "EpochCallback", "FitResult", "StepContext", "StepPath", "Timings",
           "TrainingState", "fit", "prepare", "PRECISIONS"]


@dataclass(frozen=True)
class StepPath:
    """How a training's steps ran: ``path`` (``cuda_graph`` or ``eager``), ``reason`` (why a
    GPU run fell back to eager, say), ``placement`` (where its tiles were), ``precision``."""

    path: str = ""
    reason: str = ""
    placement: str = ""
    precision: str = ""

    def to_dict(self) -> dict[str, str]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> StepPath:
        return cls(**{f.name: str(values.get(f.name, "")) for f in dataclasses.fields(cls)})


@dataclass
class Timings:
    """Where a training's time went: seconds in its steps, seconds waiting for batches, steps."""

    step_seconds: float = 0.0
    data_wait_seconds: float = 0.0
    steps: int = 0

    def to_dict(self) -> dict[str, float]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Timings:
        return cls(**{f.name: values[f.name] for f in dataclasses.fields(cls) if f.name in values})


@dataclass
class FitResult:
    """What :func:`fit` returns: every epoch's report, the best epoch by the method's
    ``select_best_by`` (0 and -inf when it keeps none), where the time went, how the steps ran."""

    history: list[EpochReport]
    best_epoch: int
    best_value: float
    timings: Timings
    step_path: StepPath


#: ``on_epoch(report, state)``: ``state()`` captures a :class:`TrainingState` to resume from
#: (None after an epoch that only evaluated: there is nothing to resume).
EpochCallback = Callable[[EpochReport, Callable[[], "TrainingState | None"]], None]


#: Fault injection for the reliability tests (RELIABILITY.md): ``METHOD:EPOCH:STEP`` makes the
#: loss of that training step of that method NaN, as a diverging run's would become.
INJECT_NAN_VARIABLE = "TIMEMATCH_INJECT_NAN"


def injected_nan(method: str) -> tuple[int, int] | None:
    """(epoch, step) at which ``$TIMEMATCH_INJECT_NAN`` poisons ``method``'s loss, if it does."""
    value = os.environ.get(INJECT_NAN_VARIABLE, "")
    name, _, where = value.partition(":")
    epoch, _, step = where.partition(":")
    if name != method or not (epoch.isdigit() and step.isdigit()):
        return None
    return int(epoch), int(step)


def prepare(method: Any, seed: int, execution: Execution = Execution(),
            log: Callable[[str], None] | None = None) -> StepEngine:
    """Set ``method`` up to train and return the engine that runs its steps: its optimisers
    (``method.optimizers``), its tiles placed (``method.views``), the dates it can feed the
    model checked once, the random generators seeded from ``seed``. :func:`fit` starts here;
    so do benchmarks that drive the engine's epochs themselves."""
    config = method.config
    device = method.device
    steps = method.steps_per_epoch()
    total_steps = config.epochs * steps
    optimizers = {name: build_optimizer(config, groups, device) for name, groups in method.optimizer_groups().items()}
    if len(optimizers) > 1 and not method.manual_optimization:
        raise TypeError(f"{type(method).__name__} names {len(optimizers)} optimisers: set manual_optimization")
    method.optimizers = optimizers
    torch.manual_seed(seed)
    views = place_views(method.source, method.target, device, execution.gpu_share, seed)
    method.views = views
    method.check_date_range()
    poison = injected_nan(getattr(method, "name", type(method).__name__))
    return StepEngine(method, optimizers, LearningRate.of(config, total_steps), views, steps, total_steps,
                      precision=execution.precision, cuda_graph=execution.cuda_graph,
                      poison_step=None if poison is None else (poison[0] - 1) * steps + poison[1] - 1, log=log)


def fit(
    method: Any,
    seed: int,
    on_epoch: EpochCallback | None = None,
    resume_state: TrainingState | None = None,
    log: Callable[[str], None] | None = None,
    execution: Execution = Execution(),
    measure: Callable[[], dict[str, float]] | None = None,
) -> FitResult:
    """Train ``method`` (a :class:`timematch.methods.base.Method`; the methods build on this
    module, never the other way round) for its configured epochs.

    ``on_epoch(report, state)`` is called after every epoch with an :class:`EpochReport` and a
    function that captures the :class:`TrainingState`; ``resume_state`` is such a state to
    continue from (saved on either path, on either kind of device). When the method selects a
    best epoch (``select_best_by``), its weights are loaded into the model at the end.
    ``measure()``: more metrics of the model after each epoch's training, added to its report
    (never selected by: how far the weights moved, :mod:`timematch.movement`).
    """
    config = method.config
    steps = method.steps_per_epoch()
    engine = prepare(method, seed, execution, log)
    optimizers, views = method.optimizers, method.views
    rng = np.random.default_rng(seed)
    sampling = views.source.generator  # a background thread's generator (None: the device's default one)
    history: list[EpochReport] = []
    best = BestEpoch()
    start = 1
    if resume_state is not None:
        resume_state.restore(method, optimizers, rng, sampling)
        history, best, start = list(resume_state.history), resume_state.best, resume_state.epoch + 1
    engine.set_step((start - 1) * steps)
    timings = Timings()
    for epoch in range(start, config.epochs + 1):
        report, elapsed, waited = _epoch(method, engine, epoch, steps, rng, seed)
        if measure is not None:
            report.metrics.update(measure())
        timings.step_seconds += elapsed
        timings.data_wait_seconds += waited
        timings.steps += steps
        if method.select_best_by and report.metrics[method.select_best_by] > best.value:
            best = BestEpoch(epoch, float(report.metrics[method.select_best_by]), snapshot(method.eval_model()))
        history.append(report)
        if log:
            shown = ", ".join(f"{k} {v:.4g}" for k, v in report.metrics.items() if k in _SHOWN)
            log(f"epoch {epoch}/{config.epochs}: {shown}" + "".join(f"\n  {line}" for line in report.logs))
        if on_epoch:
            on_epoch(report, lambda epoch=epoch, best=best: TrainingState.capture(
                epoch, method, optimizers, rng, sampling, history, best))
    if method.select_best_by and best.state is not None:
        method.eval_model().load_state_dict(best.state)
    return FitResult(history=history, best_epoch=best.epoch, best_value=best.value, timings=timings,
                     step_path=StepPath(engine.path, engine.reason, views.placement, execution.precision))


def _epoch(method: Any, engine: StepEngine, epoch: int, steps: int, rng: np.random.Generator,
           seed: int) -> tuple[EpochReport, float, float]:
    """Train one epoch and evaluate it: its report, seconds in its steps, seconds waiting for data.
    Raises :class:`NonFiniteLoss` naming the first step whose loss was not finite."""
    logs: list[str] = []
    metrics = dict(method.start_epoch(epoch, rng, logs))
    method.set_train_mode()
    waited = engine.waited
    started = time.perf_counter()
    sums, first_bad, bad_loss = engine.run_epoch(steps)  # the epoch's one read back to the host
    elapsed = time.perf_counter() - started
    if first_bad >= 0:
        saved = f"the last checkpoint holds epoch {epoch - 1}" if epoch > 1 else "nothing was saved"
        step = first_bad - (epoch - 1) * steps + 1
        raise NonFiniteLoss(
            f"loss became {bad_loss} at epoch {epoch}, step {step}; {saved}. "
            "Lower the learning rate or check the input normalisation.", epoch, step, saved,
        )
    waited = engine.waited - waited
    metrics.update({key: value / steps for key, value in sums.items() if not key.endswith("_count")})
    metrics.update({key: value for key, value in sums.items() if key.endswith("_count")})
    metrics.update(method.end_epoch(epoch, logs))
    metrics.update(epoch_selection(method.eval_model(), method.source, method.target, method.device, seed))
    metrics["lr"] = engine.learning_rate()
    metrics["samples_per_second"] = steps * method.config.batch_size / max(elapsed, 1e-9)
    metrics["data_wait_fraction"] = waited / max(elapsed, 1e-9)
    return EpochReport(epoch=epoch, metrics=metrics, logs=logs), elapsed, waited


_SHOWN = ("train_loss", "target_val_f1", "source_val_f1", "estimated_shift", "pseudo_label_count", "samples_per_second")

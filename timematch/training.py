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
           "Training", "TrainingState", "fit", "prepare", "PRECISIONS"]


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
    """Where a training's time went: seconds in its steps, seconds waiting for batches, steps;
    seconds in the epochs' starts (a method's own work before the steps: TimeMatch's shift
    estimation) and in their evaluations (the selection criteria and the measurements)."""

    step_seconds: float = 0.0
    data_wait_seconds: float = 0.0
    steps: int = 0
    epoch_start_seconds: float = 0.0
    eval_seconds: float = 0.0

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
#: loss of that training step of that method NaN, as a diverging run's would become;
#: ``METHOD#N:EPOCH:STEP`` only that of trial number N of its group in an array of trials.
INJECT_NAN_VARIABLE = "TIMEMATCH_INJECT_NAN"


def injected_nan(method: str, number: int | None = None) -> tuple[int, int] | None:
    """(epoch, step) at which ``$TIMEMATCH_INJECT_NAN`` poisons ``method``'s loss, if it does
    (``number``: the trial's number in its group, for the ``METHOD#N`` form)."""
    value = os.environ.get(INJECT_NAN_VARIABLE, "")
    name, _, where = value.partition(":")
    name, _, member = name.partition("#")
    epoch, _, step = where.partition(":")
    if name != method or not (epoch.isdigit() and step.isdigit()) or (member and member != str(number)):
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
    optimizers = build_optimizers(method)
    torch.manual_seed(seed)
    views = place_views(method.source, method.target, device, execution.gpu_share, seed)
    method.views = views
    method.check_date_range()
    poison = injected_nan(getattr(method, "name", type(method).__name__))
    return StepEngine(method, optimizers, LearningRate.of(config, total_steps), views, steps, total_steps,
                      precision=execution.precision, cuda_graph=execution.cuda_graph,
                      poison_step=None if poison is None else (poison[0] - 1) * steps + poison[1] - 1, log=log)


def build_optimizers(method: Any) -> dict[str, torch.optim.Optimizer]:
    """``method``'s optimisers, from its parameter groups and config, set on it (``method.optimizers``)."""
    optimizers = {name: build_optimizer(method.config, groups, method.device)
                  for name, groups in method.optimizer_groups().items()}
    if len(optimizers) > 1 and not method.manual_optimization:
        raise TypeError(f"{type(method).__name__} names {len(optimizers)} optimisers: set manual_optimization")
    method.optimizers = optimizers
    return optimizers


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
    engine = prepare(method, seed, execution, log)
    training = Training(method, seed, engine.views, log, measure)
    if resume_state is not None:
        training.resume(resume_state)
    engine.set_step(training.start_step)
    for epoch in training.epochs():
        metrics, logs = training.begin_epoch(epoch)
        waited = engine.waited
        started = time.perf_counter()
        sums, first_bad, bad_loss = engine.run_epoch(training.steps)  # the epoch's one read back to the host
        elapsed = time.perf_counter() - started
        training.check_finite(epoch, first_bad, bad_loss)
        report = training.finish_epoch(epoch, metrics, logs, sums, elapsed, engine.waited - waited,
                                       engine.learning_rate())
        if on_epoch:
            on_epoch(report, training.state_capture(epoch))
    return training.result(engine.path, engine.reason, execution.precision)


class Training:
    """One method's training as the loop sees it between steps: its epochs, their reports,
    the best epoch, the timings, and its resumable state. :func:`fit` drives one with a
    :class:`~timematch.step_engine.StepEngine`; :func:`timematch.arrays.fit_array` drives
    several, whose steps run fused, with the same reports."""

    def __init__(self, method: Any, seed: int, views: Any, log: Callable[[str], None] | None = None,
                 measure: Callable[[], dict[str, float]] | None = None) -> None:
        self.method = method
        self.seed = seed
        self.views = views
        self.log = log
        self.measure = measure
        self.steps = method.steps_per_epoch()
        self.rng = np.random.default_rng(seed)
        self.sampling = views.source.generator  # a background thread's generator (None: the device's default one)
        self.history: list[EpochReport] = []
        self.best = BestEpoch()
        self.start = 1
        self.timings = Timings()

    @property
    def start_step(self) -> int:
        return (self.start - 1) * self.steps

    def resume(self, state: TrainingState) -> None:
        state.restore(self.method, self.method.optimizers, self.rng, self.sampling)
        self.history, self.best, self.start = list(state.history), state.best, state.epoch + 1

    def epochs(self) -> range:
        return range(self.start, self.method.config.epochs + 1)

    def begin_epoch(self, epoch: int) -> tuple[dict[str, float], list[str]]:
        """The method's start of the epoch (a shift estimate, say) and train mode: its metrics and log lines."""
        logs: list[str] = []
        started = time.perf_counter()
        metrics = dict(self.method.start_epoch(epoch, self.rng, logs))
        self.timings.epoch_start_seconds += time.perf_counter() - started
        self.method.set_train_mode()
        return metrics, logs

    def check_finite(self, epoch: int, first_bad: int, bad_loss: float) -> None:
        """Raise :class:`NonFiniteLoss` naming the first step whose loss was not finite (-1: none was)."""
        if first_bad < 0:
            return
        saved = f"the last checkpoint holds epoch {epoch - 1}" if epoch > 1 else "nothing was saved"
        step = first_bad - (epoch - 1) * self.steps + 1
        raise NonFiniteLoss(
            f"loss became {bad_loss} at epoch {epoch}, step {step}; {saved}. "
            "Lower the learning rate or check the input normalisation.", epoch, step, saved,
        )

    def finish_epoch(self, epoch: int, metrics: dict[str, float], logs: list[str], sums: dict[str, float],
                     elapsed: float, waited: float, learning_rate: float) -> EpochReport:
        """The epoch's report from its step sums: the method's end of the epoch, the selection
        criteria, the measurements; the best epoch kept; the epoch logged."""
        method, steps = self.method, self.steps
        metrics.update({key: value / steps for key, value in sums.items() if not key.endswith("_count")})
        metrics.update({key: value for key, value in sums.items() if key.endswith("_count")})
        metrics.update(method.end_epoch(epoch, logs))
        started = time.perf_counter()
        metrics.update(epoch_selection(method.eval_model(), method.source, method.target, method.device, self.seed))
        metrics["lr"] = learning_rate
        metrics["samples_per_second"] = steps * method.config.batch_size / max(elapsed, 1e-9)
        metrics["data_wait_fraction"] = waited / max(elapsed, 1e-9)
        report = EpochReport(epoch=epoch, metrics=metrics, logs=logs)
        if self.measure is not None:
            report.metrics.update(self.measure())
        self.timings.eval_seconds += time.perf_counter() - started
        self.timings.step_seconds += elapsed
        self.timings.data_wait_seconds += waited
        self.timings.steps += steps
        if method.select_best_by and report.metrics[method.select_best_by] > self.best.value:
            self.best = BestEpoch(epoch, float(report.metrics[method.select_best_by]), snapshot(method.eval_model()))
        self.history.append(report)
        if self.log:
            shown = ", ".join(f"{k} {v:.4g}" for k, v in report.metrics.items() if k in _SHOWN)
            self.log(f"epoch {epoch}/{method.config.epochs}: {shown}" + "".join(f"\n  {line}" for line in report.logs))
        return report

    def state_capture(self, epoch: int) -> Callable[[], TrainingState | None]:
        """A function that captures the state to resume from after ``epoch``."""
        method, history, best = self.method, list(self.history), self.best
        return lambda: TrainingState.capture(epoch, method, method.optimizers, self.rng, self.sampling, history, best)

    def result(self, path: str, reason: str, precision: str) -> FitResult:
        """The training's result; the best epoch's weights loaded when the method keeps one."""
        method = self.method
        if method.select_best_by and self.best.state is not None:
            method.eval_model().load_state_dict(self.best.state)
        return FitResult(history=self.history, best_epoch=self.best.epoch, best_value=self.best.value,
                         timings=self.timings, step_path=StepPath(path, reason, self.views.placement, precision))


_SHOWN = ("train_loss", "target_val_f1", "source_val_f1", "estimated_shift", "pseudo_label_count", "samples_per_second")

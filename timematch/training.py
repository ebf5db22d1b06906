"""The training loop every method shares: epochs, evaluation, checkpoints.

A method (see :mod:`timematch.methods.base`) says what one step computes; this module
builds its optimisers (from the method's parameter groups and config), places its tiles
(:func:`timematch.data.views.place_views`: on the GPU when they fit), hands the steps to a
:class:`~timematch.step_engine.StepEngine` (eager, or one CUDA graph replayed; nothing read
back to the host inside an epoch), switches the method's modules between train and eval
mode, stops on a non-finite loss (at the end of its epoch, naming the first bad step),
evaluates each epoch, keeps the best epoch when the method asks for it, and hands a
resumable state (model, owned modules, optimisers, method state, RNGs) to the caller's
``on_epoch`` callback. The loop's own types live here: :class:`EpochReport`,
:data:`EpochCallback`; :class:`StepContext` is the engine's, :class:`Execution` (how a
training runs: precision, CUDA graph, GPU share) :mod:`timematch.execution`'s.
"""

from __future__ import annotations

import copy
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from timematch.data.views import place_views
from timematch.errors import NonFiniteLoss
from timematch.execution import PRECISIONS, Execution
from timematch.selection import epoch_selection
from timematch.step_engine import LearningRate, StepContext, StepEngine, build_optimizer, suit_device

__all__ = ["Execution", "EpochReport", "EpochCallback", "StepContext", "fit", "prepare", "PRECISIONS"]


@dataclass
class EpochReport:
    """What one epoch of training produced: ``epoch`` counts from 1."""

    epoch: int
    metrics: dict[str, float]
    logs: list[str] = field(default_factory=list)


#: ``on_epoch(report, state)``: ``state()`` returns a checkpoint (tensors and plain Python
#: values only, loadable with ``torch.load(weights_only=True)``) to resume from.
EpochCallback = Callable[[EpochReport, Callable[[], dict]], None]


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


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A detached CPU copy of a module's state."""
    return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}


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
    resume_state: dict | None = None,
    log: Callable[[str], None] | None = None,
    execution: Execution = Execution(),
) -> dict[str, Any]:
    """Train ``method`` (a :class:`timematch.methods.base.Method`; the methods build on this
    module, never the other way round) for its configured epochs; return history, best epoch,
    timings and the step path (``{"path": "cuda_graph" | "eager", "reason": ...}``).

    ``on_epoch(report, state)`` is called after every epoch with an :class:`EpochReport`
    and a function returning a resumable state (tensors and plain values, for
    ``torch.save`` / ``torch.load(weights_only=True)``); ``resume_state`` is such a state
    to continue from (saved on either path, on either kind of device). When the method
    selects a best epoch (``select_best_by``), its weights are loaded into the model at the end.
    """
    config = method.config
    device = method.device
    steps = method.steps_per_epoch()
    engine = prepare(method, seed, execution, log)
    optimizers, views = method.optimizers, method.views
    rng = np.random.default_rng(seed)
    sampling = views.source.generator  # a background thread's generator (None: the device's default one)
    history: list[EpochReport] = []
    best = {"epoch": 0, "value": -math.inf, "state": None}
    start = 1
    if resume_state is not None:
        method.model.load_state_dict(resume_state["model"])
        for name, state in resume_state["modules"].items():
            method.owned[name].module.load_state_dict(state)
        for name, state in resume_state["optimizers"].items():
            optimizers[name].load_state_dict(state)
            suit_device(optimizers[name], device)
        method.load_extra_state(resume_state["method"])
        rng.bit_generator.state = resume_state["numpy_rng"]
        torch.set_rng_state(resume_state["torch_rng"])
        if device.type == "cuda" and resume_state.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(resume_state["cuda_rng"], device)
        if sampling is not None and resume_state.get("sampling_rng") is not None:
            sampling.set_state(resume_state["sampling_rng"])
        history = [EpochReport(**h) for h in resume_state["history"]]
        best = dict(resume_state["best"])
        start = int(resume_state["epoch"]) + 1
    engine.set_step((start - 1) * steps)
    timings = {"step_seconds": 0.0, "data_wait_seconds": 0.0, "steps": 0}

    def state(epoch: int) -> dict[str, Any]:
        return {
            "epoch": epoch,
            "model": snapshot(method.model),
            "modules": {name: snapshot(owned.module) for name, owned in method.owned.items()},
            # deep copies: state_dict() holds live references the next steps would change
            "optimizers": {name: _cpu(copy.deepcopy(o.state_dict())) for name, o in optimizers.items()},
            "method": copy.deepcopy(method.extra_state()),
            "numpy_rng": rng.bit_generator.state,
            "torch_rng": torch.get_rng_state(),
            # dropout (and, on a GPU, batch sampling) draws from the device's generator (None on the CPU)
            "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
            "sampling_rng": None if sampling is None else sampling.get_state(),
            "history": [{"epoch": h.epoch, "metrics": h.metrics, "logs": h.logs} for h in history],
            "best": best,
        }

    for epoch in range(start, config.epochs + 1):
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
        timings["step_seconds"] += elapsed
        timings["data_wait_seconds"] += waited
        timings["steps"] += steps
        metrics.update({key: value / steps for key, value in sums.items() if not key.endswith("_count")})
        metrics.update({key: value for key, value in sums.items() if key.endswith("_count")})
        metrics.update(method.end_epoch(epoch, logs))
        metrics.update(epoch_selection(method.eval_model(), method.source, method.target, device, seed))
        metrics["lr"] = engine.learning_rate()
        metrics["samples_per_second"] = steps * config.batch_size / max(elapsed, 1e-9)
        metrics["data_wait_fraction"] = waited / max(elapsed, 1e-9)
        if method.select_best_by and metrics[method.select_best_by] > best["value"]:
            best = {"epoch": epoch, "value": float(metrics[method.select_best_by]),
                    "state": snapshot(method.eval_model())}
        report = EpochReport(epoch=epoch, metrics=metrics, logs=logs)
        history.append(report)
        if log:
            shown = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items() if k in _SHOWN)
            log(f"epoch {epoch}/{config.epochs}: {shown}" + "".join(f"\n  {line}" for line in logs))
        if on_epoch:
            on_epoch(report, lambda epoch=epoch: state(epoch))
    if method.select_best_by and best["state"] is not None:
        method.eval_model().load_state_dict(best["state"])
    return {"history": history, "best_epoch": best["epoch"], "best_value": best["value"], "timings": timings,
            "step_path": {"path": engine.path, "reason": engine.reason, "placement": views.placement,
                          "precision": execution.precision}}


def _cpu(value: Any) -> Any:
    """Tensors in a (nested) state on the CPU: a checkpoint loads anywhere."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu")
    if isinstance(value, dict):
        return {k: _cpu(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_cpu(v) for v in value]
    return value


_SHOWN = ("train_loss", "target_val_f1", "source_val_f1", "estimated_shift", "pseudo_label_count", "samples_per_second")

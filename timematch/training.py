"""The training loop every method shares: batches, steps, epochs, evaluation, checkpoints.

A method (see :mod:`timematch.methods.base`) says what one step computes; this module
feeds it batches built in a background thread with a :class:`StepContext`, owns the
optimisers and schedules (built from the method's parameter groups and config), moves
and switches the method's modules between train and eval mode, stops on a non-finite
loss, evaluates each epoch, keeps the best epoch when the method asks for it, and hands
a resumable state (model, owned modules, optimisers, schedules, method state, RNGs) to
the caller's ``on_epoch`` callback. The loop's own types live here: :class:`StepContext`,
:class:`EpochReport`, :data:`EpochCallback`.
"""

from __future__ import annotations

import copy
import math
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from timematch.errors import NonFiniteLoss
from timematch.evaluation import to_torch
from timematch.selection import epoch_selection

@dataclass(frozen=True)
class StepContext:
    """Where one training step stands: ``epoch`` and ``step`` count from 1, ``global_step``
    (0-based) counts the steps done before this one over all epochs, of ``total_steps``.

    Derived from the epoch and step only, so scheduled coefficients (a gradient-reversal
    warm start) resume exactly from a checkpoint. ``saved`` says what the last checkpoint
    holds, for error messages.
    """

    epoch: int
    step: int
    steps_per_epoch: int
    total_steps: int
    saved: str = "nothing was saved"

    @property
    def global_step(self) -> int:
        return (self.epoch - 1) * self.steps_per_epoch + self.step - 1

    @property
    def progress(self) -> float:
        """``global_step / total_steps`` in [0, 1)."""
        return self.global_step / max(1, self.total_steps)


@dataclass
class EpochReport:
    """What one epoch of training produced: ``epoch`` counts from 1."""

    epoch: int
    metrics: dict[str, float]
    logs: list[str] = field(default_factory=list)


#: ``on_epoch(report, state)``: ``state()`` returns a checkpoint (tensors and plain Python
#: values only, loadable with ``torch.load(weights_only=True)``) to resume from.
EpochCallback = Callable[[EpochReport, Callable[[], dict]], None]


class Prefetcher:
    """Builds batches in a background thread, ``depth`` ahead of the training loop.

    numpy's fancy indexing and the conversion to float release the GIL for most of
    their time, so on a CPU the next batch is assembled while the model computes.
    ``waited`` accumulates the seconds the consumer spent waiting for data.
    """

    def __init__(self, make: Callable[[], Any], count: int, depth: int = 3) -> None:
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._count = count
        self.waited = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(make,), daemon=True)
        self._thread.start()

    def _run(self, make: Callable[[], Any]) -> None:
        try:
            for _ in range(self._count):
                if self._stop.is_set():
                    return
                self._queue.put(("ok", make()))
        except BaseException as err:  # handed to the consumer, raised there
            self._queue.put(("error", err))

    def __iter__(self) -> Iterator[Any]:
        for _ in range(self._count):
            started = time.perf_counter()
            kind, item = self._queue.get()
            self.waited += time.perf_counter() - started
            if kind == "error":
                raise item
            yield item

    def close(self) -> None:
        self._stop.set()
        while self._thread.is_alive():
            try:
                self._queue.get_nowait()
            except queue.Empty:
                self._thread.join(timeout=0.05)


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


def check_finite(loss: torch.Tensor, epoch: int, step: int, saved: str) -> None:
    """Stop on a NaN or infinite loss, saying where and what was kept."""
    value = float(loss.detach())
    if not math.isfinite(value):
        raise NonFiniteLoss(
            f"loss became {value} at epoch {epoch}, step {step}; {saved}. "
            "Lower the learning rate or check the input normalisation.", epoch, step, saved,
        )


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A detached CPU copy of a module's state."""
    return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}


def build_optimizer(config: Any, groups: list[dict[str, Any]], total_steps: int):
    """The optimiser and per-step schedule that ``config`` names, over parameter ``groups``
    (each ``{"name", "params", "lr_scale"}``: a group learns at ``config.lr * lr_scale``)."""
    param_groups = [{"params": g["params"], "lr": config.lr * g.get("lr_scale", 1.0), "name": g.get("name", "")}
                    for g in groups]
    if config.optimizer == "sgd":
        optimizer = torch.optim.SGD(param_groups, lr=config.lr, momentum=config.momentum,
                                    nesterov=config.nesterov, weight_decay=config.weight_decay)
    else:
        optimizer = torch.optim.Adam(param_groups, lr=config.lr, weight_decay=config.weight_decay)
    if config.schedule == "cosine":
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, total_steps))
    elif config.schedule == "inverse_decay":
        gamma, decay = config.lr_gamma, config.lr_decay
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: (1.0 + gamma * i) ** -decay)
    else:
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: 1.0)
    return optimizer, schedule


def fit(
    method: Any,
    seed: int,
    on_epoch: EpochCallback | None = None,
    resume_state: dict | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Train ``method`` (a :class:`timematch.methods.base.Method`; the methods build on this
    module, never the other way round) for its configured epochs; return history, best epoch
    and timings.

    ``on_epoch(report, state)`` is called after every epoch with an :class:`EpochReport`
    and a function returning a resumable state (tensors and plain values, for
    ``torch.save`` / ``torch.load(weights_only=True)``); ``resume_state`` is such a state
    to continue from. When the method selects a best epoch (``select_best_by``), its
    weights are loaded into the model at the end.
    """
    config = method.config
    device = method.device
    steps = method.steps_per_epoch()
    total_steps = config.epochs * steps
    built = {name: build_optimizer(config, groups, total_steps)
             for name, groups in method.optimizer_groups().items()}
    optimizers = {name: pair[0] for name, pair in built.items()}
    schedules = {name: pair[1] for name, pair in built.items()}
    if len(optimizers) > 1 and not method.manual_optimization:
        raise TypeError(f"{type(method).__name__} names {len(optimizers)} optimisers: set manual_optimization")
    method.optimizers = optimizers
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    history: list[EpochReport] = []
    best = {"epoch": 0, "value": -math.inf, "state": None}
    start = 1
    if resume_state is not None:
        method.model.load_state_dict(resume_state["model"])
        for name, state in resume_state["modules"].items():
            method.owned[name].module.load_state_dict(state)
        for name, state in resume_state["optimizers"].items():
            optimizers[name].load_state_dict(state)
        for name, state in resume_state["schedules"].items():
            schedules[name].load_state_dict(state)
        method.load_extra_state(resume_state["method"])
        rng.bit_generator.state = resume_state["numpy_rng"]
        torch.set_rng_state(resume_state["torch_rng"])
        if device.type == "cuda" and resume_state.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(resume_state["cuda_rng"], device)
        history = [EpochReport(**h) for h in resume_state["history"]]
        best = dict(resume_state["best"])
        start = int(resume_state["epoch"]) + 1
    timings = {"step_seconds": 0.0, "data_wait_seconds": 0.0, "steps": 0}
    poison = injected_nan(getattr(method, "name", type(method).__name__))

    def state(epoch: int) -> dict[str, Any]:
        return {
            "epoch": epoch,
            "model": snapshot(method.model),
            "modules": {name: snapshot(owned.module) for name, owned in method.owned.items()},
            # deep copies: state_dict() holds live references the next steps would change
            "optimizers": {name: copy.deepcopy(o.state_dict()) for name, o in optimizers.items()},
            "schedules": {name: copy.deepcopy(s.state_dict()) for name, s in schedules.items()},
            "method": copy.deepcopy(method.extra_state()),
            "numpy_rng": rng.bit_generator.state,
            "torch_rng": torch.get_rng_state(),
            # dropout on a GPU draws from the device's generator (None on the CPU)
            "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
            "history": [{"epoch": h.epoch, "metrics": h.metrics, "logs": h.logs} for h in history],
            "best": best,
        }

    for epoch in range(start, config.epochs + 1):
        logs: list[str] = []
        metrics = dict(method.start_epoch(epoch, rng, logs))
        method.set_train_mode()
        sums: dict[str, float] = {}
        prefetch = Prefetcher(lambda: method.sample(rng), steps)
        started = time.perf_counter()
        saved = f"the last checkpoint holds epoch {epoch - 1}" if epoch > 1 else "nothing was saved"
        try:
            for step, batch in enumerate(prefetch, start=1):
                context = StepContext(epoch, step, steps, total_steps, saved)
                tensors = {name: to_torch(part, device) for name, part in batch.items()}
                loss, step_logs = method.training_step(tensors, context)
                if poison == (epoch, step):
                    loss = loss * float("nan")
                check_finite(loss, epoch, step, saved)
                if not method.manual_optimization:
                    for optimizer in optimizers.values():
                        optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    for optimizer in optimizers.values():
                        optimizer.step()
                for schedule in schedules.values():
                    schedule.step()
                method.after_step(context)
                sums["train_loss"] = sums.get("train_loss", 0.0) + float(loss.detach())
                for key, value in step_logs.items():
                    sums[key] = sums.get(key, 0.0) + float(value)
        finally:
            prefetch.close()
        elapsed = time.perf_counter() - started
        timings["step_seconds"] += elapsed
        timings["data_wait_seconds"] += prefetch.waited
        timings["steps"] += steps
        metrics.update({key: value / steps for key, value in sums.items() if not key.endswith("_count")})
        metrics.update({key: value for key, value in sums.items() if key.endswith("_count")})
        metrics.update(method.end_epoch(epoch, logs))
        metrics.update(epoch_selection(method.eval_model(), method.source, method.target, device, seed))
        metrics["lr"] = float(next(iter(schedules.values())).get_last_lr()[-1])
        metrics["samples_per_second"] = steps * config.batch_size / max(elapsed, 1e-9)
        metrics["data_wait_fraction"] = prefetch.waited / max(elapsed, 1e-9)
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
    return {"history": history, "best_epoch": best["epoch"], "best_value": best["value"], "timings": timings}


_SHOWN = ("train_loss", "target_val_f1", "source_val_f1", "estimated_shift", "pseudo_label_count", "samples_per_second")

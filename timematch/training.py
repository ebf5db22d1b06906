"""The training loop every method shares: batches, steps, epochs, evaluation, checkpoints.

A method (see :mod:`timematch.methods.base`) says what one step computes; this module
feeds it batches built in a background thread, steps the optimiser and schedule, stops
on a non-finite loss, evaluates each epoch, keeps the best epoch when the method asks
for it, and hands a resumable state to the caller's ``on_epoch`` callback.
"""

from __future__ import annotations

import copy
import math
import queue
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

from timematch.data.dataset import Domain
from timematch.errors import TrainingError
from timematch.metrics import classification_metrics, information_maximization


def pick_device(device: str | None = None) -> torch.device:
    """``device`` if given, else CUDA when present, else CPU."""
    if device:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def to_torch(batch: dict[str, np.ndarray], device: torch.device) -> dict[str, torch.Tensor]:
    """Numpy batch -> tensors on ``device`` (pinned, non-blocking copies on CUDA)."""
    out = {}
    for key, value in batch.items():
        tensor = torch.from_numpy(np.ascontiguousarray(value))
        if device.type == "cuda":
            tensor = tensor.pin_memory().to(device, non_blocking=True)
        out[key] = tensor
    return out


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


@torch.inference_mode()
def predict(
    model: torch.nn.Module, domain: Domain, parcels: np.ndarray, device: torch.device, shift: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Class probabilities (N, K) of ``parcels`` with all pixels and dates, and their labels.

    Rows follow the order of ``parcels`` (evaluation batches group parcels by size).
    """
    model.eval()
    probs, index = [], []
    for batch in domain.eval_batches(parcels):
        tensors = to_torch(batch, device)
        logits, _ = model(tensors["pixels"], tensors["mask"], tensors["positions"] + shift, tensors["geom"])
        probs.append(logits.float().softmax(-1).cpu().numpy())
        index.append(batch["index"])
    if not probs:
        return np.zeros((0, len(domain.classes)), np.float32), np.zeros(0, np.int64)
    parcels = np.asarray(parcels)
    index_arr = np.concatenate(index)
    row_of = np.empty(int(index_arr.max()) + 1, dtype=np.int64)
    row_of[index_arr] = np.arange(len(index_arr))
    return np.concatenate(probs)[row_of[parcels]], domain.labels[parcels]


def evaluate(
    model: torch.nn.Module, domain: Domain, part: str, device: torch.device, shift: int = 0
) -> dict[str, Any]:
    """:func:`classification_metrics` on the labelled parcels of a split part."""
    probs, labels = predict(model, domain, domain.labelled(part), device, shift)
    return score_labelled(probs, labels, domain.classes)


def score_labelled(probs: np.ndarray, labels: np.ndarray, classes: list[str]) -> dict[str, Any]:
    """:func:`classification_metrics` of predictions ``probs`` (N, K) on the rows whose label is
    a class (``labels >= 0``); unlabelled rows are left out."""
    labelled = labels >= 0
    return classification_metrics(labels[labelled], probs[labelled].argmax(1), classes)


def selection_metrics(
    model: torch.nn.Module, source: Domain, target: Domain, device: torch.device
) -> dict[str, float]:
    """The per-epoch model-selection criteria.

    ``target_val_f1`` uses target validation labels (tagged as such by the runner);
    ``source_val_f1`` and ``target_im_score`` use no target labels.
    """
    # one pass over the target validation parcels serves both target criteria: the
    # information maximisation score sees all of them, the F1 only the labelled ones
    probs, labels = predict(model, target, target.split.val, device)
    return {
        "target_val_f1": score_labelled(probs, labels, target.classes)["macro_f1"],
        "source_val_f1": evaluate(model, source, "val", device)["macro_f1"],
        "target_im_score": information_maximization(probs),
    }


def check_finite(loss: torch.Tensor, epoch: int, step: int, saved: str) -> None:
    """Stop on a NaN or infinite loss, saying where and what was kept."""
    value = float(loss.detach())
    if not math.isfinite(value):
        raise TrainingError(
            f"loss became {value} at epoch {epoch}, step {step}; {saved}. "
            "Lower the learning rate or check the input normalisation."
        )


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A detached CPU copy of a module's state."""
    return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}


def fit(
    method,
    seed: int,
    on_epoch: Callable | None = None,
    resume_state: dict | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Train ``method`` for its configured epochs; return history, best epoch and timings.

    ``on_epoch(report, state)`` is called after every epoch with an
    :class:`~timematch.experiment.EpochReport` and a function returning a resumable state
    (tensors and plain values, for ``torch.save`` / ``torch.load(weights_only=True)``);
    ``resume_state`` is such a state to continue from. When the method selects a best
    epoch (``select_best_by``), its weights are loaded into the model at the end.
    """
    from timematch.experiment import EpochReport

    config = method.config
    device = method.device
    steps = method.steps_per_epoch()
    optimizer, schedule = method.build_optimizer(config.epochs * steps)
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    history: list[EpochReport] = []
    best = {"epoch": 0, "value": -math.inf, "state": None}
    start = 1
    if resume_state is not None:
        method.model.load_state_dict(resume_state["model"])
        optimizer.load_state_dict(resume_state["optimizer"])
        schedule.load_state_dict(resume_state["schedule"])
        method.load_extra_state(resume_state["method"])
        rng.bit_generator.state = resume_state["numpy_rng"]
        torch.set_rng_state(resume_state["torch_rng"])
        if device.type == "cuda" and resume_state.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(resume_state["cuda_rng"], device)
        history = [EpochReport(**h) for h in resume_state["history"]]
        best = dict(resume_state["best"])
        start = int(resume_state["epoch"]) + 1
    timings = {"step_seconds": 0.0, "data_wait_seconds": 0.0, "steps": 0}

    def state(epoch: int) -> dict[str, Any]:
        return {
            "epoch": epoch,
            "model": snapshot(method.model),
            # deep copies: state_dict() holds live references the next steps would change
            "optimizer": copy.deepcopy(optimizer.state_dict()),
            "schedule": copy.deepcopy(schedule.state_dict()),
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
        method.model.train()
        sums: dict[str, float] = {}
        prefetch = Prefetcher(lambda: method.sample(rng), steps)
        started = time.perf_counter()
        saved = f"the last checkpoint holds epoch {epoch - 1}" if epoch > 1 else "nothing was saved"
        try:
            for step, batch in enumerate(prefetch, start=1):
                tensors = {name: to_torch(part, device) for name, part in batch.items()}
                loss, step_logs = method.training_step(tensors)
                check_finite(loss, epoch, step, saved)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                method.after_step()
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
        metrics.update(selection_metrics(method.eval_model(), method.source, method.target, device))
        metrics["lr"] = float(schedule.get_last_lr()[0])
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

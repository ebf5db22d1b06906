"""One training step, run so that the GPU never waits for Python: the owner of how steps run.

:class:`StepEngine` runs a method's training step (batches, forward, backward, optimiser
and learning-rate schedule, the method's after-step update such as the EMA teacher, the
step's logs) in one of two ways, with the same code:

- **eager**: every step calls the Python code;
- **CUDA graph** (on a GPU, the default): the first :data:`WARMUP_STEPS` steps run eagerly
  on a side stream (they are real training steps; the optimisers create their state), then
  one step is captured with :class:`torch.cuda.CUDAGraph` and every later step replays it.
  A replay launches the whole step's kernels at once: no Python, no launch gaps.

Either way nothing is read back to the host inside an epoch. The learning rate is a tensor
computed from the device's step counter; the loss, every log and the count of non-finite
losses accumulate in device tensors (:class:`EpochSums`) that the loop reads once per epoch;
a NaN loss stops the trial at the end of its epoch, naming the first bad step. What a
captured step reads must therefore live in tensors updated in place (a method's shift,
the step counter): a Python number read inside ``training_step`` is frozen at capture.

Batches come from :class:`~timematch.data.views.Views`: built inside the step (on a CPU, or
from the tiles on the training GPU, so that the capture includes them), or, when the tiles
do not fit the trial's share of the GPU, by a background thread (:class:`Prefetcher`) that
builds them on the CPU and copies them on a side stream into the step's input buffers.

Shapes: on a GPU the step is shape-static (``Method.static_shapes``: samples are weighted
out, never selected out, since selecting reads a count back and changes the shapes); on a
CPU, where neither costs anything, a method may select and skip work instead.

A method that cannot be captured (``Method.eager_reason``, e.g. a solver that runs on the
host), a device without CUDA, ``Execution.cuda_graph=False``, or a capture that fails,
runs eagerly; :attr:`StepEngine.path` and :attr:`StepEngine.reason` say which and why.
"""

from __future__ import annotations

import math
import queue
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from timematch.data.views import Batch, Views

#: Eager steps before the capture (cuBLAS handles, optimiser state and allocator warm-up).
WARMUP_STEPS = 3
EAGER, CUDA_GRAPH = "eager", "cuda_graph"


# -- the learning rate, as a function of the step ------------------------------------------


@dataclass(frozen=True)
class LearningRate:
    """The schedule of a config: ``lr * lr_scale * factor(i)`` at global step ``i`` of ``total``.

    ``cosine``: 0.5 (1 + cos(pi i / total)); ``inverse_decay``: (1 + lr_gamma i)^-lr_decay;
    ``constant``: 1. Computed with tensor operations from a step counter (on the device,
    inside a captured step), or from a host number.
    """

    schedule: str
    total: int
    gamma: float
    decay: float

    @classmethod
    def of(cls, config: Any, total_steps: int) -> "LearningRate":
        return cls(config.schedule, max(1, total_steps), config.lr_gamma, config.lr_decay)

    def factor(self, step: torch.Tensor) -> torch.Tensor:
        i = step.to(torch.float64)
        if self.schedule == "cosine":
            return 0.5 * (1.0 + torch.cos(math.pi * i / self.total))
        if self.schedule == "inverse_decay":
            return (1.0 + self.gamma * i) ** -self.decay
        return torch.ones_like(i)


def build_optimizer(config: Any, groups: list[dict[str, Any]], device: torch.device) -> torch.optim.Optimizer:
    """The optimiser ``config`` names over parameter ``groups`` (each ``{"name", "params",
    "lr_scale"}``: a group learns at ``config.lr * lr_scale``, times the schedule's factor).

    On a GPU the fused implementations (Adam also ``capturable``), with the learning rate a
    device tensor (what a CUDA graph replays); on a CPU the default ones with a float
    learning rate. ``base_lr`` in each group is its rate before the schedule.
    """
    param_groups = [{"params": g["params"], "lr": config.lr * g.get("lr_scale", 1.0), "name": g.get("name", ""),
                     "base_lr": config.lr * g.get("lr_scale", 1.0)} for g in groups]
    if config.optimizer == "sgd":
        optimizer = torch.optim.SGD(param_groups, lr=config.lr, momentum=config.momentum, nesterov=config.nesterov,
                                    weight_decay=config.weight_decay)
    else:
        optimizer = torch.optim.Adam(param_groups, lr=config.lr, weight_decay=config.weight_decay)
    suit_device(optimizer, device)
    return optimizer


def suit_device(optimizer: torch.optim.Optimizer, device: torch.device) -> None:
    """Set ``optimizer`` up for ``device``: after building it, and after loading a state saved
    on the other kind of device (a state dict carries the saving optimiser's settings)."""
    on_gpu = device.type == "cuda"
    for group in optimizer.param_groups:
        value = float(group["lr"])
        group["lr"] = torch.tensor(value, dtype=torch.float32, device=device) if on_gpu else value
        group["fused"] = on_gpu or None
        group["foreach"] = None
        if "capturable" in group:
            group["capturable"] = on_gpu
        for param in group["params"]:
            state = optimizer.state.get(param, {})
            if isinstance(state.get("step"), torch.Tensor):  # Adam's step count: on the device when fused
                state["step"] = state["step"].to(param.device if on_gpu else "cpu", torch.float32)


# -- per-epoch sums on the device -----------------------------------------------------------


class EpochSums:
    """The loss and the logs of an epoch's steps, summed in float64 device tensors, and the
    global step of the first non-finite loss (-1: none). :meth:`read` is the epoch's one
    read back to the host. ``shape``: ``()`` for one trial, ``(K,)`` for the K members of an
    array of trials (:class:`timematch.arrays.ArraySums`)."""

    def __init__(self, device: torch.device, shape: tuple[int, ...] = ()) -> None:
        self.device = device
        self.shape = shape
        self.values: dict[str, torch.Tensor] = {}
        self.first_bad = torch.full(shape, -1, dtype=torch.int64, device=device)
        self.first_bad_loss = torch.zeros(shape, dtype=torch.float64, device=device)

    def add(self, loss: torch.Tensor, logs: dict[str, Any], step: torch.Tensor) -> list[str]:
        """Add a step's loss and logs; return the keys of logs that are Python numbers (a
        captured step would freeze them: such a step cannot be captured)."""
        first = ~torch.isfinite(loss.detach()) & (self.first_bad < 0)
        self.first_bad.copy_(torch.where(first, step, self.first_bad))
        self.first_bad_loss.copy_(torch.where(first, loss.detach().to(torch.float64), self.first_bad_loss))
        numbers = []
        for key, value in {"train_loss": loss, **logs}.items():
            if not isinstance(value, torch.Tensor):
                numbers.append(key)
                value = torch.tensor(float(value), dtype=torch.float64, device=self.device)
            if key not in self.values:
                self.values[key] = torch.zeros(self.shape, dtype=torch.float64, device=self.device)
            self.values[key].add_(value.detach().to(torch.float64).expand(self.shape))
        return numbers

    def read(self) -> tuple[dict[str, float], int, float]:
        """(sums, the first non-finite loss's global step or -1, that loss), then zero them in
        place (a captured step keeps adding to these very tensors)."""
        keys, packed = self._read()
        return dict(zip(keys, packed[:-2])), int(packed[-2]), packed[-1]

    def _read(self) -> tuple[list[str], list]:
        """The keys, and the sums then the first non-finite step and loss as one host list
        (rows of the leading dimension), all zeroed on the device."""
        keys = list(self.values)
        packed = torch.stack([self.values[k] for k in keys] + [self.first_bad.to(torch.float64),
                                                              self.first_bad_loss]).cpu().tolist()
        for value in self.values.values():
            value.zero_()
        self.first_bad.fill_(-1)
        return keys, packed


class GraphUnsafe(RuntimeError):
    """A step that cannot be captured as a CUDA graph (the message says why)."""


# -- batches from a background thread ---------------------------------------------------------


class Prefetcher:
    """Builds ``count`` batches in a background thread, ``depth`` ahead of the training loop.

    ``make()`` returns the step's batches (``{name: Batch}``) built on the CPU; each is pinned
    and copied to the GPU on a side stream, and the consumer's stream waits for that copy
    (no host sync). ``waited`` accumulates the seconds the consumer waited.
    """

    def __init__(self, make: Callable[[], dict[str, Batch]], count: int, device: torch.device, depth: int = 3) -> None:
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._count = count
        self._device = device
        self._stream = torch.cuda.Stream(device)
        self.waited = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(make,), daemon=True)
        self._thread.start()

    def _run(self, make: Callable[[], dict[str, Batch]]) -> None:
        try:
            for _ in range(self._count):
                if self._stop.is_set():
                    return
                batches = make()
                with torch.cuda.stream(self._stream):
                    host = {name: b.pin_memory() for name, b in batches.items()}
                    moved = {name: b.to(self._device, non_blocking=True) for name, b in host.items()}
                    ready = torch.cuda.Event()
                    ready.record(self._stream)
                self._queue.put(("ok", moved, (ready, host)))
        except BaseException as err:  # handed to the consumer, raised there
            self._queue.put(("error", err, None))

    def __iter__(self) -> Iterator[dict[str, Batch]]:
        for _ in range(self._count):
            started = time.perf_counter()
            kind, item, copy = self._queue.get()
            self.waited += time.perf_counter() - started
            if kind == "error":
                raise item
            ready, _host = copy  # the pinned host copy stays referenced until here
            stream = torch.cuda.current_stream(self._device)
            stream.wait_event(ready)
            for batch in item.values():
                for tensor in batch.tensors().values():
                    tensor.record_stream(stream)
            yield item

    def close(self) -> None:
        self._stop.set()
        while self._thread.is_alive():
            try:
                self._queue.get_nowait()
            except queue.Empty:
                self._thread.join(timeout=0.05)


# -- the engine -----------------------------------------------------------------------------


@dataclass(frozen=True)
class StepContext:
    """Where one training step stands, as the step sees it.

    ``global_step`` is a 0-dim int64 tensor on the device: the steps done before this one
    over all epochs (a captured step reads it when replayed; a Python number would be
    frozen at capture). ``progress`` = ``global_step / total_steps`` in [0, 1), a tensor.
    """

    global_step: torch.Tensor
    steps_per_epoch: int
    total_steps: int

    @property
    def progress(self) -> torch.Tensor:
        return self.global_step.to(torch.float32) / max(1, self.total_steps)


class StepEngine:
    """Runs a method's training steps (see the module docstring). The loop owns epochs,
    evaluation and checkpoints; the engine owns how a step runs and the step counter."""

    def __init__(self, method: Any, optimizers: dict[str, torch.optim.Optimizer], rate: LearningRate,
                 views: Views, steps_per_epoch: int, total_steps: int, *, precision: str = "fp32",
                 cuda_graph: bool = True, poison_step: int | None = None,
                 log: Callable[[str], None] | None = None) -> None:
        self.method = method
        self.device = method.device
        self.optimizers = optimizers
        self.rate = rate
        self.views = views
        self.steps_per_epoch = steps_per_epoch
        self.precision = precision
        self.poison_step = poison_step
        self._log = log
        self.global_step = torch.zeros((), dtype=torch.int64, device=self.device)
        self.context = StepContext(self.global_step, steps_per_epoch, total_steps)
        self.sums = EpochSums(self.device)
        self._graph: torch.cuda.CUDAGraph | None = None
        self._static: dict[str, Batch] | None = None
        self._eager_steps = 0
        self.waited = 0.0
        if self.device.type != "cuda":
            self.path, self.reason = EAGER, f"no CUDA graphs on {self.device.type}"
        elif not cuda_graph:
            self.path, self.reason = EAGER, "CUDA graphs turned off (--no-cuda-graph)"
        elif getattr(method, "eager_reason", None):
            self.path, self.reason = EAGER, f"{type(method).__name__}: {method.eager_reason}"
        else:
            self.path, self.reason = CUDA_GRAPH, f"the whole step is captured once and replayed ({views.placement})"
        self._capture_pending = self.path == CUDA_GRAPH

    # -- public ---------------------------------------------------------------------------

    def set_step(self, global_step: int) -> None:
        self.global_step.fill_(global_step)

    def step(self) -> None:
        """One training step built inside (inline views), nothing read back. (Benchmarks
        interleave the steps of several engines on their own CUDA streams with it.)"""
        self._one(None)

    def run_epoch(self, steps: int) -> tuple[dict[str, float], int, float]:
        """Run ``steps`` steps; return :meth:`EpochSums.read`: the epoch's sums, the first
        non-finite loss's global step (-1: none) and its value."""
        if self.views.inline:
            for _ in range(steps):
                self._one(None)
        else:
            prefetch = Prefetcher(self.method.sample, steps, self.device)
            try:
                for batches in prefetch:
                    self._one(batches)
            finally:
                prefetch.close()
                self.waited += prefetch.waited
        return self.sums.read()

    def learning_rate(self) -> float:
        """The last group's learning rate for the next step (a host read: for epoch logs)."""
        group = next(iter(self.optimizers.values())).param_groups[-1]
        return float(group["base_lr"] * self.rate.factor(self.global_step.cpu()))

    # -- one step ---------------------------------------------------------------------------

    def _one(self, batches: dict[str, Batch] | None) -> None:
        if self._graph is None and self._capture_pending and self._eager_steps >= WARMUP_STEPS:
            self._capture(batches)
        if self._graph is not None:
            if batches is not None:
                for name, batch in batches.items():
                    for key, tensor in batch.tensors().items():
                        getattr(self._static[name], key).copy_(tensor, non_blocking=True)
            self._graph.replay()
            return
        if self._capture_pending:  # warm-up: real steps, on a side stream as capture needs
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                self._checked_step(batches)
            torch.cuda.current_stream(self.device).wait_stream(side)
        else:
            self._step(batches)
        self._eager_steps += 1

    def _step(self, batches: dict[str, Batch] | None) -> list[str]:
        """One step; returns the logs that were Python numbers (see :meth:`EpochSums.add`)."""
        with warnings.catch_warnings():  # capturable Adam warns when stepped outside a capture (warm-up)
            warnings.filterwarnings("ignore", message="This instance was constructed with capturable=True")
            return self._step_body(batches)

    def _step_body(self, batches: dict[str, Batch] | None) -> list[str]:
        method = self.method
        self._set_learning_rates()
        # no autocast cache: a captured step must recast the weights it reads at every replay
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16",
                            cache_enabled=False):
            if batches is None:
                batches = method.sample()
            loss, logs = method.training_step(batches, self.context)
        if self.poison_step is not None:  # fault injection (RELIABILITY.md)
            loss = loss * torch.where(self.global_step == self.poison_step, float("nan"), 1.0)
        numbers = self.sums.add(loss, logs, self.global_step)
        if not method.manual_optimization:
            for optimizer in self.optimizers.values():
                optimizer.zero_grad(set_to_none=True)
            loss.backward()
            for optimizer in self.optimizers.values():
                optimizer.step()
        method.after_step(self.context)
        self.global_step.add_(1)
        return numbers

    def _set_learning_rates(self) -> None:
        factor = self.rate.factor(self.global_step)
        for optimizer in self.optimizers.values():
            for group in optimizer.param_groups:
                if isinstance(group["lr"], torch.Tensor):
                    group["lr"].copy_(group["base_lr"] * factor)
                else:
                    group["lr"] = group["base_lr"] * float(factor)

    def _checked_step(self, batches: dict[str, Batch] | None) -> None:
        """A warm-up step (a real one), checked for what a capture could not contain: logs that
        are Python numbers, and (the last warm-up step, under CUDA's sync debug mode) a value
        read back to the host. Either makes the engine run eagerly, saying why."""
        if self._eager_steps < WARMUP_STEPS - 1:
            numbers = self._step(batches)
        else:
            previous = torch.cuda.get_sync_debug_mode()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                try:
                    numbers = self._step(batches)
                finally:
                    torch.cuda.set_sync_debug_mode(previous)
            # "called a synchronizing CUDA operation" (not the mode's own notice that it is a prototype)
            syncs = [w for w in caught if "synchronizing CUDA operation" in str(w.message)]
            if syncs:
                where = f"{syncs[0].filename}:{syncs[0].lineno}"
                self._fall_back(f"the step reads a value back to the host ({where}: {syncs[0].message})")
                return
        if numbers:
            self._fall_back(f"its logs {numbers} are Python numbers, which a captured step would freeze "
                            "(return tensors)")

    # -- capture ----------------------------------------------------------------------------

    def _capture(self, batches: dict[str, Batch] | None) -> None:
        self._capture_pending = False
        if batches is not None:  # the graph reads its inputs from buffers refilled before each replay
            self._static = {name: b.replace(**{k: v.clone() for k, v in b.tensors().items()})
                            for name, b in batches.items()}
        graph = torch.cuda.CUDAGraph()
        for optimizer in self.optimizers.values():
            optimizer.zero_grad(set_to_none=True)  # gradients are allocated in the graph's pool
        torch.cuda.synchronize(self.device)
        try:
            # thread_local: a Prefetcher thread may copy the next batch meanwhile
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                if self._step(self._static):
                    raise GraphUnsafe("a log became a Python number")
        except (RuntimeError, GraphUnsafe) as err:
            torch.cuda.synchronize(self.device)
            self._static = None
            self._fall_back(f"capture failed: {str(err).splitlines()[0]}")
            return
        self._graph = graph  # capturing recorded the step without running it: the caller replays it now

    def _fall_back(self, reason: str) -> None:
        self._capture_pending = False
        self.path, self.reason = EAGER, reason
        if self._log:
            self._log(f"training step runs eagerly: {reason}")

"""A training's resumable state: one type, captured after an epoch and restored before the next.

:class:`TrainingState` holds everything :func:`timematch.training.fit` needs to continue a
training exactly where it stopped (model, owned modules, optimisers, the method's own state,
every random generator, the history and the best epoch so far). It is written as tensors and
plain Python values only, so :meth:`TrainingState.load` reads it with
``torch.load(weights_only=True)`` (nothing is unpickled), on either kind of device.
"""

from __future__ import annotations

import copy
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from timematch.errors import DatasetError
from timematch.step_engine import suit_device

if TYPE_CHECKING:
    from timematch.methods.base import Method

#: The payload's format: a file of another format is refused, naming the path.
FORMAT = 1


@dataclass
class EpochReport:
    """What one epoch of training produced: ``epoch`` counts from 1."""

    epoch: int
    metrics: dict[str, float]
    logs: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "metrics": self.metrics, "logs": self.logs}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> EpochReport:
        return cls(**values)


@dataclass(frozen=True)
class BestEpoch:
    """The best epoch so far by the method's ``select_best_by`` metric, and its eval weights
    (never changed: a better epoch is a new one)."""

    epoch: int = 0
    value: float = -float("inf")
    state: dict[str, torch.Tensor] | None = None


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A detached CPU copy of a module's state."""
    return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}


def read_payload(path: Path, what: str, fix: str = "") -> dict[str, Any]:
    """A dict written with ``torch.save``, read safely (``weights_only``: nothing is unpickled);
    a file that is not one is a :class:`DatasetError` naming it as a ``what``, then ``fix``."""
    try:
        payload = torch.load(Path(path), map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file is the same error for the user
        raise DatasetError(f"{path}: not a readable {what} ({type(err).__name__}: {err}){fix}") from None
    if not isinstance(payload, dict):
        raise DatasetError(f"{path}: not a {what} written by this version{fix}")
    return payload


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


@dataclass
class TrainingState:
    """A training after ``epoch`` epochs, enough to continue it bit for bit."""

    epoch: int
    model: dict[str, torch.Tensor]
    modules: dict[str, dict[str, torch.Tensor]]
    optimizers: dict[str, dict[str, Any]]
    method: dict[str, Any]
    numpy_rng: dict[str, Any]
    torch_rng: torch.Tensor
    #: dropout (and, on a GPU, batch sampling) draws from the device's generator (None on the CPU)
    cuda_rng: torch.Tensor | None
    #: a background sampling thread's generator (None: batches are drawn on the device's own)
    sampling_rng: Any
    history: list[EpochReport]
    best: BestEpoch

    @classmethod
    def capture(cls, epoch: int, method: Method, optimizers: dict[str, torch.optim.Optimizer],
                rng: np.random.Generator, sampling: Any, history: list[EpochReport],
                best: BestEpoch) -> TrainingState:
        """The state of ``method``'s training after ``epoch``, copied to the CPU (the next
        steps change the live tensors; ``state_dict()`` holds references to them)."""
        device = method.device
        return cls(
            epoch=epoch,
            model=snapshot(method.model),
            modules={name: snapshot(owned.module) for name, owned in method.owned.items()},
            optimizers={name: _cpu(copy.deepcopy(o.state_dict())) for name, o in optimizers.items()},
            method=copy.deepcopy(method.extra_state()),
            numpy_rng=rng.bit_generator.state,
            torch_rng=torch.get_rng_state(),
            cuda_rng=torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
            sampling_rng=None if sampling is None else sampling.get_state(),
            history=list(history),
            best=best,
        )

    def restore(self, method: Method, optimizers: dict[str, torch.optim.Optimizer], rng: np.random.Generator,
                sampling: Any) -> None:
        """Put this state back into ``method``, its optimisers and the generators (saved on
        either kind of device, restored on either)."""
        device = method.device
        method.model.load_state_dict(self.model)
        for name, state in self.modules.items():
            method.owned[name].module.load_state_dict(state)
        for name, state in self.optimizers.items():
            optimizers[name].load_state_dict(state)
            suit_device(optimizers[name], device)
        method.load_extra_state(self.method)
        rng.bit_generator.state = self.numpy_rng
        torch.set_rng_state(self.torch_rng)
        if device.type == "cuda" and self.cuda_rng is not None:
            torch.cuda.set_rng_state(self.cuda_rng, device)
        if sampling is not None and self.sampling_rng is not None:
            sampling.set_state(self.sampling_rng)

    def to_payload(self) -> dict[str, Any]:
        """Tensors and plain values only (for ``torch.save``; read back by :meth:`from_payload`)."""
        return {
            "format": FORMAT, "epoch": self.epoch, "model": self.model, "modules": self.modules,
            "optimizers": self.optimizers, "method": self.method, "numpy_rng": self.numpy_rng,
            "torch_rng": self.torch_rng, "cuda_rng": self.cuda_rng, "sampling_rng": self.sampling_rng,
            "history": [h.to_dict() for h in self.history],
            "best": {"epoch": self.best.epoch, "value": self.best.value, "state": self.best.state},
        }

    @classmethod
    def from_payload(cls, payload: dict[str, Any]) -> TrainingState:
        return cls(
            epoch=int(payload["epoch"]), model=payload["model"], modules=payload["modules"],
            optimizers=payload["optimizers"], method=payload["method"], numpy_rng=payload["numpy_rng"],
            torch_rng=payload["torch_rng"], cuda_rng=payload.get("cuda_rng"),
            sampling_rng=payload.get("sampling_rng"),
            history=[EpochReport.from_dict(h) for h in payload["history"]],
            best=BestEpoch(**payload["best"]),
        )

    def save(self, path: Path) -> Path:
        """Write to ``path`` atomically."""
        atomic_torch_save(self.to_payload(), Path(path))
        return Path(path)

    @classmethod
    def load(cls, path: Path) -> TrainingState:
        """Read a file written by :meth:`save`, safely (``weights_only``: no arbitrary unpickling)."""
        fix = "; delete it to train from the start"
        payload = read_payload(path, "training checkpoint", fix)
        # states written before the format was recorded have the same keys and no "format"; a
        # source-model file (timematch.experiment.PretrainedSource) has a format but not these keys
        if payload.get("format", FORMAT) != FORMAT or not {"epoch", "optimizers", "history"} <= payload.keys():
            raise DatasetError(f"{path}: not a training checkpoint written by this version{fix}")
        return cls.from_payload(payload)


def _cpu(value: Any) -> Any:
    """Tensors in a (nested) state on the CPU: a checkpoint loads anywhere."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu")
    if isinstance(value, dict):
        return {k: _cpu(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_cpu(v) for v in value]
    return value

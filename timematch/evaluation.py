"""Predictions and scores of a model on a domain: what the loop evaluates each epoch and
what an experiment reports at the end. No training here, and no method imports: methods,
the loop and the experiment API all build on this module.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from timematch.data.dataset import Domain
from timematch.metrics import classification_metrics


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


def model_inputs(model: torch.nn.Module, batch: dict[str, np.ndarray], device: torch.device, shift: int = 0):
    """The model's arguments for an evaluation batch (numpy, from :meth:`Domain.eval_batches`):
    the tensors on ``device``, and what the host knows for free (whether any pixel is padding;
    that the shifted dates are in the model's table, checked here)."""
    if hasattr(model, "check_positions"):
        model.check_positions(batch["positions"] + shift)
    tensors = to_torch({k: batch[k] for k in ("pixels", "mask", "positions", "geom")}, device)
    return (tensors["pixels"], tensors["mask"], tensors["positions"] + shift, tensors["geom"]), {
        "padded": not bool(batch["mask"].all())}


@torch.inference_mode()
def predict(
    model: torch.nn.Module, domain: Domain, parcels: np.ndarray, device: torch.device, shift: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Class probabilities (N, K) of ``parcels`` with all pixels and dates, and their labels.

    Rows follow the order of ``parcels`` (evaluation batches group parcels by size). The
    probabilities stay on the device until the last batch: one read back.
    """
    model.eval()
    probs, index = [], []
    for batch in domain.eval_batches(parcels):
        args, kwargs = model_inputs(model, batch, device, shift)
        logits, _ = model(*args, **kwargs)
        probs.append(logits.float().softmax(-1))
        index.append(batch["index"])
    if not probs:
        return np.zeros((0, len(domain.classes)), np.float32), np.zeros(0, np.int64)
    parcels = np.asarray(parcels)
    index_arr = np.concatenate(index)
    row_of = np.empty(int(index_arr.max()) + 1, dtype=np.int64)
    row_of[index_arr] = np.arange(len(index_arr))
    return torch.cat(probs).cpu().numpy()[row_of[parcels]], domain.labels[parcels]


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

"""How far an adaptation trial moved from the source model it started from.

A trial that barely moves its weights can still change its target predictions: every step
re-estimates the batch-norm statistics, on source and target batches alike, whatever the
method's loss. :class:`MovementProbe` tells the two apart. Built once from the source model a
trial starts from and the target domain, it predicts the target test split once with that
model; then, for the trial's model at any point, :meth:`MovementProbe.measure` gives
(:data:`MOVEMENT_METRICS`; each epoch on the domain's fixed evaluation sample of the test split,
for a trial's returned model on the whole split):

- ``moved_encoder``, ``moved_classifier``: ``||theta - theta_0|| / ||theta_0||`` over the
  encoder's (everything but the decoder) and the classifier's (the decoder's) parameters that
  the source model has (a branch a method adds, RAINCOAT's, has no theta_0: it is left out);
- ``changed_predictions``: the share of target test parcels whose predicted class differs
  from the source model's;
- ``changed_by_batch_norm``: the same share for the source model's weights with the trial's
  current buffers (its batch-norm statistics): the part of ``changed_predictions`` that the
  statistics alone explain. For a method that adds a branch to the classifier's forward pass
  (RAINCOAT), the source model has no such branch, so this share also holds the branch's absence.

The test split's labels are never read: only which class each model predicts, so nothing here
selects (:mod:`timematch.selection` reads no test split). The runner logs the four per epoch
and ``final_<name>`` for the model a trial returns; the report compares the trials' final
predictions (:mod:`timematch.report.agreement`).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

import numpy as np
import torch

from timematch.data.dataset import Domain
from timematch.evaluation import predict

#: What :meth:`MovementProbe.measure` returns, in this order.
MOVEMENT_METRICS = ("moved_encoder", "moved_classifier", "changed_predictions", "changed_by_batch_norm")

#: The split whose predictions are compared (its labels are not read).
SPLIT = "test"


def predicted_classes(model: torch.nn.Module, domain: Domain, device: torch.device,
                      parcels: np.ndarray | None = None) -> np.ndarray:
    """The class index ``model`` predicts for ``parcels`` (every labelled parcel of ``domain``'s
    test split when None), in their order (int16)."""
    probs, _ = predict(model, domain, domain.labelled(SPLIT) if parcels is None else parcels, device)
    return probs.argmax(1).astype(np.int16)


def relative_change(current: Mapping[str, torch.Tensor], start: Mapping[str, torch.Tensor],
                    names: list[str]) -> float:
    """``||current - start|| / ||start||`` over the tensors ``names`` (0 when ``start`` is 0)."""
    moved = sum(float((current[n].detach().float().cpu() - start[n].float()).pow(2).sum()) for n in names)
    size = sum(float(start[n].float().pow(2).sum()) for n in names)
    return (moved / size) ** 0.5 if size > 0 else 0.0


class MovementProbe:
    """Measures a trial's model against the source model ``start`` (a classifier on ``device``,
    which the probe copies, leaving it as it is) on ``domain``'s test split."""

    def __init__(self, start: torch.nn.Module, domain: Domain, device: torch.device) -> None:
        self.domain = domain
        self.device = device
        self.start_state = {k: v.detach().to("cpu", copy=True) for k, v in start.state_dict().items()}
        parameters = [name for name, _ in start.named_parameters()]
        self.classifier = [n for n in parameters if n.startswith("decoder.")]
        self.encoder = [n for n in parameters if not n.startswith("decoder.")]
        self.buffers = [name for name, _ in start.named_buffers()]
        self._model = copy.deepcopy(start)  # loaded with the start weights and a trial's buffers in measure()
        self.start_predictions = predicted_classes(start, domain, device)
        # each epoch measures the domain's fixed evaluation sample of the split (uniform: the
        # labels are not read); a trial's returned model, the whole split
        parcels = domain.labelled(SPLIT)
        self.sample = domain.evaluation_sample(parcels, SPLIT, by_class=False)
        self.sample_rows = np.searchsorted(parcels, self.sample)

    def measure(self, model: torch.nn.Module, predictions: np.ndarray | None = None) -> dict[str, float]:
        """:data:`MOVEMENT_METRICS` of ``model`` (the trial's model now; left as it was): on the
        evaluation sample of the test split, or, given ``predictions`` (the model's predictions
        of the whole labelled test split, which the caller has), on the whole split."""
        state = model.state_dict()
        if predictions is None:
            parcels, start = self.sample, self.start_predictions[self.sample_rows]
            training = model.training
            predictions = predicted_classes(model, self.domain, self.device, parcels)
            model.train(training)
        else:
            parcels, start = None, self.start_predictions
        statistics_only = dict(self.start_state)
        statistics_only.update({name: state[name] for name in self.buffers if name in state})
        self._model.load_state_dict(statistics_only)
        by_statistics = predicted_classes(self._model, self.domain, self.device, parcels)
        return {
            "moved_encoder": relative_change(state, self.start_state, self.encoder),
            "moved_classifier": relative_change(state, self.start_state, self.classifier),
            "changed_predictions": _changed(predictions, start),
            "changed_by_batch_norm": _changed(by_statistics, start),
        }


def _changed(predictions: np.ndarray, start: np.ndarray) -> float:
    """The share of parcels on which ``predictions`` differ from the source model's ``start``."""
    return float(np.mean(predictions != start)) if len(predictions) else 0.0

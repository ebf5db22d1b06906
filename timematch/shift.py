"""Temporal shift estimation (TimeMatch, Nyborg et al. 2022, section 3.2).

For every candidate shift d, the target data is classified with its date positions + d,
and a score of the predictions p(y | x, d) says how well the shifted target fits the
source model:

- IS (inception score): mean_x KL(p(y|x,d) || p_bar(y|d)), maximised;
- AM (AM score): KL(c_hat || q(d)) + mean_x H(p(y|x,d)), minimised, with c_hat the
  estimated target class distribution and q(d) the histogram of argmax predictions;
- ENT: mean_x H(p(y|x,d)), minimised;
- ACC: accuracy with target labels, maximised (an oracle, for analysis only).

The pixel-set encoder does not depend on d, so :func:`estimate_shift` runs it once per
batch and sends all candidate shifts through the temporal encoder and decoder together.
The per-shift sums stay on the device and are read back once, at the end.
:func:`estimate_shift_loop` is what the published code does, kept as the reference: the
pixel-set encoder once per batch too, then one temporal-encoder and decoder pass per shift.

Batches are :class:`~timematch.data.views.Batch` (weak views); their labels are read only
by the ACC oracle. The candidate shifts moved dates must stay in the model's table: the
caller checks that once (:meth:`timematch.methods.base.Method.check_date_range`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from timematch.data.views import Batch
from timematch.errors import ConfigError

ESTIMATORS = ("am", "is", "ent", "acc")
_EPS = 1e-12


@dataclass
class ShiftScores:
    """Scores of every candidate shift and the chosen one (``estimate``, days)."""

    shifts: np.ndarray
    scores: np.ndarray
    estimator: str
    estimate: int

    def to_dict(self) -> dict:
        return {"shifts": self.shifts.tolist(), "scores": self.scores.tolist(),
                "estimator": self.estimator, "estimate": int(self.estimate)}


class _Accumulator:
    """Streaming sums over samples, per candidate shift, in float64 tensors on the device."""

    def __init__(self, n_shifts: int, n_classes: int, device: torch.device) -> None:
        zeros = lambda *shape: torch.zeros(*shape, dtype=torch.float64, device=device)  # noqa: E731
        self.neg_entropy = zeros(n_shifts)
        self.prob_sum = zeros(n_shifts, n_classes)
        self.argmax_counts = zeros(n_shifts, n_classes)
        self.correct = zeros(n_shifts)
        self.n = 0
        self.n_labelled = zeros(())

    def add(self, probs: torch.Tensor, labels: torch.Tensor | None, rows: slice) -> None:
        """``probs`` (D', B, K) for the shifts ``rows``."""
        logp = probs.clamp_min(_EPS).log()
        self.neg_entropy[rows] += (probs * logp).sum(dim=(1, 2)).double()
        self.prob_sum[rows] += probs.sum(dim=1).double()
        pred = probs.argmax(dim=-1)  # (D', B)
        self.argmax_counts[rows] += torch.nn.functional.one_hot(pred, probs.shape[-1]).sum(1).double()
        if labels is not None:
            valid = labels >= 0
            self.correct[rows] += ((pred == labels[None]) & valid[None]).sum(1).double()

    def scores(self, estimator: str, class_prior: np.ndarray | None) -> np.ndarray:
        """The scores of every shift (the one read back to the host)."""
        neg_entropy, prob_sum, argmax_counts, correct = (
            t.cpu().numpy() for t in (self.neg_entropy, self.prob_sum, self.argmax_counts, self.correct))
        mean_entropy = -neg_entropy / self.n
        if estimator == "ent":
            return mean_entropy
        if estimator == "is":
            p_bar = prob_sum / self.n
            return -mean_entropy - (p_bar * np.log(np.clip(p_bar, _EPS, None))).sum(1)
        if estimator == "am":
            if class_prior is None:
                raise ConfigError("the AM estimator needs class_prior (the estimated target class distribution)")
            prior = np.clip(class_prior / class_prior.sum(), _EPS, None)
            q = np.clip(argmax_counts / self.n, _EPS, None)
            kl = (prior[None] * (np.log(prior)[None] - np.log(q))).sum(1)
            return kl + mean_entropy
        if estimator == "acc":
            return correct / max(float(self.n_labelled), 1.0)
        raise ConfigError(f"unknown shift estimator {estimator!r}; valid: {', '.join(ESTIMATORS)}")


def _best(shifts: np.ndarray, scores: np.ndarray, estimator: str) -> int:
    goodness = scores if estimator in ("is", "acc") else -scores
    best = np.flatnonzero(goodness >= goodness.max() - 1e-12)
    # ties: the candidate closest to no shift
    return int(shifts[best[np.argmin(np.abs(shifts[best]))]])


def _check(estimator: str, shifts: Sequence[int]) -> np.ndarray:
    if estimator not in ESTIMATORS:
        raise ConfigError(f"unknown shift estimator {estimator!r}; valid: {', '.join(ESTIMATORS)}")
    shifts = np.asarray(list(shifts), dtype=np.int64)
    if shifts.size == 0:
        raise ConfigError("no candidate shift to score")
    return shifts


@torch.inference_mode()
def estimate_shift(
    model: torch.nn.Module,
    batches: Sequence[Batch],
    shifts: Sequence[int],
    estimator: str = "am",
    class_prior: np.ndarray | None = None,
    max_rows: int = 4096,
) -> ShiftScores:
    """Score every shift in ``shifts`` on target ``batches`` (weak views, on the model's device).

    ``model`` is put in eval mode. Candidate shifts go through the temporal encoder in
    chunks of at most ``max_rows`` (shift x sample) rows.
    """
    shifts = _check(estimator, shifts)
    model.eval()
    acc = None
    for batch in batches:
        size = len(batch)
        emb = model.encode_pixels(batch.pixels, batch.mask, batch.geom, batch.padded)  # (B, T, F)
        labels = batch.label if estimator == "acc" else None
        chunk = max(1, max_rows // size)
        all_shifts = torch.as_tensor(shifts, device=emb.device)
        for start in range(0, len(shifts), chunk):
            ds = all_shifts[start : start + chunk]
            if hasattr(model, "encode_time_shifted"):  # LTAE: shift-independent work done once
                features = model.encode_time_shifted(emb, batch.positions, ds)
            else:
                rep = emb.repeat(len(ds), 1, 1)
                pos = batch.positions.repeat(len(ds), 1) + ds.repeat_interleave(size)[:, None]
                features = model.encode_time(rep, pos)
            logits = model.classify(features)
            probs = logits.float().softmax(-1).view(len(ds), size, -1)
            if acc is None:
                acc = _Accumulator(len(shifts), probs.shape[-1], probs.device)
            acc.add(probs, labels, slice(start, start + len(ds)))
        acc.n += size
        if labels is not None:
            acc.n_labelled += (labels >= 0).sum()
    if acc is None:
        raise ConfigError("shift estimation got no target batch")
    scores = acc.scores(estimator, class_prior)
    return ShiftScores(shifts, scores, estimator, _best(shifts, scores, estimator))


@torch.inference_mode()
def estimate_shift_loop(
    model: torch.nn.Module,
    batches: Sequence[dict[str, torch.Tensor]],
    shifts: Sequence[int],
    estimator: str = "am",
    class_prior: np.ndarray | None = None,
) -> ShiftScores:
    """The same scores computed as the published code does: the pixel-set encoder once per
    batch, then the temporal encoder and decoder once per shift (the reference)."""
    shifts = _check(estimator, shifts)
    model.eval()
    acc = None
    for batch in batches:
        labels = batch.label if estimator == "acc" else None
        emb = model.encode_pixels(batch.pixels, batch.mask, batch.geom, batch.padded)
        for i, d in enumerate(shifts):
            logits = model.classify(model.encode_time(emb, batch.positions + int(d)))
            probs = logits.float().softmax(-1)[None]
            if acc is None:
                acc = _Accumulator(len(shifts), probs.shape[-1], probs.device)
            acc.add(probs, labels, slice(i, i + 1))
        acc.n += len(batch)
        if labels is not None:
            acc.n_labelled += (labels >= 0).sum()
    scores = acc.scores(estimator, class_prior)
    return ShiftScores(shifts, scores, estimator, _best(shifts, scores, estimator))

"""Scores of a classifier on a labelled split, and label-free selection criteria."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from sklearn.metrics import accuracy_score, cohen_kappa_score, confusion_matrix, f1_score, precision_recall_fscore_support


def classification_metrics(y_true: np.ndarray, y_pred: np.ndarray, classes: Sequence[str]) -> dict[str, Any]:
    """Accuracy, macro F1 (the headline), weighted F1, Cohen's kappa, per-class report, confusion.

    Macro and weighted F1 average over the classes present in ``y_true`` or ``y_pred``,
    as scikit-learn does by default. Returns floats under ``accuracy``, ``macro_f1``,
    ``weighted_f1``, ``kappa``; ``report`` maps class name -> precision/recall/f1/support;
    ``confusion`` is int64 (K, K), rows true class, columns predicted, in ``classes`` order.
    """
    y_true = np.asarray(y_true)
    y_pred = np.asarray(y_pred)
    if len(y_true) == 0:
        nan = float("nan")
        return {"accuracy": nan, "macro_f1": nan, "weighted_f1": nan, "kappa": nan, "report": {},
                "confusion": np.zeros((len(classes), len(classes)), np.int64)}
    labels = np.arange(len(classes))
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=labels, zero_division=0
    )
    kappa = cohen_kappa_score(y_true, y_pred) if len(np.unique(np.concatenate([y_true, y_pred]))) > 1 else 1.0
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "macro_f1": float(f1_score(y_true, y_pred, average="macro", zero_division=0)),
        "weighted_f1": float(f1_score(y_true, y_pred, average="weighted", zero_division=0)),
        "kappa": float(kappa),
        "report": {
            name: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
            for name, p, r, f, s in zip(classes, precision, recall, f1, support)
        },
        "confusion": confusion_matrix(y_true, y_pred, labels=labels).astype(np.int64),
    }


def entropy(probs: np.ndarray, axis: int = -1) -> np.ndarray:
    """Shannon entropy (nats) along ``axis``."""
    return -(probs * np.log(np.clip(probs, 1e-12, None))).sum(axis=axis)


def information_maximization(probs: np.ndarray) -> float:
    """H(mean prediction) - mean H(prediction): high when predictions are confident and diverse.

    An unsupervised model-selection criterion (uses no labels). ``probs`` (N, K).
    """
    if len(probs) == 0:
        return float("nan")
    return float(entropy(probs.mean(axis=0)) - entropy(probs).mean())

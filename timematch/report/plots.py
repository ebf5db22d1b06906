"""The report's figures (matplotlib, Agg backend: files only): the launch's bar chart of the
results table (:func:`plot_methods`) and a trial's confusion matrix (:func:`plot_confusion`)
and temporal shift estimation scores (:func:`plot_shift_scores`). Each returns the figure;
the caller saves and closes it."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from timematch.report.tables import ResultTable, column_label


def agg_pyplot():
    """matplotlib's pyplot on the Agg backend (files only, no display), for every figure of a report."""
    # matplotlib: about a second at import (tests/test_architecture.py, DEFERRED); only plots need it
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_methods(table: ResultTable, title: str | None = None):
    """Grouped bars: one group per scenario (and the average), one bar per method, std as error bars."""
    plt = agg_pyplot()
    columns = table.columns
    width = 0.8 / max(len(table.methods), 1)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.4 * len(columns) + 2), 4.0))
    x = np.arange(len(columns))
    for i, method in enumerate(table.methods):
        cells = [table.value(method, c) for c in columns]
        means = np.array([c.mean for c in cells]) * 100
        errors = np.nan_to_num(np.array([c.std for c in cells]) * 100)
        ax.bar(x + (i - (len(table.methods) - 1) / 2) * width, np.nan_to_num(means), width, yerr=errors,
               label=method, capsize=2)
    ax.set_xticks(x, [column_label(c) for c in columns])
    ax.set_ylabel(f"{table.metric} (x100)")
    ax.set_title(title or f"best trial per fold by {table.objective}")
    ax.legend(fontsize="small", ncols=min(len(table.methods), 4))
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


def plot_confusion(confusion: np.ndarray, classes: Sequence[str], title: str = "confusion matrix"):
    """Row-normalised confusion matrix (rows: true class), with counts in the cells.

    ``confusion``: ``(classes, classes)`` counts, rows true, columns predicted."""
    plt = agg_pyplot()
    confusion = np.asarray(confusion)
    totals = confusion.sum(axis=1, keepdims=True)
    normalised = np.divide(confusion, totals, out=np.zeros(confusion.shape, dtype=float), where=totals > 0)
    size = max(4.0, 0.45 * len(classes) + 2)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    image = ax.imshow(normalised, vmin=0, vmax=1, cmap="Blues")
    ax.set_xticks(range(len(classes)), classes, rotation=60, ha="right", fontsize="small")
    ax.set_yticks(range(len(classes)), classes, fontsize="small")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(confusion.shape[0]):
        for j in range(confusion.shape[1]):
            if confusion[i, j]:
                ax.text(j, i, str(int(confusion[i, j])), ha="center", va="center", fontsize="x-small",
                        color="white" if normalised[i, j] > 0.5 else "black")
    fig.colorbar(image, ax=ax, fraction=0.046)
    ax.set_title(title)
    fig.tight_layout()
    return fig


def plot_shift_scores(shift_scores: Sequence[Mapping[str, Any]], title: str = "temporal shift estimation"):
    """One curve per estimation (score vs candidate shift), its estimate marked."""
    plt = agg_pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    colors = plt.cm.viridis(np.linspace(0, 1, max(len(shift_scores), 1)))
    for i, entry in enumerate(shift_scores):
        shifts = np.asarray(entry["shifts"])
        scores = np.asarray(entry["scores"], dtype=float)
        label = f"{entry.get('label', i)}: {entry.get('estimator', '?')}, d={entry.get('estimate')}"
        ax.plot(shifts, scores, color=colors[i], label=label)
        if entry.get("estimate") is not None and entry["estimate"] in list(shifts):
            k = list(shifts).index(entry["estimate"])
            ax.plot([shifts[k]], [scores[k]], "o", color=colors[i])
    ax.set_xlabel("shift (days)")
    ax.set_ylabel("score")
    ax.set_title(title)
    if len(shift_scores) <= 12:
        ax.legend(fontsize="x-small")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig

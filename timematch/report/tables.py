"""The paper-style results table: per (scenario, method, fold) the trial with the best
objective, then the mean and standard deviation of its test metric over folds (and seeds), as
Markdown and HTML::

    rows -> summarize(rows, "target_val_f1") -> ResultTable
    table.to_markdown(), table.to_html()

The standard deviation is the population one (``numpy.std``, ddof 0) over folds. The
``Avg`` column is the mean over scenarios of the per-scenario means; its spread is the
standard deviation over folds of the per-fold averages, when every scenario has the same
folds. Methods appear in the paper's order; reference methods (source-only, upper bound) are
never marked best.
"""

from __future__ import annotations

import dataclasses
import html
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from timematch.methods import get_method, method_names, methods_in_table_order
from timematch.report.rows import TrialRow, best_trials, is_candidate

AVERAGE = "Avg"


def is_reference(method: str) -> bool:
    """A reference row (the method class says so: source-only, upper bound): never marked best."""
    return method in method_names() and bool(get_method(method).reference)


def method_order(methods: Iterable[str]) -> list[str]:
    """Methods sorted as in the paper's tables (each method class's ``table_order``);
    unregistered names last, by name."""
    return methods_in_table_order(sorted(set(methods)))


def column_label(column: str) -> str:
    """A scenario column as the tables print it (``DK-FR1`` -> ``DK → FR1``); ``Avg`` as is."""
    return column.replace("-", " → ", 1) if column != AVERAGE else column


@dataclass(frozen=True)
class Cell:
    """Mean and standard deviation of one metric over folds."""

    mean: float
    std: float
    values: tuple[float, ...]

    @property
    def n(self) -> int:
        return len(self.values)

    def format(self, scale: float = 100.0, digits: int = 1) -> str:
        if math.isnan(self.mean):
            return "-"
        if self.n < 2 or math.isnan(self.std):
            return f"{self.mean * scale:.{digits}f}"
        return f"{self.mean * scale:.{digits}f} ± {self.std * scale:.{digits}f}"


def cell(values: Sequence[float]) -> Cell:
    array = np.asarray(values, dtype=float)
    if array.size == 0:
        return Cell(float("nan"), float("nan"), ())
    return Cell(float(array.mean()), float(array.std()), tuple(float(v) for v in array))


@dataclass(frozen=True)
class ResultTable:
    """Rows: methods; columns: scenarios and their average; cells: mean ± std over folds."""

    methods: list[str]
    scenarios: list[str]
    cells: dict[tuple[str, str], Cell]
    average: dict[str, Cell]
    metric: str
    objective: str
    folds: list[int]
    notes: tuple[str, ...] = ()
    #: (method, scenario) -> the number of candidate trials per fold the cell selected from
    trials_per_fold: dict[tuple[str, str], tuple[int, ...]] = dataclasses.field(default_factory=dict)
    seeds: list[int] = dataclasses.field(default_factory=lambda: [0])

    @property
    def columns(self) -> list[str]:
        return [*self.scenarios, AVERAGE]

    def value(self, method: str, column: str) -> Cell:
        if column == AVERAGE:
            return self.average.get(method, cell([]))
        return self.cells.get((method, column), cell([]))

    def best_in(self, column: str) -> set[str]:
        """The adaptation methods with the highest mean in ``column`` (ties all; reference methods excluded)."""
        means = {m: self.value(m, column).mean for m in self.methods if not is_reference(m)}
        means = {m: v for m, v in means.items() if not math.isnan(v)}
        top = max(means.values(), default=None)
        return {m for m, v in means.items() if v == top}

    def caption(self) -> str:
        if len(self.seeds) > 1:
            spread = (f"mean ± std over folds x seeds (folds {', '.join(map(str, self.folds))}; seeds "
                      f"{', '.join(map(str, self.seeds))}: {len(self.folds) * len(self.seeds)} per cell)")
        elif len(self.folds) == 1:
            spread = f"fold {self.folds[0]} only (one fold: no ± std)"
        else:
            spread = f"mean ± std over folds {', '.join(map(str, self.folds))}"
        per = "fold and seed" if len(self.seeds) > 1 else "fold"
        return f"{self.metric} (x100), {spread}; the best trial per {per} by {self.objective}"

    def selection_note(self) -> str:
        """How many finished trials per fold and how many folds each row's cells selected from."""
        parts = []
        for method in self.methods:
            per_cell = [self.trials_per_fold[(method, s)] for s in self.scenarios if (method, s) in self.trials_per_fold]
            if not per_cell:
                continue
            counts = [n for cell_counts in per_cell for n in cell_counts]
            trials = _span(min(counts), max(counts))
            folds = _span(min(map(len, per_cell)), max(map(len, per_cell)))
            parts.append(f"{method} {trials} x {folds}")
        per = "(finished trials per fold and seed x folds x seeds)" if len(self.seeds) > 1 else \
            "(finished trials per fold x folds)"
        note = f"Each cell selects from {per}: " + "; ".join(parts) + "."
        references = [m for m in self.methods if is_reference(m)]
        if references:
            note += f" Reference rows ({', '.join(references)}) are never marked best."
        return note

    def to_markdown(self) -> str:
        header = ["Method", *[column_label(c) for c in self.columns]]
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + [":-:"] * len(self.columns)) + "|"]
        best = {c: self.best_in(c) for c in self.columns}
        for method in self.methods:
            cells = []
            for column in self.columns:
                text = self.value(method, column).format()
                cells.append(f"**{text}**" if method in best[column] else text)
            lines.append("| " + " | ".join([method, *cells]) + " |")
        footer = [f"\n{self.caption()}.", self.selection_note()] + [f"{note}" for note in self.notes]
        return "\n".join(lines) + "\n" + "\n".join(footer) + "\n"

    def to_html(self, title: str = "TimeMatch results") -> str:
        best = {c: self.best_in(c) for c in self.columns}
        head = "".join(f"<th>{html.escape(column_label(c))}</th>" for c in self.columns)
        body = []
        for method in self.methods:
            cells = []
            for column in self.columns:
                text = html.escape(self.value(method, column).format())
                cells.append(f"<td><b>{text}</b></td>" if method in best[column] else f"<td>{text}</td>")
            body.append(f"<tr><th>{html.escape(method)}</th>{''.join(cells)}</tr>")
        notes = "".join(f"<p>{html.escape(note)}</p>" for note in (self.selection_note(), *self.notes))
        return (
            "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(title)}</title><style>"
            "body{font-family:sans-serif}table{border-collapse:collapse}"
            "th,td{border:1px solid #999;padding:4px 8px;text-align:center}th{background:#eee}"
            "</style></head><body>\n"
            f"<table><caption>{html.escape(self.caption())}</caption>"
            f"<thead><tr><th>Method</th>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>\n"
            f"{notes}</body></html>\n"
        )


def _span(low: int, high: int) -> str:
    return f"{low}" if low == high else f"{low}-{high}"


def summarize(
    rows: Iterable[TrialRow],
    objective: str,
    metric: str = "test_macro_f1",
    scenarios: Sequence[str] | None = None,
    notes: Sequence[str] = (),
) -> ResultTable:
    """The paper-style table of ``metric`` for the best trial per fold by ``objective``."""
    rows = list(rows)
    chosen = [row for row in best_trials(rows, objective) if metric in row.metrics]
    candidates: dict[tuple[str, str], dict[tuple[int, int], int]] = {}
    for row in rows:
        if not is_candidate(row, objective):
            continue
        per_fold = candidates.setdefault((row.method, row.scenario), {})
        per_fold[row.replicate] = per_fold.get(row.replicate, 0) + 1
    scenario_names = list(scenarios) if scenarios else list(dict.fromkeys(r.scenario for r in chosen))
    methods = method_order(r.method for r in chosen)
    by_fold: dict[tuple[str, str], dict[tuple[int, int], float]] = {}
    for row in chosen:
        by_fold.setdefault((row.method, row.scenario), {})[row.replicate] = float(row.metrics[metric])
    cells = {key: cell([v for _, v in sorted(values.items())]) for key, values in by_fold.items()}
    average = {}
    for method in methods:
        per_scenario = [by_fold.get((method, s), {}) for s in scenario_names]
        if not scenario_names or any(not folds for folds in per_scenario):
            continue  # an average over some scenarios only would mislead
        means = [cells[(method, s)].mean for s in scenario_names]
        common = set.intersection(*(set(folds) for folds in per_scenario))
        if all(set(folds) == common for folds in per_scenario) and len(common) > 1:
            fold_means = [np.mean([folds[f] for folds in per_scenario]) for f in sorted(common)]
            spread = float(np.std(fold_means))
        else:
            spread = float("nan")
        average[method] = Cell(float(np.mean(means)), spread, tuple(means))
    folds = sorted({r.fold for r in chosen})
    seeds = sorted({r.seed for r in chosen}) or [0]
    trials_per_fold = {key: tuple(n for _, n in sorted(per_fold.items())) for key, per_fold in candidates.items()}
    return ResultTable(methods, scenario_names, cells, average, metric, objective, folds, tuple(notes),
                       trials_per_fold, seeds)

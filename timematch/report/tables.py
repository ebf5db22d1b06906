"""The paper-style results table: per (scenario, method, fold) the trial with the best
objective, then the mean and standard deviation of its test metric over folds (and seeds), as
Markdown and HTML, as the report's first section (:meth:`ResultTable.section`)::

    rows -> summarize(rows, "target_val_f1") -> ResultTable
    table.section(), table.to_markdown(), table.to_html()

The standard deviation is the population one (``numpy.std``, ddof 0) over folds. The
``Avg`` column is the mean over scenarios of the per-scenario means; its spread is the
standard deviation over folds of the per-fold averages, when every scenario has the same
folds. Methods appear in the paper's order; reference methods (source-only, upper bound) are
never marked best: never bold, and the runner never tags their trials ``best=true`` nor
registers their models as ``best`` (:mod:`timematch.runner.reporting`,
:mod:`timematch.runner.registry`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from timematch.methods import get_method, method_names, methods_in_table_order
from timematch.report.document import Document, Figure, Section, Table, Text
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
    #: method -> a mark after its name (``=A``: the rows of one model, named in a note; see
    #: :mod:`timematch.report.agreement`)
    marks: dict[str, str] = dataclasses.field(default_factory=dict)

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
            note += (f" Reference rows ({', '.join(references)}) are never marked best: never bold here; in MLflow "
                     "their trials are tagged reference=true, best=false and rank=reference, and their models "
                     "registered with the alias reference.")
        return note

    def section(self, figures: Sequence[Figure] = ()) -> Section:
        """The report's results section: the table, its caption, the selection note and the
        notes, then ``figures`` (the table as bars)."""
        best = {c: self.best_in(c) for c in self.columns}
        rows = tuple((f"{method} ({self.marks[method]})" if method in self.marks else method,
                      *(self.value(method, c).format() for c in self.columns)) for method in self.methods)
        bold = frozenset((r, c + 1) for r, method in enumerate(self.methods)
                         for c, column in enumerate(self.columns) if method in best[column])
        table = Table(("Method", *(column_label(c) for c in self.columns)), rows, bold=bold)
        notes = [Text(f"{self.caption()}."), Text(self.selection_note()), *(Text(note) for note in self.notes)]
        return Section(f"Results: {self.metric} (x100)", (table, *notes, *figures))

    def to_markdown(self) -> str:
        return self.section().to_markdown(heading=False)

    def to_html(self, title: str = "TimeMatch results") -> str:
        return Document(title, [self.section()]).to_html()


def _span(low: int, high: int) -> str:
    return f"{low}" if low == high else f"{low}-{high}"


def summarize(
    rows: Iterable[TrialRow],
    objective: str,
    metric: str = "test_macro_f1",
    scenarios: Sequence[str] | None = None,
    notes: Sequence[str] = (),
    marks: dict[str, str] | None = None,
) -> ResultTable:
    """The paper-style table of ``metric`` for the best trial per fold by ``objective``;
    ``notes`` under it, ``marks`` after the names of its rows (:attr:`ResultTable.marks`)."""
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
                       trials_per_fold, seeds, dict(marks or {}))

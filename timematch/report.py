"""Result tables and plots, from plain result rows (no Ray, no MLflow).

A *row* is one finished trial: a mapping with ``scenario``, ``method``, ``fold``, ``trial``
and metric values (the objective's value of the final model, ``test_macro_f1``, ...). The
paper-style table takes, per (scenario, method, fold), the trial with the best objective,
then the mean and standard deviation of its test metric over folds::

    rows -> best_trials(rows, "target_val_f1") -> summarize(...) -> ResultTable
    table.to_markdown(), table.to_html(), plot_methods(table)

The standard deviation is the population one (``numpy.std``, ddof 0) over folds. The
``Avg`` column is the mean over scenarios of the per-scenario means; its spread is the
standard deviation over folds of the per-fold averages, when every scenario has the same
folds.

Also the per-trial artifacts: :func:`plot_confusion`, :func:`plot_shift_scores`,
:func:`per_class_csv`.
"""

from __future__ import annotations

import dataclasses
import html
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from timematch.methods import get_method, method_names, methods_in_table_order

AVERAGE = "Avg"


def is_reference(method: str) -> bool:
    """A reference row (the method class says so: source-only, upper bound): never marked best."""
    return method in method_names() and bool(get_method(method).reference)


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


def _key(row: Mapping[str, Any]) -> tuple[str, str, tuple[int, int]]:
    """(scenario, method, replicate): a replicate is one (fold, seed) of a cell."""
    return str(row["scenario"]), str(row["method"]), (int(row["fold"]), int(row.get("seed", 0)))


def is_candidate(row: Mapping[str, Any], objective: str) -> bool:
    """A row can be selected by ``objective`` when it has a value for it (not missing, not NaN)."""
    value = row.get(objective)
    return value is not None and not (isinstance(value, float) and math.isnan(value))


def ranked_trials(rows: Iterable[Mapping[str, Any]], objective: str) -> dict[tuple[str, str, tuple[int, int]],
                                                                            list[Mapping[str, Any]]]:
    """Per (scenario, method, replicate), its rows by ``objective``, best first: rank ``i + 1``
    is the row at index ``i``.

    Rows whose objective is missing or NaN are left out (they have no rank); ties go to the
    smallest ``trial``, so the order does not depend on row order.
    """
    groups: dict[tuple[str, str, tuple[int, int]], list[Mapping[str, Any]]] = {}
    for row in rows:
        if is_candidate(row, objective):
            groups.setdefault(_key(row), []).append(row)
    return {key: sorted(group, key=lambda r: (-float(r[objective]), str(r.get("trial", ""))))
            for key, group in sorted(groups.items())}


def best_trials(rows: Iterable[Mapping[str, Any]], objective: str) -> list[Mapping[str, Any]]:
    """Per (scenario, method, fold), the row with the highest ``objective`` (the first of
    :func:`ranked_trials`)."""
    return [group[0] for group in ranked_trials(rows, objective).values()]


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
        header = ["Method", *[_arrow(c) for c in self.columns]]
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
        head = "".join(f"<th>{html.escape(_arrow(c))}</th>" for c in self.columns)
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


def _arrow(column: str) -> str:
    return column.replace("-", " → ", 1) if column != AVERAGE else column


def method_order(methods: Iterable[str]) -> list[str]:
    """Methods sorted as in the paper's tables (each method class's ``table_order``);
    unregistered names last, by name."""
    return methods_in_table_order(sorted(set(methods)))


def summarize(
    rows: Iterable[Mapping[str, Any]],
    objective: str,
    metric: str = "test_macro_f1",
    scenarios: Sequence[str] | None = None,
    notes: Sequence[str] = (),
) -> ResultTable:
    """The paper-style table of ``metric`` for the best trial per fold by ``objective``."""
    rows = list(rows)
    chosen = [row for row in best_trials(rows, objective) if row.get(metric) is not None]
    candidates: dict[tuple[str, str], dict[int, int]] = {}
    for row in rows:
        if not is_candidate(row, objective):
            continue
        scenario, method, fold = _key(row)
        per_fold = candidates.setdefault((method, scenario), {})
        per_fold[fold] = per_fold.get(fold, 0) + 1
    scenario_names = list(scenarios) if scenarios else list(dict.fromkeys(str(r["scenario"]) for r in chosen))
    methods = method_order(str(r["method"]) for r in chosen)
    by_fold: dict[tuple[str, str], dict[int, float]] = {}
    for row in chosen:
        scenario, method, fold = _key(row)
        by_fold.setdefault((method, scenario), {})[fold] = float(row[metric])
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
    folds = sorted({int(r["fold"]) for r in chosen})
    seeds = sorted({int(r.get("seed", 0)) for r in chosen}) or [0]
    trials_per_fold = {key: tuple(n for _, n in sorted(per_fold.items())) for key, per_fold in candidates.items()}
    return ResultTable(methods, scenario_names, cells, average, metric, objective, folds, tuple(notes),
                       trials_per_fold, seeds)


def plot_methods(table: ResultTable, title: str | None = None):
    """Grouped bars: one group per scenario (and the average), one bar per method, std as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    ax.set_xticks(x, [_arrow(c) for c in columns])
    ax.set_ylabel(f"{table.metric} (x100)")
    ax.set_title(title or f"best trial per fold by {table.objective}")
    ax.legend(fontsize="small", ncols=min(len(table.methods), 4))
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


def plot_confusion(confusion: np.ndarray, classes: Sequence[str], title: str = "confusion matrix"):
    """Row-normalised confusion matrix (rows: true class), with counts in the cells."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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


def per_class_csv(report: Mapping[str, Mapping[str, float]]) -> str:
    """The per-class report (class -> precision, recall, f1, support) as CSV text."""
    columns: list[str] = []
    for values in report.values():
        columns.extend(k for k in values if k not in columns)
    lines = [",".join(["class", *columns])]
    for name, values in report.items():
        lines.append(",".join([_csv(name), *(_csv(values.get(c, "")) for c in columns)]))
    return "\n".join(lines) + "\n"


def _csv(value: Any) -> str:
    text = f"{value:.6g}" if isinstance(value, float) else str(value)
    return f'"{text}"' if any(c in text for c in ',"\n') else text


# -- the cost of choosing without target labels ---------------------------------------------

#: The column of the selection-gap table that selects by the test metric itself: the best a
#: criterion could do, shown as a reference and never used to select anything.
BEST_POSSIBLE = "best possible"


@dataclass(frozen=True)
class SelectionGap:
    """Per method, the average test metric over scenarios when trials are selected by each
    criterion, next to the oracle and the best possible trial; and per method and criterion
    the mean Spearman rank correlation between the criterion and the test metric over the
    trials of a group (scenario, method, fold; groups of 3 or more trials)."""

    methods: list[str]
    criteria: list[str]  # selection criteria, the oracle among them; then BEST_POSSIBLE
    average: dict[tuple[str, str], float]  # (method, criterion) -> mean test metric (x1)
    correlation: dict[tuple[str, str], tuple[float, int]]  # (method, criterion) -> (mean rho, groups)
    metric: str
    oracle: str

    def to_markdown(self) -> str:
        head = [*(f"{c} (oracle)" if c == self.oracle else c for c in self.criteria), f"{BEST_POSSIBLE} (reference)"]
        lines = [f"Selection gap: average {self.metric} (x100) over scenarios when each criterion selects the trial "
                 "per fold; in brackets, the mean Spearman correlation of the criterion with the test metric "
                 "across a group's trials.", "",
                 "| Method | " + " | ".join(head) + " |", "|---|" + ":-:|" * len(head)]
        for method in self.methods:
            cells = []
            for criterion in [*self.criteria, BEST_POSSIBLE]:
                value = self.average.get((method, criterion), float("nan"))
                text = "–" if math.isnan(value) else f"{100 * value:.1f}"
                rho, groups = self.correlation.get((method, criterion), (float("nan"), 0))
                if criterion != BEST_POSSIBLE and groups:
                    text += f" (ρ {rho:+.2f})"
                cells.append(text)
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        lines.append("")
        lines.append(f"'{BEST_POSSIBLE}' selects by the test split itself: a bound on any criterion, never a "
                     f"selection. '{self.oracle}' uses target validation labels; the others use none, except "
                     "few_shot_target_f1 (a few labelled target validation parcels per class).")
        return "\n".join(lines) + "\n"


def selection_gap(rows: Iterable[Mapping[str, Any]], criteria: Sequence[str], oracle: str = "target_val_f1",
                  metric: str = "test_macro_f1", scenarios: Sequence[str] | None = None) -> SelectionGap:
    """The :class:`SelectionGap` of finished-trial ``rows`` (criteria without values are left out)."""
    from scipy.stats import spearmanr

    rows = [row for row in rows if is_candidate(row, metric)]
    present = [c for c in dict.fromkeys([oracle, *criteria]) if any(is_candidate(r, c) for r in rows)]
    methods = method_order(str(r["method"]) for r in rows)
    average: dict[tuple[str, str], float] = {}
    for criterion in [*present, BEST_POSSIBLE]:
        table = summarize(rows, metric if criterion == BEST_POSSIBLE else criterion, metric, scenarios)
        for method in methods:
            value = table.value(method, AVERAGE)
            if value.n:
                average[(method, criterion)] = value.mean
    groups: dict[tuple[str, str, int], list[Mapping[str, Any]]] = {}
    for row in rows:
        groups.setdefault(_key(row), []).append(row)
    correlation: dict[tuple[str, str], tuple[float, int]] = {}
    for method in methods:
        for criterion in present:
            rhos = []
            for (_, group_method, _), members in groups.items():
                pairs = [(r[criterion], r[metric]) for r in members if group_method == method and is_candidate(r, criterion)]
                if len(pairs) >= 3 and len({p[0] for p in pairs}) > 1 and len({p[1] for p in pairs}) > 1:
                    rhos.append(float(spearmanr(*zip(*pairs)).statistic))
            if rhos:
                correlation[(method, criterion)] = (float(np.mean(rhos)), len(rhos))
    return SelectionGap(methods, present, average, correlation, metric, oracle)


# -- paired comparison over folds x seeds ----------------------------------------------------


@dataclass(frozen=True)
class PairedComparison:
    """Per scenario and competitor: the selected trials of ``reference`` and the competitor
    paired by replicate (fold, seed); wins, losses and ties of ``reference`` on the test metric,
    the mean difference, and the two-sided Wilcoxon signed-rank p-value (NaN below 2 pairs)."""

    reference: str
    metric: str
    objective: str
    rows: list[tuple[str, str, int, int, int, float, float]]  # scenario, other, wins, losses, ties, mean diff, p

    def to_markdown(self) -> str:
        lines = [f"Paired comparison: {self.reference} against every other method, per scenario, over the "
                 f"folds x seeds both ran (the trial each selects by {self.objective}; {self.metric} x100).", "",
                 f"| Scenario | vs | {self.reference} wins | losses | ties | mean difference | Wilcoxon p |",
                 "|---|---|:-:|:-:|:-:|:-:|:-:|"]
        for scenario, other, wins, losses, ties, diff, p in self.rows:
            shown_p = "–" if math.isnan(p) else f"{p:.3f}"
            lines.append(f"| {_arrow(scenario)} | {other} | {wins} | {losses} | {ties} | {100 * diff:+.1f} | {shown_p} |")
        return "\n".join(lines) + "\n"


def paired_comparison(rows: Iterable[Mapping[str, Any]], objective: str, metric: str = "test_macro_f1",
                      reference: str = "timematch", scenarios: Sequence[str] | None = None) -> PairedComparison:
    """The :class:`PairedComparison` of ``reference`` in finished-trial ``rows``."""
    from scipy.stats import wilcoxon

    chosen: dict[tuple[str, str], dict[tuple[int, int], float]] = {}
    for row in best_trials(rows, objective):
        if is_candidate(row, metric):
            scenario, method, replicate = _key(row)
            chosen.setdefault((scenario, method), {})[replicate] = float(row[metric])
    names = list(scenarios) if scenarios else list(dict.fromkeys(s for s, _ in chosen))
    out = []
    for scenario in names:
        mine = chosen.get((scenario, reference), {})
        for other in method_order(m for s, m in chosen if s == scenario and m != reference):
            theirs = chosen[(scenario, other)]
            common = sorted(set(mine) & set(theirs))
            if not common:
                continue
            diffs = np.array([mine[r] - theirs[r] for r in common])
            wins, losses = int((diffs > 0).sum()), int((diffs < 0).sum())
            p = float(wilcoxon(diffs).pvalue) if len(common) >= 2 and np.any(diffs != 0) else float("nan")
            out.append((scenario, other, wins, losses, len(common) - wins - losses, float(diffs.mean()), p))
    return PairedComparison(reference, metric, objective, out)

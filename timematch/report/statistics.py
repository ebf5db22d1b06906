"""What the choice of a trial costs and how methods compare, from the report's rows:

- :func:`selection_gap`: per method, the test metric when each selection criterion (no target
  labels) picks the trial, against the oracle (target validation labels) and the best possible
  trial, and the Spearman rank correlation of each criterion with the test metric;
- :func:`paired_comparison`: one method against each other, paired by replicate (fold, seed):
  wins, losses, ties and the Wilcoxon signed-rank test.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from timematch.report.document import Section, Table, Text
from timematch.report.rows import GroupKey, TrialRow, best_trials, is_candidate
from timematch.report.tables import AVERAGE, column_label, method_order, summarize

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

    def section(self) -> Section:
        """The report's selection-gap section: what each criterion's choice scores, against the
        oracle and the best possible trial."""
        head = [*(f"{c} (oracle)" if c == self.oracle else c for c in self.criteria), f"{BEST_POSSIBLE} (reference)"]
        rows = []
        for method in self.methods:
            cells = []
            for criterion in [*self.criteria, BEST_POSSIBLE]:
                value = self.average.get((method, criterion), float("nan"))
                text = "–" if math.isnan(value) else f"{100 * value:.1f}"
                rho, groups = self.correlation.get((method, criterion), (float("nan"), 0))
                if criterion != BEST_POSSIBLE and groups:
                    text += f" (ρ {rho:+.2f})"
                cells.append(text)
            rows.append((method, *cells))
        return Section("Selection gap", (
            Text(f"Selection gap: average {self.metric} (x100) over scenarios when each criterion selects the trial "
                 "per fold; in brackets, the mean Spearman correlation of the criterion with the test metric "
                 "across a group's trials."),
            Table(("Method", *head), tuple(rows)),
            Text(f"'{BEST_POSSIBLE}' selects by the test split itself: a bound on any criterion, never a "
                 f"selection. '{self.oracle}' uses target validation labels; the others use none, except "
                 "few_shot_target_f1 (a few labelled target validation parcels per class)."),
        ))

    def to_markdown(self) -> str:
        return self.section().to_markdown(heading=False)


def selection_gap(rows: Iterable[TrialRow], criteria: Sequence[str], oracle: str = "target_val_f1",
                  metric: str = "test_macro_f1", scenarios: Sequence[str] | None = None) -> SelectionGap:
    """The :class:`SelectionGap` of finished-trial ``rows`` (criteria without values are left out)."""
    # scipy: over a second at import (tests/test_architecture.py, DEFERRED); only these statistics need it
    from scipy.stats import spearmanr

    rows = [row for row in rows if is_candidate(row, metric)]
    present = [c for c in dict.fromkeys([oracle, *criteria]) if any(is_candidate(r, c) for r in rows)]
    methods = method_order(r.method for r in rows)
    average: dict[tuple[str, str], float] = {}
    for criterion in [*present, BEST_POSSIBLE]:
        table = summarize(rows, metric if criterion == BEST_POSSIBLE else criterion, metric, scenarios)
        for method in methods:
            value = table.value(method, AVERAGE)
            if value.n:
                average[(method, criterion)] = value.mean
    groups: dict[GroupKey, list[TrialRow]] = {}
    for row in rows:
        groups.setdefault(row.group, []).append(row)
    correlation: dict[tuple[str, str], tuple[float, int]] = {}
    for method in methods:
        for criterion in present:
            rhos = []
            for (_, group_method, _), members in groups.items():
                pairs = [(r.metrics[criterion], r.metrics[metric]) for r in members
                         if group_method == method and is_candidate(r, criterion)]
                if len(pairs) >= 3 and len({p[0] for p in pairs}) > 1 and len({p[1] for p in pairs}) > 1:
                    rhos.append(float(spearmanr(*zip(*pairs)).statistic))
            if rhos:
                correlation[(method, criterion)] = (float(np.mean(rhos)), len(rhos))
    return SelectionGap(methods, present, average, correlation, metric, oracle)


@dataclass(frozen=True)
class PairedComparison:
    """Per scenario and competitor: the selected trials of ``reference`` and the competitor
    paired by replicate (fold, seed); wins, losses and ties of ``reference`` on the test metric,
    the mean difference, and the two-sided Wilcoxon signed-rank p-value (NaN below 2 pairs)."""

    reference: str
    metric: str
    objective: str
    rows: list[tuple[str, str, int, int, int, float, float]]  # scenario, other, wins, losses, ties, mean diff, p

    def section(self) -> Section:
        """The report's paired-comparison section."""
        rows = []
        for scenario, other, wins, losses, ties, diff, p in self.rows:
            shown_p = "–" if math.isnan(p) else f"{p:.3f}"
            rows.append((column_label(scenario), other, str(wins), str(losses), str(ties), f"{100 * diff:+.1f}",
                         shown_p))
        return Section("Paired comparison", (
            Text(f"Paired comparison: {self.reference} against every other method, per scenario, over the "
                 f"folds x seeds both ran (the trial each selects by {self.objective}; {self.metric} x100)."),
            Table(("Scenario", "vs", f"{self.reference} wins", "losses", "ties", "mean difference", "Wilcoxon p"),
                  tuple(rows), align=("left", "left", "center", "center", "center", "center", "center")),
        ))

    def to_markdown(self) -> str:
        return self.section().to_markdown(heading=False)


def paired_comparison(rows: Iterable[TrialRow], objective: str, metric: str = "test_macro_f1",
                      reference: str = "timematch", scenarios: Sequence[str] | None = None) -> PairedComparison:
    """The :class:`PairedComparison` of ``reference`` in finished-trial ``rows``."""
    # scipy: over a second at import (tests/test_architecture.py, DEFERRED); only these statistics need it
    from scipy.stats import wilcoxon

    chosen: dict[tuple[str, str], dict[tuple[int, int], float]] = {}
    for row in best_trials(rows, objective):
        if is_candidate(row, metric):
            chosen.setdefault((row.scenario, row.method), {})[row.replicate] = float(row.metrics[metric])
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

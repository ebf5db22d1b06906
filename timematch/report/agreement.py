"""Rows that are one model: the report's check that the methods it compares acted.

A short budget can leave an adaptation method where it started (its weights barely move;
the batch-norm statistics re-estimated on target batches change a few predictions, the same
way for every method), so several rows of the table can be one model under different names.
Nothing is dropped: :func:`degenerate_rows` finds, in each cell (scenario, fold, seed), the
methods whose selected trials predict the same class on at least ``threshold`` of the target
test parcels, and the adaptation trials that predict what their source model predicts on
that share (``final_changed_predictions``, :mod:`timematch.movement`); each finding is a
:class:`Degenerate`, which says itself in one sentence under the table and in the terminal.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from timematch.methods import get_method, method_names, methods_in_table_order
from timematch.report.document import Section, Table, Text
from timematch.report.rows import TrialRow, best_trials

#: Rows agreeing on at least this share of the target test parcels are reported as one model.
THRESHOLD = 0.99

SAME = "same predictions"
UNMOVED = "unmoved"

#: (scenario, fold, seed): the rows of one table cell per method
Cell = tuple[str, int, int]


@dataclass(frozen=True)
class Degenerate:
    """Methods that, in ``cells`` of ``compared`` cells, are one model: ``SAME``: their
    selected trials agree on at least ``agreement`` of the target test parcels (the lowest
    pairwise share over those cells); ``UNMOVED``: each agrees with the source model it started
    from on at least ``agreement``. ``moved``: the most any of their adaptation trials moved
    its weights from the source model (relative, encoder or classifier), None if unknown."""

    methods: tuple[str, ...]
    reason: str
    cells: tuple[Cell, ...]
    compared: int
    agreement: float
    moved: float | None = None

    def sentence(self) -> str:
        where = (f"in {len(self.cells)} of {self.compared} scenario-folds ({_cells(self.cells)})"
                 if len(self.cells) < self.compared else
                 f"in every scenario-fold ({self.compared})" if self.compared > 1 else "")
        moved = "" if self.moved is None else f"; weights moved at most {100 * self.moved:.1f} % from the source model"
        parcels = " ".join(filter(None, (f"{_share(self.agreement)} of the target test parcels", where)))
        names = ", ".join(self.methods)
        if self.reason == SAME:
            return (f"{names}: the same predictions on {parcels}{moved}; at this budget they do not differ, "
                    "whatever the table's digits say.")
        verb = "predicts" if len(self.methods) == 1 else "predict"
        return f"{names}: {verb} what the source model predicts on {parcels}{moved}; at this budget adaptation did not act."


def one_model_rows(rows: Iterable[TrialRow], objective: str,
                   read: Callable[[str], np.ndarray | None]) -> list[Degenerate]:
    """:func:`degenerate_rows` of the trials the report selects from ``rows`` (one per (scenario,
    method, fold, seed) by ``objective``), their predictions read by run id with ``read`` (the
    runner's: a run's ``target_test_predictions.npy`` artifact)."""
    selected = best_trials(rows, objective)
    return degenerate_rows(selected, {row.run_id: read(row.run_id) for row in selected},
                           order=methods_in_table_order(sorted({row.method for row in selected})))


def degenerate_rows(rows: Iterable[TrialRow], predictions: Mapping[str, np.ndarray], order: Sequence[str] = (),
                    threshold: float = THRESHOLD) -> list[Degenerate]:
    """The findings on the selected ``rows`` (one per (scenario, method, fold, seed)), given each
    one's target test ``predictions`` by run id (rows without any are compared by their
    ``final_changed_predictions`` alone). ``order``: the table's order of methods."""
    cells: dict[Cell, dict[str, TrialRow]] = {}
    for row in rows:
        cells.setdefault((row.scenario, row.fold, row.seed), {})[row.method] = row
    rank = {m: i for i, m in enumerate(order)}
    sort = lambda methods: tuple(sorted(methods, key=lambda m: (rank.get(m, len(rank)), m)))  # noqa: E731
    same: dict[tuple[str, ...], list[tuple[Cell, float]]] = {}
    unmoved: dict[tuple[str, ...], list[tuple[Cell, float]]] = {}
    for cell, by_method in sorted(cells.items()):
        groups = _groups(by_method, predictions, threshold)
        for methods, agreement in groups:
            same.setdefault(sort(methods), []).append((cell, agreement))
        with_source = next((set(m) for m, _ in groups if any(_is_source(by_method[x]) for x in m)), set())
        still = {m: 1.0 - r.metrics["final_changed_predictions"] for m, r in by_method.items()
                 if "final_changed_predictions" in r.metrics and m not in with_source
                 and 1.0 - r.metrics["final_changed_predictions"] >= threshold}
        if still:
            unmoved.setdefault(sort(still), []).append((cell, min(still.values())))
    found = []
    for reason, table in ((SAME, same), (UNMOVED, unmoved)):
        for methods, where in table.items():
            moves = [_moved(cells[cell].get(m)) for cell, _ in where for m in methods]
            moves = [m for m in moves if m is not None]
            found.append(Degenerate(methods, reason, tuple(c for c, _ in where), len(cells),
                                    min(a for _, a in where), max(moves) if moves else None))
    return found


def _groups(by_method: Mapping[str, TrialRow], predictions: Mapping[str, np.ndarray],
            threshold: float) -> list[tuple[set[str], float]]:
    """The sets of methods (two or more) linked by pairwise agreement >= ``threshold``, each
    with its lowest pairwise agreement."""
    methods = [m for m, r in by_method.items() if predictions.get(r.run_id) is not None]
    parent = {m: m for m in methods}

    def root(m: str) -> str:
        while parent[m] != m:
            m = parent[m]
        return m

    pairs: dict[tuple[str, str], float] = {}
    for i, a in enumerate(methods):
        for b in methods[i + 1:]:
            pa, pb = predictions[by_method[a].run_id], predictions[by_method[b].run_id]
            if len(pa) != len(pb) or len(pa) == 0:
                continue  # not the same parcels: nothing to compare
            share = float(np.mean(pa == pb))
            pairs[a, b] = share
            if share >= threshold:
                parent[root(a)] = root(b)
    components: dict[str, set[str]] = {}
    for m in methods:
        components.setdefault(root(m), set()).add(m)
    out = []
    for members in components.values():
        if len(members) > 1:
            shares = [s for (a, b), s in pairs.items() if a in members and b in members]
            out.append((members, min(shares)))
    return out


def _is_source(row: TrialRow) -> bool:
    """The row evaluates the source model itself (the source-only baseline)."""
    return row.method in method_names() and get_method(row.method).evaluates_source_model


def _moved(row: TrialRow | None) -> float | None:
    if row is None:
        return None
    values = [row.metrics[k] for k in ("final_moved_encoder", "final_moved_classifier") if k in row.metrics]
    return max(values) if values else None


def _share(value: float) -> str:
    return "100 %" if value >= 0.9995 else f"{100 * value:.1f} %"


def _cells(cells: Sequence[Cell]) -> str:
    return ", ".join(f"{s} fold {f}" + (f" seed {seed}" if seed else "") for s, f, seed in cells)


def labelled(found: Sequence[Degenerate]) -> tuple[dict[str, str], list[str]]:
    """The table's marks and notes for ``found``: the rows of one model marked ``=A`` (``=B``,
    ... for the next such set; ``=A,B`` for a row in two), unmoved ones ``=source model``, and
    one note per finding, opening with its mark."""
    marks: dict[str, list[str]] = {}
    notes = []
    letters = iter("ABCDEFGHIJKLMNOPQRSTUVWXYZ")
    for finding in found:
        mark = f"={next(letters, '?')}" if finding.reason == SAME else "=source model"
        for method in finding.methods:
            if mark not in marks.setdefault(method, []):
                marks[method].append(mark)
        notes.append(f"({mark}) {finding.sentence()}")
    return {m: ",".join(v).replace(",=", ",") for m, v in marks.items()}, notes


#: The movement columns of :func:`movement_section`: (metric of a trial row, header)
MOVEMENT_COLUMNS = (("final_moved_encoder", "encoder moved %"), ("final_moved_classifier", "classifier moved %"),
                    ("final_changed_predictions", "predictions changed %"),
                    ("final_changed_by_batch_norm", "by batch norm alone %"))


def movement_section(rows: Iterable[TrialRow], objective: str) -> Section | None:
    """How far the trials the report selects (by ``objective``) moved from their source model,
    per method, averaged over scenario-folds (:mod:`timematch.movement`); None when no row
    logged it (a launch of reference methods only, or older runs)."""
    selected = best_trials(rows, objective)
    values: dict[str, list[TrialRow]] = {}
    for row in selected:
        if MOVEMENT_COLUMNS[0][0] in row.metrics:
            values.setdefault(row.method, []).append(row)
    if not values:
        return None
    table = Table(("Method", *(header for _, header in MOVEMENT_COLUMNS), "scenario-folds"), tuple(
        (method, *(f"{100 * np.mean([r.metrics[key] for r in values[method]]):.{1 if 'changed' in key else 2}f}"
                   for key, _ in MOVEMENT_COLUMNS), str(len(values[method])))
        for method in methods_in_table_order(sorted(values))))
    return Section("How far each method moved from its source model", (table, Text(
        "Relative change of the weights (||θ - θ0|| / ||θ0||), the share of target test parcels the returned "
        "model predicts differently from the source model it started from, and the share the trial's batch-norm "
        "statistics alone change (the source model's weights with them); means over the selected trials. Rows "
        f"whose predictions agree on at least {100 * THRESHOLD:.0f} % of the parcels are marked in the results "
        "table. None of this selects anything."),))


def terminal_line(found: Sequence[Degenerate]) -> str:
    """The findings in one line for the terminal ("" when there are none)."""
    if not found:
        return ""
    parts = [f"{', '.join(d.methods)} ({'one model' if d.reason == SAME else 'unmoved from the source model'}, "
             f"{_share(d.agreement)} of parcels)" for d in found]
    return "rows that do not differ at this budget: " + "; ".join(parts) + " (notes under the report's table)"

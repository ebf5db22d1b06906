"""The report of a launch, from its finished trials (no Ray, no MLflow: the runner's
:mod:`timematch.runner.reporting` reads the runs and builds the rows).

The package owns the report's row and the selection of a trial per (scenario, method,
replicate) (:mod:`~timematch.report.rows`), the paper-style results table
(:mod:`~timematch.report.tables`), the selection-gap and paired statistics
(:mod:`~timematch.report.statistics`), and the figures and per-class CSV that a launch and
its trials log (:mod:`~timematch.report.plots`, :mod:`~timematch.report.per_class`)::

    rows -> best_trials(rows, "target_val_f1") -> summarize(...) -> ResultTable
    table.to_markdown(), table.to_html(), plot_methods(table)

The report's file is one :class:`~timematch.report.document.Document`, a list of sections that
each part owns (``table.section()``, ``gap.section()``, ...), rendered to Markdown and to
self-contained HTML from that one structure.
"""

from timematch.report.document import Bullets, Document, Figure, Section, Table, Text
from timematch.report.per_class import per_class_csv
from timematch.report.plots import agg_pyplot, plot_confusion, plot_methods, plot_shift_scores
from timematch.report.rows import GroupKey, TrialRow, best_trials, is_candidate, ranked_trials
from timematch.report.statistics import (
    BEST_POSSIBLE, PairedComparison, SelectionGap, paired_comparison, selection_gap,
)
from timematch.report.tables import (
    AVERAGE, Cell, ResultTable, cell, column_label, is_reference, method_order, summarize,
)

__all__ = [
    "AVERAGE", "BEST_POSSIBLE", "Bullets", "Cell", "Document", "Figure", "GroupKey", "PairedComparison", "ResultTable",
    "Section", "SelectionGap", "Table", "Text", "TrialRow",
    "agg_pyplot", "best_trials", "cell", "column_label", "is_candidate", "is_reference", "method_order",
    "paired_comparison", "per_class_csv", "plot_confusion", "plot_methods", "plot_shift_scores", "ranked_trials",
    "selection_gap", "summarize",
]

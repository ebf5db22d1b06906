"""The report's row, one finished trial (:class:`TrialRow`), and the order of a group's rows by
an objective: which trial the report selects (:func:`best_trials`) and the rank of each
(:func:`ranked_trials`).

A *group* is one (scenario, method, replicate), a replicate being one (fold, seed): the report
selects one trial per group, by an objective that never looks at the test split.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

#: (scenario, method, (fold, seed)): the trials among which the report selects one
GroupKey = tuple[str, str, tuple[int, int]]


@dataclass(frozen=True)
class TrialRow:
    """One adaptation trial that ended well: finished with its test metrics, or stopped early
    by ASHA (``stopped``: its objectives are its last epoch's, it has no test metric).

    ``metrics`` holds the trial's ``test_*`` metrics and the value of each selection objective
    (``target_val_f1``, ``source_val_f1``, ...) of its final model; ``params`` its sampled
    values of the searched keys; ``trial`` the key that orders ties (the run's ``trial_key``);
    ``run_name`` its run's name, as the report names the trial.
    """

    scenario: str
    method: str
    fold: int
    trial: str
    metrics: Mapping[str, float] = field(default_factory=dict)
    seed: int = 0
    run_id: str = ""
    model_uri: str | None = None
    params: Mapping[str, Any] = field(default_factory=dict)
    stopped: bool = False
    run_name: str = ""

    @property
    def replicate(self) -> tuple[int, int]:
        """(fold, seed): one repetition of a (scenario, method) cell."""
        return self.fold, self.seed

    @property
    def group(self) -> GroupKey:
        """(scenario, method, replicate): the trials among which the report selects one."""
        return self.scenario, self.method, self.replicate

    def value(self, name: str) -> float | None:
        """The metric ``name`` of this trial; None when it has none (missing or NaN)."""
        value = self.metrics.get(name)
        if value is None or math.isnan(value):
            return None
        return float(value)


def is_candidate(row: TrialRow, objective: str) -> bool:
    """A row can be selected by ``objective`` when it has a value for it (not missing, not NaN)."""
    return row.value(objective) is not None


def ranked_trials(rows: Iterable[TrialRow], objective: str) -> dict[GroupKey, list[TrialRow]]:
    """Per (scenario, method, replicate), its rows by ``objective``, best first: rank ``i + 1``
    is the row at index ``i``.

    Rows whose objective is missing or NaN are left out (they have no rank); ties go to the
    smallest ``trial``, so the order does not depend on row order.
    """
    groups: dict[GroupKey, list[TrialRow]] = {}
    for row in rows:
        if is_candidate(row, objective):
            groups.setdefault(row.group, []).append(row)
    return {key: sorted(group, key=lambda r: (-float(r.metrics[objective]), r.trial))
            for key, group in sorted(groups.items())}


def best_trials(rows: Iterable[TrialRow], objective: str) -> list[TrialRow]:
    """Per (scenario, method, replicate), the row with the highest ``objective`` (the first of
    :func:`ranked_trials`)."""
    return [group[0] for group in ranked_trials(rows, objective).values()]

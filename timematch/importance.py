"""Which searched hyper-parameters matter: importances and sensitivity plots from trials
(no Ray, no MLflow).

A *trial* here is one run of a search, a :class:`~timematch.report.TrialRow`: its ``params``
(the sampled values of the searched keys), the objective's value and, for a trial that ran to
its last epoch, ``test_macro_f1``; ``stopped`` marks a trial that ASHA stopped early (its
objective is its last epoch's, and it has no test metric).

Importance is Optuna's fANOVA evaluator (Hutter, Hoos and Leyton-Brown, ICML 2014: a random
forest fitted to the trials, and the share of the objective's variance that each parameter
explains on its own), run on an in-memory Optuna study that holds the finished trials of one
(scenario, method), with the searched distributions: once for the objective, once for test
F1 (a *target* of Optuna's evaluator). Stopped trials stay out of it, since their value is an
earlier epoch's. They are drawn, marked, in the sensitivity plot. Below :data:`MIN_TRIALS`
finished trials no importance is given: a forest fitted to three points says nothing.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import optuna
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter
from optuna.distributions import CategoricalDistribution
from optuna.importance import FanovaImportanceEvaluator, get_param_importances

from timematch.report import TrialRow, agg_pyplot, is_candidate
from timematch.report.document import Bullets, Section, Table

TEST_METRIC = "test_macro_f1"
#: The fewest finished trials of a (scenario, method) that an importance is computed from.
MIN_TRIALS = 4
#: The evaluator's random forest seed, so a report gives the same shares each time.
SEED = 0
#: What computes the importances, as the report's record of them names it.
EVALUATOR = f"optuna FanovaImportanceEvaluator(seed={SEED})"


@dataclass(frozen=True)
class Importance:
    """The importances of one (scenario, method)'s searched keys, each normalised to sum 1
    (empty for a target that was the same in every trial)."""

    scenario: str
    method: str
    finished: int
    stopped: int
    objective: str
    by_objective: dict[str, float]
    by_test: dict[str, float]

    def rows(self) -> list[dict[str, Any]]:
        """One row per parameter, the most important for the objective first."""
        names = list(dict.fromkeys([*self.by_objective, *self.by_test]))
        return [{"scenario": self.scenario, "method": self.method, "param": name, "trials": self.finished,
                 f"importance_{self.objective}": self.by_objective.get(name),
                 f"importance_{TEST_METRIC}": self.by_test.get(name)} for name in names]


def finished_trials(trials: Sequence[TrialRow], objective: str) -> list[TrialRow]:
    """The trials that ran to the end with a value for both the objective and test F1."""
    return [t for t in trials if not t.stopped and is_candidate(t, objective) and is_candidate(t, TEST_METRIC)]


def param_importances(scenario: str, method: str, trials: Sequence[TrialRow],
                      distributions: Mapping[str, Any], objective: str, seed: int = SEED) -> Importance:
    """fANOVA importances of ``distributions``' keys (Optuna distributions) for ``objective``
    and test F1 over the finished ones of ``trials``. A trial whose values lie outside the
    distributions (a launch pooled with one that searched another space) is left out.
    Raises ``ValueError`` with a one-line reason when fewer than :data:`MIN_TRIALS` remain.
    """
    finished = finished_trials(trials, objective)
    stopped = sum(1 for t in trials if t.stopped)
    made = []
    for trial in finished:
        params = {key: trial.params[key] for key in distributions if key in trial.params}
        if len(params) != len(distributions):
            continue
        try:
            made.append(optuna.trial.create_trial(
                params=params, distributions=dict(distributions), value=float(trial.metrics[objective]),
                user_attrs={TEST_METRIC: float(trial.metrics[TEST_METRIC])}))
        except ValueError:  # a value outside its distribution
            continue
    if len(made) < MIN_TRIALS:
        raise ValueError(f"{len(made)} finished trial(s) with every searched value"
                         + (f" ({stopped} stopped early by ASHA)" if stopped else "")
                         + f"; an importance needs at least {MIN_TRIALS}")
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study = optuna.create_study(direction="maximize")
        study.add_trials(made)
        by_objective = _fanova(study, seed, None)
        by_test = _fanova(study, seed, lambda t: t.user_attrs[TEST_METRIC])
    finally:
        optuna.logging.set_verbosity(verbosity)
    if not by_objective and not by_test:
        raise ValueError(f"{objective} and test F1 are the same in all {len(made)} finished trials: "
                         "nothing for a parameter to explain")
    return Importance(scenario, method, len(made), stopped, objective, by_objective, by_test)


def _fanova(study, seed: int, target) -> dict[str, float]:
    """Optuna's fANOVA importances of ``study``'s parameters for ``target`` (None: the value);
    empty when the target is the same in every trial (fANOVA has no variance to share out)."""
    values = [t.value if target is None else target(t) for t in study.trials]
    if max(values) - min(values) <= 1e-12:
        return {}
    found = get_param_importances(study, evaluator=FanovaImportanceEvaluator(seed=seed), target=target)
    return {key: float(value) for key, value in found.items()}


def importance_section(importances: Sequence[Importance], notes: Sequence[str], objective: str) -> Section:
    """The report's importance section: the table (one row per searched key of each group), then
    one line per group without one."""
    blocks: list = []
    if importances:
        rows = []
        for item in importances:
            for row in item.rows():
                shares = [row[f"importance_{objective}"], row[f"importance_{TEST_METRIC}"]]
                rows.append((item.scenario, item.method, str(item.finished), row["param"],
                             *("-" if v is None else f"{v:.2f}" for v in shares)))
        blocks.append(Table(("scenario", "method", "finished trials", "parameter", f"for {objective}", "for test F1"),
                            tuple(rows), align=("left", "left", "right", "left", "right", "right")))
    if notes:
        blocks.append(Bullets(tuple(notes)))
    return Section(f"Hyper-parameter importance (fANOVA, share of the variance explained; objective {objective}, "
                   "and test F1)", tuple(blocks))


def importance_markdown(importances: Sequence[Importance], notes: Sequence[str], objective: str) -> str:
    """The importance section as Markdown (:func:`importance_section`)."""
    return importance_section(importances, notes, objective).to_markdown()


def plot_sensitivity(scenario: str, method: str, trials: Sequence[TrialRow],
                     distributions: Mapping[str, Any], objective: str, importance: Importance | None = None):
    """One panel per searched key: the objective and test F1 (x100) of every trial against the
    key's value; trials stopped early by ASHA drawn as crosses at their last epoch's objective."""
    plt = agg_pyplot()
    keys = list(distributions)
    columns = min(3, max(1, len(keys)))
    rows = math.ceil(len(keys) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.4 * rows), squeeze=False)
    finished = {id(t) for t in finished_trials(trials, objective)}
    for ax, key in zip(axes.flat, keys):
        distribution = distributions[key]
        categorical = isinstance(distribution, CategoricalDistribution)
        choices = [str(c) for c in distribution.choices] if categorical else []

        def x_of(value: Any) -> float:
            return float(choices.index(str(value))) if categorical else float(value)

        shown = [t for t in trials if key in t.params and is_candidate(t, objective)
                 and (not categorical or str(t.params[key]) in choices)]
        done = [t for t in shown if id(t) in finished]
        cut = [t for t in shown if t.stopped]
        ax.scatter([x_of(t.params[key]) for t in done], [100 * t.metrics[objective] for t in done],
                   marker="o", label=objective)
        ax.scatter([x_of(t.params[key]) for t in done], [100 * t.metrics[TEST_METRIC] for t in done],
                   marker="^", label="test F1")
        if cut:
            ax.scatter([x_of(t.params[key]) for t in cut], [100 * t.metrics[objective] for t in cut], marker="x",
                       color="grey", label=f"{objective}, stopped by ASHA")
        if categorical:
            ax.set_xticks(np.arange(len(choices)), choices)
            ax.set_xlim(-0.5, len(choices) - 0.5)
        elif getattr(distribution, "log", False):
            ax.set_xscale("log")
            # ticks at 1, 2 and 5 per decade, written plainly (matplotlib's minor labels overlap)
            ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
            ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
            ax.xaxis.set_minor_formatter(NullFormatter())
        title = key
        if importance is not None:
            shares = [found.get(key) if found else None for found in (importance.by_objective, importance.by_test)]
            shown = ["-" if v is None else f"{v:.2f}" for v in shares]
            title += f" (importance {shown[0]} / test {shown[1]})"
        ax.set_title(title, fontsize="medium")
        ax.set_ylabel("F1 (x100)")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize="small")
    fig.suptitle(f"{scenario} {method}: {objective} and test F1 against each searched hyper-parameter")
    fig.tight_layout()
    return fig

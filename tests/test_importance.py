"""Importances and sensitivity plots from trials (timematch.importance), on trials made here:
the parameter that drives a metric gets the largest share of it, and too few trials get a
one-line reason instead of a number."""

import dataclasses

import numpy as np
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution

from timematch.importance import MIN_TRIALS, importance_markdown, param_importances, plot_sensitivity
from timematch.report import TrialRow

SPACE = {"lr": FloatDistribution(1e-5, 1e-2, log=True), "pseudo_threshold": FloatDistribution(0.5, 0.99),
         "balanced": CategoricalDistribution([True, False])}


def trials(n: int, seed: int = 0) -> list[TrialRow]:
    """Trials whose objective follows log(lr) and whose test F1 follows the threshold."""
    rng = np.random.default_rng(seed)
    made = []
    for number in range(n):
        lr, threshold = 10 ** rng.uniform(-5, -2), rng.uniform(0.5, 0.99)
        made.append(TrialRow(
            "DK-FR1", "timematch", 0, f"t{number}",
            params={"lr": lr, "pseudo_threshold": threshold, "balanced": bool(rng.integers(2))},
            metrics={"target_val_f1": 0.5 + 0.1 * np.log10(lr) / 5 + rng.normal(0, 1e-3),
                     "test_macro_f1": 0.3 + 0.5 * threshold + rng.normal(0, 1e-3)}))
    return made


def stopped(trial: TrialRow) -> TrialRow:
    """``trial`` as ASHA leaves it: an earlier epoch's objective, no test metric."""
    return dataclasses.replace(trial, stopped=True,
                               metrics={k: v for k, v in trial.metrics.items() if k != "test_macro_f1"})


def test_the_parameter_that_drives_a_metric_explains_most_of_it():
    found = param_importances("DK-FR1", "timematch", trials(24), SPACE, "target_val_f1")
    assert found.finished == 24 and found.stopped == 0
    for shares, driver in ((found.by_objective, "lr"), (found.by_test, "pseudo_threshold")):
        assert set(shares) == set(SPACE) and sum(shares.values()) == pytest.approx(1.0)
        assert max(shares, key=shares.get) == driver and shares[driver] > 0.5, shares
    rows = found.rows()
    assert [r["param"] for r in rows][0] == "lr"  # the most important for the objective first
    table = importance_markdown([found], ["DK-FR2 timematch: no importance: 2 finished trial(s)"], "target_val_f1")
    assert "| DK-FR1 | timematch | 24 | lr |" in table and "- DK-FR2 timematch: no importance" in table


def test_stopped_and_out_of_space_trials_stay_out_and_too_few_give_a_reason():
    made = trials(MIN_TRIALS + 2)
    made[:2] = map(stopped, made[:2])
    made[2] = dataclasses.replace(made[2], params={**made[2].params, "lr": 0.5})  # another launch's space
    with pytest.raises(ValueError, match=r"^3 finished trial\(s\) with every searched value \(2 stopped early "
                                         rf"by ASHA\); an importance needs at least {MIN_TRIALS}$"):
        param_importances("DK-FR1", "timematch", made, SPACE, "target_val_f1")


def test_a_metric_that_never_changes_gets_no_share():
    made = [dataclasses.replace(t, metrics={**t.metrics, "target_val_f1": 1.0})  # every trial tops the validation split
            for t in trials(8)]
    found = param_importances("DK-FR1", "timematch", made, SPACE, "target_val_f1")
    assert found.by_objective == {} and max(found.by_test, key=found.by_test.get) == "pseudo_threshold"
    assert all(row["importance_target_val_f1"] is None for row in found.rows())
    made = [dataclasses.replace(t, metrics={**t.metrics, "test_macro_f1": 0.4}) for t in made]
    with pytest.raises(ValueError, match="the same in all 8 finished trials"):
        param_importances("DK-FR1", "timematch", made, SPACE, "target_val_f1")


def test_the_sensitivity_plot_has_a_panel_per_key_and_marks_stopped_trials():
    made = trials(6)
    made[0] = stopped(made[0])
    found = param_importances("DK-FR1", "timematch", made, SPACE, "target_val_f1")
    figure = plot_sensitivity("DK-FR1", "timematch", made, SPACE, "target_val_f1", found)
    panels = [ax for ax in figure.axes if ax.axison]
    assert [ax.get_title().split(" ")[0] for ax in panels] == list(SPACE)
    lr = panels[0]
    assert lr.get_xscale() == "log"
    points = [len(c.get_offsets()) for c in lr.collections]
    assert points == [5, 5, 1]  # objective and test F1 of the finished ones, the stopped one as a cross
    assert [t.get_text() for t in panels[2].get_xticklabels()] == ["True", "False"]
    assert f"importance {found.by_objective['lr']:.2f}" in lr.get_title()

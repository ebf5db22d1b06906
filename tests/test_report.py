"""The paper-style table: best trial per fold by the objective, mean ± std over folds; plots."""

from __future__ import annotations

import math

import numpy as np
import pytest

from timematch.report import (
    BEST_POSSIBLE, TrialRow, best_trials, cell, method_order, paired_comparison, per_class_csv, plot_confusion,
    plot_methods, plot_shift_scores, ranked_trials, selection_gap, summarize,
)


def row(scenario, method, fold, trial, objective, test, seed=0, **metrics):
    return TrialRow(scenario, method, fold, trial, seed=seed,
                    metrics={"target_val_f1": objective, "test_macro_f1": test, **metrics})


ROWS = [
    # DK-FR1, timematch: fold 0 best by objective is t2 (test 0.50, not the higher test 0.90 of t1)
    row("DK-FR1", "timematch", 0, "t1", 0.40, 0.90),
    row("DK-FR1", "timematch", 0, "t2", 0.60, 0.50),
    row("DK-FR1", "timematch", 1, "t3", 0.70, 0.70),
    row("DK-FR1", "timematch", 1, "t4", float("nan"), 0.99),  # no objective: never chosen
    row("DK-FR1", "source_only", 0, "b0", 0.30, 0.20),
    row("DK-FR1", "source_only", 1, "b1", 0.30, 0.40),
    row("FR1-DK", "timematch", 0, "t5", 0.50, 0.30),
    row("FR1-DK", "timematch", 1, "t6", 0.50, 0.10),
    row("FR1-DK", "source_only", 0, "b2", 0.10, 0.10),
    row("FR1-DK", "source_only", 1, "b3", 0.10, 0.30),
    row("FR1-DK", "upper_bound", 0, "u0", 0.90, 0.95),
]


def test_best_trial_per_fold_uses_the_objective_not_the_test_score():
    best = {(r.scenario, r.method, r.fold): r.trial for r in best_trials(ROWS, "target_val_f1")}
    assert best[("DK-FR1", "timematch", 0)] == "t2"
    assert best[("DK-FR1", "timematch", 1)] == "t3"


def test_ties_go_to_the_smallest_trial_whatever_the_order():
    rows = [row("A-B", "m", 0, "z", 0.5, 0.1), row("A-B", "m", 0, "a", 0.5, 0.9)]
    assert best_trials(rows, "target_val_f1")[0].trial == "a"
    assert best_trials(rows[::-1], "target_val_f1")[0].trial == "a"


def test_other_objectives_select_other_trials():
    rows = [row("A-B", "m", 0, "t1", 0.9, 0.1, source_val_f1=0.1),
            row("A-B", "m", 0, "t2", 0.1, 0.8, source_val_f1=0.5)]
    assert best_trials(rows, "source_val_f1")[0].trial == "t2"
    assert best_trials(rows, "target_val_f1")[0].trial == "t1"


def test_mean_and_std_over_folds():
    table = summarize(ROWS, "target_val_f1")
    tm = table.value("timematch", "DK-FR1")
    assert tm.values == (0.50, 0.70)
    assert tm.mean == pytest.approx(0.60) and tm.std == pytest.approx(0.10)  # population std over folds
    so = table.value("source_only", "FR1-DK")
    assert so.mean == pytest.approx(0.20) and so.std == pytest.approx(0.10)


def test_average_column():
    table = summarize(ROWS, "target_val_f1")
    avg = table.value("timematch", "Avg")
    assert avg.mean == pytest.approx((0.60 + 0.20) / 2)
    # spread over folds of the per-fold averages: fold 0 (0.5 + 0.3) / 2, fold 1 (0.7 + 0.1) / 2
    assert avg.std == pytest.approx(np.std([0.4, 0.4]))
    # the upper bound lacks DK-FR1: no average rather than a misleading one
    assert math.isnan(table.value("upper_bound", "Avg").mean)


def test_rows_columns_and_order():
    table = summarize(ROWS, "target_val_f1", scenarios=["FR1-DK", "DK-FR1"])
    assert table.columns == ["FR1-DK", "DK-FR1", "Avg"]
    assert table.methods == ["source_only", "timematch", "upper_bound"]
    assert method_order(["upper_bound", "zzz", "timematch", "source_only", "dann", "shift_aug"]) == [
        "source_only", "shift_aug", "dann", "timematch", "upper_bound", "zzz"]
    assert table.folds == [0, 1]


def test_markdown_and_html():
    table = summarize(ROWS, "target_val_f1", notes=["Target validation labels were used."])
    markdown = table.to_markdown()
    lines = markdown.splitlines()
    assert lines[0] == "| Method | DK → FR1 | FR1 → DK | Avg |"
    assert "| timematch | **60.0 ± 10.0** | **20.0 ± 10.0** | **40.0 ± 0.0** |" in lines
    # the upper bound is a reference and is never marked best, even when highest
    assert "| upper_bound | - | 95.0 | - |" in lines
    assert "best trial per fold by target_val_f1" in markdown
    assert "Target validation labels were used." in markdown
    page = table.to_html()
    assert page.startswith("<!DOCTYPE html>") and "<b>60.0 ± 10.0</b>" in page and "FR1 → DK" in page


def test_ties_are_all_marked_best():
    rows = [row("A-B", "x", 0, "1", 0.5, 0.3), row("A-B", "y", 0, "2", 0.5, 0.3)]
    assert summarize(rows, "target_val_f1").to_markdown().count("**30.0**") == 2 * 2  # scenario and Avg


def test_cell_formatting():
    assert cell([0.5]).format() == "50.0"
    assert cell([0.5, 0.7]).format() == "60.0 ± 10.0"
    assert cell([]).format() == "-"


def test_plots_and_per_class_csv(tmp_path):
    import matplotlib.pyplot as plt

    figure = plot_methods(summarize(ROWS, "target_val_f1"))
    figure.savefig(tmp_path / "methods.png")
    plt.close(figure)
    figure = plot_confusion(np.array([[3, 1], [0, 2]]), ["meadow", "winter_wheat"])
    figure.savefig(tmp_path / "confusion.png")
    plt.close(figure)
    scores = [{"shifts": np.arange(-3, 4), "scores": np.linspace(0, 1, 7), "estimator": "am", "estimate": 3}]
    figure = plot_shift_scores(scores)
    figure.savefig(tmp_path / "shift.png")
    plt.close(figure)
    assert all((tmp_path / name).stat().st_size > 1000 for name in ("methods.png", "confusion.png", "shift.png"))
    text = per_class_csv({"meadow": {"precision": 0.5, "recall": 1.0, "f1": 0.6667, "support": 3},
                          "a,b": {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}})
    assert text.splitlines() == ["class,precision,recall,f1,support", "meadow,0.5,1,0.6667,3", '"a,b",0,0,0,1']


def test_reference_rows_are_never_best_and_the_selection_counts_are_stated():
    rows = [row("A-B", "source_only", 0, "s", 0.9, 0.9), row("A-B", "dann", 0, "d1", 0.5, 0.3),
            row("A-B", "dann", 0, "d2", 0.6, 0.4), row("A-B", "dann", 1, "d3", 0.6, 0.5),
            row("A-B", "timematch", 0, "t1", 0.7, 0.6), row("A-B", "timematch", 0, "t2", float("nan"), 0.99)]
    table = summarize(rows, "target_val_f1")
    assert table.methods == ["source_only", "dann", "timematch"]  # the paper's order
    markdown = table.to_markdown()
    assert "| source_only | 90.0 | 90.0 |" in markdown  # highest, yet a reference row: not bold
    assert "| timematch | **60.0** | **60.0** |" in markdown
    # dann: 2 trials in fold 0, 1 in fold 1; timematch: the trial without an objective is no candidate
    assert "Each cell selects from (finished trials per fold x folds): source_only 1 x 1; dann 1-2 x 2; " \
           "timematch 1 x 1." in markdown
    # the words say what MLflow's tags and registry do (tests/test_report_mlflow.py checks the tags)
    assert ("Reference rows (source_only) are never marked best: never bold here; in MLflow their trials are "
            "tagged reference=true, best=false and rank=reference, and their models registered with the alias "
            "reference.") in markdown
    assert table.trials_per_fold[("dann", "A-B")] == (2, 1)


def test_the_selection_gap_shows_what_each_criterion_costs_against_the_oracle_and_the_best_possible():
    rows = []
    for scenario in ("DK-FR1", "FR1-FR2"):
        for trial, test in enumerate([0.2, 0.5, 0.7, 0.4]):
            oracle = test - 0.05 * (trial == 2)  # the oracle errs once
            rows.append(row(scenario, "timematch", 0, f"t{trial}", oracle, test,
                            target_entropy=test,  # ranks the trials as the test split does
                            snd=-test))  # ranks them backwards
    gap = selection_gap(rows, ["target_entropy", "snd", "dev"])
    assert gap.criteria == ["target_val_f1", "target_entropy", "snd"]  # dev: no values, left out
    assert gap.average[("timematch", BEST_POSSIBLE)] == pytest.approx(0.7)
    assert gap.average[("timematch", "target_entropy")] == pytest.approx(0.7)
    assert gap.average[("timematch", "snd")] == pytest.approx(0.2)
    assert gap.correlation[("timematch", "target_entropy")] == pytest.approx((1.0, 2))
    assert gap.correlation[("timematch", "snd")] == pytest.approx((-1.0, 2))
    text = gap.to_markdown()
    assert "target_val_f1 (oracle)" in text and "best possible (reference)" in text
    assert "| timematch | 70.0 (ρ +1.00) | 70.0 (ρ +1.00) | 20.0 (ρ -1.00) | 70.0 |" in text


def test_the_paired_comparison_counts_wins_over_folds_and_seeds():
    rows = []
    for fold in (0, 1):
        for seed in (0, 1):
            for method, test in (("timematch", 0.6 + 0.01 * seed), ("fixmatch", 0.5), ("mmd", 0.6 + 0.01 * seed)):
                rows.append(row("DK-FR1", method, fold, f"{method}{fold}{seed}", 0.5, test, seed=seed))
    rows.append(row("DK-FR1", "dann", 0, "d", 0.5, 0.7))
    paired = paired_comparison(rows, "target_val_f1")
    by_other = {row[1]: row for row in paired.rows}
    assert by_other["fixmatch"][2:5] == (4, 0, 0) and by_other["fixmatch"][5] == pytest.approx(0.105)
    assert 0 < by_other["fixmatch"][6] <= 0.125  # Wilcoxon, 4 pairs all won: the exact two-sided p is 0.125
    assert by_other["mmd"][2:5] == (0, 0, 4) and math.isnan(by_other["mmd"][6])  # all ties: no test
    assert by_other["dann"][2:5] == (0, 1, 0) and math.isnan(by_other["dann"][6])  # one pair: no test
    assert "| DK → FR1 | fixmatch | 4 | 0 | 0 | +10.5 | 0.125 |" in paired.to_markdown()


def test_cells_are_over_folds_times_seeds_with_the_count():
    rows = [row("DK-FR1", "timematch", f, f"t{f}{s}", 0.5, 0.1 * (f + 2 * s), seed=s) for f in (0, 1) for s in (0, 1)]
    table = summarize(rows, "target_val_f1")
    assert table.value("timematch", "DK-FR1").n == 4
    assert table.value("timematch", "DK-FR1").mean == pytest.approx(0.15)
    assert "folds x seeds (folds 0, 1; seeds 0, 1: 4 per cell)" in table.caption()


def test_ranks_are_per_fold_and_seed_and_leave_out_trials_without_the_objective():
    rows = [row("A-B", "m", 0, "t1", 0.2, 0.1), row("A-B", "m", 0, "t2", 0.8, 0.1),
            row("A-B", "m", 0, "t3", float("nan"), 0.9), row("A-B", "m", 0, "t4", 0.5, 0.1, seed=1),
            TrialRow("A-B", "m", 0, "t5", metrics={"test_macro_f1": 0.9})]
    ranked = ranked_trials(rows, "target_val_f1")
    assert {key: [r.trial for r in group] for key, group in ranked.items()} == {
        ("A-B", "m", (0, 0)): ["t2", "t1"], ("A-B", "m", (0, 1)): ["t4"]}

"""How far a trial moved from its source model (timematch.movement), the rows the report
flags as one model (timematch.report.agreement), and budgets' step-based schedules
(TrainConfig.scaled_to, as the quick profile and benchmarks/budget.py scale them)."""

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from timematch.data.dataset import DataConfig, open_domains
from timematch.experiment import ExperimentSpec, pretrain_source, run_experiment
from timematch.methods import build_config, method_names
from timematch.models import build_model
from timematch.movement import MOVEMENT_METRICS, MovementProbe, predicted_classes
from timematch.report import summarize
from timematch.report.agreement import SAME, UNMOVED, degenerate_rows, labelled, movement_section, terminal_line
from timematch.report.rows import TrialRow

REPO = Path(__file__).resolve().parent.parent
TINY = {"epochs": 2, "steps_per_epoch": 2, "batch_size": 16}


@pytest.fixture(scope="module")
def target(synthetic_root):
    _, target = open_domains(synthetic_root, "DK", "FR1", 0, DataConfig(min_parcels=10))
    return target


def test_probe_tells_weights_from_batch_norm_statistics(target):
    torch.manual_seed(0)
    start = build_model(num_classes=len(target.classes))
    probe = MovementProbe(start, target, torch.device("cpu"))
    assert len(probe.start_predictions) == len(target.labelled("test")) > 0
    model = build_model(num_classes=len(target.classes))
    model.load_state_dict(start.state_dict())
    assert probe.measure(model) == dict.fromkeys(MOVEMENT_METRICS, 0.0)

    # only the classifier's weights: the encoder has not moved, the statistics change nothing
    rare = int(np.argmin(np.bincount(probe.start_predictions, minlength=len(target.classes))))
    with torch.no_grad():
        model.decoder[-1].bias[rare] += 100.0  # every parcel is now the class predicted least
    moved = probe.measure(model)
    assert moved["moved_encoder"] == 0.0 and moved["moved_classifier"] > 0.1
    assert moved["changed_predictions"] > 0 and moved["changed_by_batch_norm"] == 0.0

    # only batch-norm statistics: no weight moved, and they explain every change
    model.load_state_dict(start.state_dict())
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert norms
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for norm in norms:
            norm.running_mean.normal_(0.0, 2.0, generator=generator)
            norm.running_var.uniform_(0.05, 3.0, generator=generator)
    moved = probe.measure(model)
    assert moved["moved_encoder"] == moved["moved_classifier"] == 0.0
    assert moved["changed_predictions"] > 0
    assert moved["changed_by_batch_norm"] == moved["changed_predictions"]
    assert np.array_equal(predicted_classes(start, target, torch.device("cpu")), probe.start_predictions), (
        "measuring leaves the source model as it was")


@pytest.mark.slow
def test_an_adaptation_trial_reports_its_movement_each_epoch(synthetic_root, tmp_path):
    spec = ExperimentSpec(data_root=synthetic_root, source="DK", target="FR1", method="dann",
                          method_config=dict(TINY), pretrain_config=dict(TINY), data=DataConfig(min_parcels=10),
                          cache_dir=tmp_path)
    pretrained = pretrain_source(spec)
    reports = []
    result = run_experiment(spec, pretrained, on_epoch=lambda report, state: reports.append(report))
    assert [r.epoch for r in reports] == [1, 2]
    for report in reports:
        assert set(MOVEMENT_METRICS) <= set(report.metrics)
        assert 0 < report.metrics["moved_classifier"] < 1 and 0 <= report.metrics["changed_predictions"] <= 1
    assert set(MOVEMENT_METRICS) <= set(result.metrics)
    assert result.metrics["moved_encoder"] == reports[-1].metrics["moved_encoder"]  # the last epoch is returned
    assert len(result.predictions) == int(result.confusion.sum())

    # the source-only baseline is the source model: nothing moved, nothing to measure
    baseline = run_experiment(spec.replace(method="source_only"), pretrained)
    assert not set(MOVEMENT_METRICS) & set(baseline.metrics)
    changed = float(np.mean(baseline.predictions != result.predictions))
    assert changed == pytest.approx(result.metrics["changed_predictions"])


# -- the report's flags -------------------------------------------------------------------


def _row(method, scenario="DK-FR1", fold=0, **metrics):
    return TrialRow(scenario=scenario, method=method, fold=fold, trial=method, run_id=f"{scenario}/{method}/{fold}",
                    metrics={"test_macro_f1": 0.5, **metrics})


def test_rows_with_the_same_predictions_are_flagged_together():
    rng = np.random.default_rng(0)
    base = rng.integers(0, 5, 1000)
    other = base.copy()
    other[:50] = (other[:50] + 1) % 5  # 95 % agreement: a different model
    nearly = base.copy()
    nearly[:5] = (nearly[:5] + 1) % 5  # 99.5 %: the same model
    moved = {"final_changed_predictions": 0.1, "final_changed_by_batch_norm": 0.05}
    rows = [_row("source_only"), _row("dann", final_moved_encoder=0.001, final_moved_classifier=0.003, **moved),
            _row("cdan", final_moved_encoder=0.002, final_moved_classifier=0.002, **moved), _row("timematch")]
    predictions = {"DK-FR1/source_only/0": other, "DK-FR1/dann/0": base, "DK-FR1/cdan/0": nearly,
                   "DK-FR1/timematch/0": rng.integers(0, 5, 1000)}
    found = degenerate_rows(rows, predictions, order=["source_only", "dann", "cdan", "timematch"])
    assert [(d.methods, d.reason) for d in found] == [(("dann", "cdan"), SAME)]
    note = found[0].sentence()
    assert note.startswith("dann, cdan: the same predictions on 99.5 % of the target test parcels")
    assert "weights moved at most 0.3 % from the source model" in note and "do not differ" in note
    assert "dann, cdan" in terminal_line(found)
    marks, notes = labelled(found)
    assert marks == {"dann": "=A", "cdan": "=A"} and notes == [f"(=A) {note}"]
    table = summarize(rows, "test_macro_f1", notes=notes, marks=marks).to_markdown()
    assert "| dann (=A) |" in table and "| cdan (=A) |" in table and "| timematch |" in table
    assert f"(=A) {note}" in table

    # the report's movement section: the adaptation rows that logged it, in the paper's order
    section = movement_section(rows, "test_macro_f1").to_markdown()
    assert "| dann | 0.10 | 0.30 |" in section and "| cdan | 0.20 | 0.20 |" in section
    assert "source_only" not in section and movement_section(rows[:1], "test_macro_f1") is None

    # rows that differ everywhere: no note at all
    predictions["DK-FR1/cdan/0"] = other[::-1].copy()
    assert degenerate_rows(rows, predictions) == [] and terminal_line([]) == ""


def test_flags_count_the_scenarios_where_rows_coincide_and_unmoved_trials():
    same = np.zeros(100, np.int16)
    rows, predictions = [], {}
    for scenario, cdan in (("DK-FR1", same), ("FR1-FR2", same + 1)):
        for method, values in (("dann", same), ("cdan", cdan)):
            row = _row(method, scenario, final_changed_predictions=0.5)
            rows.append(row)
            predictions[row.run_id] = values
    found = degenerate_rows(rows, predictions)
    assert len(found) == 1 and found[0].cells == (("DK-FR1", 0, 0),) and found[0].compared == 2
    assert "in 1 of 2 scenario-folds (DK-FR1 fold 0)" in found[0].sentence()

    # a trial that predicts what its source model does, with no baseline row to compare with
    rows = [_row("mmd", final_changed_predictions=0.004, final_moved_encoder=0.0001),
            _row("timematch", final_changed_predictions=0.3)]
    found = degenerate_rows(rows, {})
    assert [(d.methods, d.reason) for d in found] == [(("mmd",), UNMOVED)]
    assert found[0].sentence().startswith("mmd: predicts what the source model predicts on 99.6 %")


# -- budgets ------------------------------------------------------------------------------


def test_the_quick_profile_scales_the_published_schedules_to_its_budget():
    """The quick profile's compressed schedules are the published ones scaled to its 100 steps
    (one rule, TrainConfig.scaled_to, that benchmarks/budget.py applies to any budget)."""
    profile = yaml.safe_load((REPO / "experiments" / "profiles" / "quick.yaml").read_text())
    steps = profile["budget"]["epochs"] * profile["budget"]["steps_per_epoch"]
    for name in method_names():
        config = build_config(name)
        if config.steps_per_epoch is None or config.epochs == 0:
            continue
        scaled = config.scaled_to(steps)
        named = {k: v for k, v in (profile["methods"].get(name) or {}).items() if k in ("lr_gamma", *config.step_counts)}
        assert named == scaled, name
    dann = build_config("dann")
    assert dann.scaled_to(10_000) == {"lr_gamma": dann.lr_gamma, "grl_max_iters": dann.grl_max_iters}
    assert build_config("timematch").scaled_to(100) == {}  # cosine: scales by itself

"""What a researcher reads in MLflow after a real small sweep (real Ray, Optuna, MLflow on
SQLite): run names, statuses, metrics at a fixed step, source-only pretraining metrics, the
launch run's numbers, datasets, system metrics, the Optuna storage, the registered models,
and a pyfunc prediction on raw parcels that equals the library's."""

from __future__ import annotations

import re
from pathlib import Path

import mlflow
import numpy as np
import optuna
import pytest
from mlflow import MlflowClient

from timematch.methods import get_method
from timematch.runner.cli import EXIT_OK, main
from timematch.runner.runs import FINAL_STEP

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def sweep(ray_address, data_root, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("record")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    argv = ["--profile", "smoke", "--set", "data.min_parcels=20", "--data-root", str(data_root),
            "--results-dir", str(tmp / "results"), "--tracking-uri", uri, "--experiment", "record", "--folds", "1",
            "--scenario", "DK-FR1", "--method", "timematch", "--trials", "5", "--set", "methods.timematch.epochs=3",
            # ASHA waits the 3 epochs (stops nothing): 5 finished trials, enough for an importance
            "--set", "scheduler.grace_period=3",
            # a source model and trials that learn something, so the trials' F1 differ for fANOVA to explain
            "--set", "pretrain.epochs=4", "--set", "pretrain.steps_per_epoch=8",
            "--set", "methods.timematch.steps_per_epoch=6"]
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TIMEMATCH_CACHE", str(tmp / "cache"))
        code = main(argv, project_root=REPO)
    assert code == EXIT_OK
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("record")
    found = client.search_runs([experiment.experiment_id], max_results=100)
    by_stage = {stage: [r for r in found if r.data.tags.get("stage") == stage] for stage in ("launch", "pretrain", "adapt")}
    return uri, client, experiment, by_stage, tmp


def test_run_names_tell_runs_apart_and_statuses_mean_what_they_say(sweep):
    _, _, _, runs, _ = sweep
    adapt = runs["adapt"]
    assert len(adapt) == 6  # 5 searched + the source-only baseline
    names = [r.info.run_name for r in adapt]
    assert len(set(names)) == len(names)
    for run in adapt:
        tags = run.data.tags
        short = get_method(tags["method"]).short_name  # the full name is the method tag
        # one fold, one seed: the name shows the trial's number where its group has several
        suffix = " #[0-9]" if tags["method"] == "timematch" else ""
        assert re.fullmatch(rf"{tags['scenario']} {short}{suffix}", run.info.run_name), run.info.run_name
        assert len(run.info.run_name) <= 16  # fits the UI's name column (looked at: see docs/mlflow.md)
        assert run.info.status == "FINISHED", tags.get("error")
        if tags.get("stopped_early") == "asha":  # the scheduler's choice, not a failure
            assert 1 <= int(tags["epochs_run"]) < 3 and "test_macro_f1" not in run.data.metrics
        else:
            assert "test_macro_f1" in run.data.metrics
    (pretrain,) = runs["pretrain"]
    assert pretrain.info.run_name == "pretrain DK" and pretrain.info.status == "FINISHED"
    # grouped by method or by stage, the source model's training stays apart from the source-only trials
    assert pretrain.data.tags["method"] == "pretrain:source_only" and pretrain.data.tags["trains"] == "source_only"
    assert pretrain.data.tags["method"] not in {r.data.tags["method"] for r in adapt}


def test_final_metrics_sit_at_one_step_for_every_method(sweep):
    _, client, _, runs, _ = sweep
    finished = [r for r in runs["adapt"] if "test_macro_f1" in r.data.metrics]
    assert {r.data.tags["method"] for r in finished} == {"timematch", "source_only"}
    for run in finished:
        for key in ("test_macro_f1", "final_target_val_f1", "final_source_val_f1"):
            assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == [FINAL_STEP], key
    timematch = next(r for r in finished if r.data.tags["method"] == "timematch")
    steps = sorted(m.step for m in client.get_metric_history(timematch.info.run_id, "target_val_f1"))
    assert steps == [1, 2, 3]  # per-epoch metrics stay per epoch


def test_every_criterion_is_logged_every_epoch(sweep):
    from timematch.runner.plan import OBJECTIVES

    _, client, _, runs, _ = sweep
    timematch = next(r for r in runs["adapt"] if r.data.tags["method"] == "timematch"
                     and "test_macro_f1" in r.data.metrics)
    for name in OBJECTIVES:
        steps = [m.step for m in client.get_metric_history(timematch.info.run_id, name)]
        assert sorted(steps) == [1, 2, 3], name
        assert f"final_{name}" in timematch.data.metrics


def test_pretraining_logs_source_metrics_only(sweep):
    _, _, _, runs, _ = sweep
    (pretrain,) = runs["pretrain"]
    metrics = set(pretrain.data.metrics)
    assert {"source_val_f1", "final_source_val_f1", "train_loss"} <= metrics
    assert not [m for m in metrics if m.startswith(("target_", "final_target_"))], metrics


def test_the_launch_run_carries_the_report_numbers(sweep):
    _, _, _, runs, tmp = sweep
    (launch,) = runs["launch"]
    metrics = launch.data.metrics
    finished = [r for r in runs["adapt"] if "test_macro_f1" in r.data.metrics]
    for method in ("timematch", "source_only"):
        mine = [r for r in finished if r.data.tags["method"] == method]
        best = max(mine, key=lambda r: (r.data.metrics["final_target_val_f1"], -ord(r.data.tags["trial_key"][-1])))
        chosen = [r for r in mine if r.data.metrics["final_target_val_f1"] == best.data.metrics["final_target_val_f1"]]
        # one scale for F1 everywhere (0 to 1): the launch run's copy equals the trial's
        assert any(metrics[f"avg_test_macro_f1/{method}"] == pytest.approx(r.data.metrics["test_macro_f1"])
                   for r in chosen)
        assert metrics[f"test_macro_f1/DK-FR1/{method}"] == metrics[f"avg_test_macro_f1/{method}"]
    assert metrics["report_trials"] == len(finished)
    assert metrics["trials_failed"] == 0 and metrics["trials_done"] + metrics["trials_stopped_early"] == 6
    report = (tmp / "results" / "record" / "report.md").read_text()
    gap = report[report.index("Selection gap"):]
    header = next(line for line in gap.splitlines() if line.startswith("| Method |"))
    for criterion in ("target_val_f1 (oracle)", "source_val_f1", "target_im_score", "target_entropy", "dev", "snd",
                      "few_shot_target_f1", "best possible (reference)"):
        assert criterion in header, header


def test_every_run_records_its_data_and_system_metrics(sweep):
    _, _, _, runs, _ = sweep
    for run in runs["adapt"] + runs["pretrain"]:
        inputs = {d.dataset.name: d for d in run.inputs.dataset_inputs}
        assert "denmark/32VNH/2017 fold0" in inputs, inputs
        source = inputs["denmark/32VNH/2017 fold0"]
        assert '"train": ' in source.dataset.profile and len(source.dataset.digest) >= 8
        if run.data.tags["stage"] == "adapt":
            assert "france/30TXT/2017 fold0" in inputs
        assert "system/cpu_utilization_percentage" in run.data.metrics
        assert "system/system_memory_usage_megabytes" in run.data.metrics


def test_the_optuna_study_of_the_group_is_kept(sweep):
    _, _, _, runs, tmp = sweep
    storage = f"sqlite:///{tmp / 'results' / 'record' / 'optuna.db'}"
    (name,) = optuna.get_all_study_names(storage)
    launch_id = runs["launch"][0].data.tags["launch_id"]
    assert name == f"{launch_id} DK-FR1/timematch/fold0"
    trials = optuna.load_study(study_name=name, storage=storage).trials
    assert len(trials) == 5 and all(t.state.is_finished() for t in trials)


def test_the_best_models_are_registered_and_predict_raw_parcels_on_their_own(sweep, data_root):
    from timematch.data.dataset import DataConfig, open_domains
    from timematch.evaluation import predict
    from timematch.serving import parcels_input

    uri, client, _, runs, tmp = sweep
    finished = [r for r in runs["adapt"] if r.data.tags["method"] == "timematch" and "test_macro_f1" in r.data.metrics]
    top = max(r.data.metrics["final_target_val_f1"] for r in finished)
    registered = client.get_model_version_by_alias("record-DK-FR1-timematch", "best")
    best = next(r for r in finished if r.info.run_id == registered.run_id)
    assert best.data.metrics["final_target_val_f1"] == top  # by the objective, never the test split
    # the baseline is a reference row: registered under its own alias, never best
    assert client.get_model_version_by_alias("record-DK-FR1-source_only", "reference")
    assert client.get_registered_model("record-DK-FR1-source_only").aliases == {"reference": 1}

    mlflow.set_tracking_uri(uri)
    model = mlflow.pyfunc.load_model("models:/record-DK-FR1-timematch@best")
    assert model.metadata.signature is not None and model.metadata.get_input_schema().input_names()[0] == "pixels"
    parcels = np.arange(12)
    frame = model.predict(parcels_input(data_root, "FR1", parcels))

    # the library's prediction of the same parcels, through the packed cache
    module = mlflow.pytorch.load_model(best.data.tags["model_uri"])
    config = DataConfig.from_dict({"min_parcels": 20})
    source, target = open_domains(data_root, "DK", "FR1", 0, config, tmp / "cache")
    probs, _ = predict(module, target, parcels, next(module.parameters()).device)
    classes = [c for c in frame.columns if c.startswith("p_")]
    assert classes == [f"p_{name}" for name in target.classes]
    assert np.allclose(frame[classes].to_numpy(), probs, atol=1e-5)
    assert list(frame["class"]) == [target.classes[i] for i in probs.argmax(1)]


def test_the_winner_is_tagged_as_the_report_selects_it(sweep):
    from timematch.report import TrialRow, best_trials

    uri, client, experiment, runs, _ = sweep
    finished = [r for r in runs["adapt"] if "test_macro_f1" in r.data.metrics]
    for method in ("timematch", "source_only"):
        mine = [client.get_run(r.info.run_id) for r in finished if r.data.tags["method"] == method]
        rows = [TrialRow("DK-FR1", method, 0, r.data.tags["trial_key"], run_id=r.info.run_id,
                         metrics={"target_val_f1": r.data.metrics["final_target_val_f1"]}) for r in mine]
        (selected,) = best_trials(rows, "target_val_f1")
        # a reference method's place is its reference_rank: its rank tag says it is no winner
        place = "rank" if method == "timematch" else "reference_rank"
        assert sorted(int(r.data.tags[place]) for r in mine) == list(range(1, len(mine) + 1))
        by_rank = sorted(mine, key=lambda r: int(r.data.tags[place]))
        values = [r.data.metrics["final_target_val_f1"] for r in by_rank]
        assert values == sorted(values, reverse=True)
        best = [r.info.run_id for r in mine if r.data.tags["best"] == "true"]
        assert best == ([selected.run_id] if method == "timematch" else [])
        assert all(r.data.tags["selected_by"] == "target_val_f1" for r in mine)
    assert all(r.data.tags["rank"] == "reference" and r.data.tags["reference"] == "true"
               for r in finished if r.data.tags["method"] == "source_only")
    # the one-line filter the README gives finds exactly the winners
    winners = client.search_runs([experiment.experiment_id], "tags.best = 'true'")
    assert sorted(r.data.tags["method"] for r in winners) == ["timematch"]
    registered = client.get_model_version_by_alias("record-DK-FR1-timematch", "best")
    assert registered.run_id == next(r.info.run_id for r in winners if r.data.tags["method"] == "timematch")


def test_a_re_selection_by_another_objective_rewrites_the_winner_tags(sweep, capsys):
    uri, client, experiment, runs, tmp = sweep
    code = main(["report", "--experiment", "record", "--results-dir", str(tmp / "results"), "--tracking-uri", uri,
                 "--objective", "source_val_f1"], project_root=REPO)
    out = capsys.readouterr().out
    assert code == EXIT_OK
    assert "by source_val_f1: rank (1 = selected) and best=true on 1 winner (filter" in out
    timematch = [client.get_run(r.info.run_id) for r in runs["adapt"] if r.data.tags["method"] == "timematch"]
    best = [r for r in timematch if r.data.tags["best"] == "true"]
    assert len(best) == 1 and all(r.data.tags["selected_by"] == "source_val_f1" for r in timematch)
    top = max(r.data.metrics["final_source_val_f1"] for r in timematch)
    assert best[0].data.metrics["final_source_val_f1"] == top
    # back to the launch's objective, so the other tests of the module see the launch's tags
    assert main(["report", "--experiment", "record", "--results-dir", str(tmp / "results"), "--tracking-uri", uri],
                project_root=REPO) == EXIT_OK


def test_a_registered_version_and_its_logged_model_point_at_each_other(sweep):
    import json

    _, client, _, runs, _ = sweep
    version = client.get_model_version_by_alias("record-DK-FR1-timematch", "best")
    # the version's source is the logged model (models:/<id>); SQLite leaves version.model_id unset
    assert version.source.startswith("models:/m-")
    logged = client.get_logged_model(version.model_id or version.source.removeprefix("models:/"))
    assert {"name": "record-DK-FR1-timematch", "version": version.version} in json.loads(
        logged.tags["mlflow.modelVersions"])
    assert logged.source_run_id == version.run_id
    # named for what it is, logged from the project's entry point rather than Ray's worker script
    assert logged.name == "timematch-DK-FR1-parcel_classifier"
    assert logged.tags["mlflow.source.name"] == "launch.py"
    (pretrain,) = runs["pretrain"]
    models = client.search_logged_models([pretrain.info.experiment_id],
                                         filter_string=f"source_run_id = '{pretrain.info.run_id}'")
    assert sorted(m.name for m in models) == ["pretrain_source_only-DK-parcel_classifier",
                                              "pretrain_source_only-DK-pytorch_module"]


def test_importances_and_sensitivity_plots_for_a_searched_group(sweep, tmp_path):
    import json

    from timematch.runner.search_space import load_space

    _, client, _, runs, tmp = sweep
    (launch,) = runs["launch"]
    searched = set(load_space(REPO / "search_spaces", "timematch"))
    report = (tmp / "results" / "record" / "report.md").read_text()
    section = report[report.index("## Hyper-parameter importance"):]
    rows = [line for line in section.splitlines() if line.startswith("| DK-FR1 | timematch | 5 |")]
    assert {line.split("|")[4].strip() for line in rows} == searched  # one row per searched key
    logged = json.loads(Path(client.download_artifacts(launch.info.run_id, "report/importance.json",
                                                       str(tmp_path))).read_text())
    assert {row["param"] for row in logged["rows"]} == searched
    trials = [r for r in runs["adapt"] if r.data.tags["method"] == "timematch"]
    shown = 0
    for key, metric in (("importance_target_val_f1", "final_target_val_f1"), ("importance_test_macro_f1", "test_macro_f1")):
        shares = [row[key] for row in logged["rows"]]
        if len({r.data.metrics[metric] for r in trials}) > 1:  # something to explain: shares of 1
            assert sum(shares) == pytest.approx(1.0) and min(shares) >= 0, key
            shown += 1
        else:  # the same value in every trial (smoke budgets): no share, printed as "-"
            assert shares == [None] * len(searched), key
    assert shown  # the smoke budget's trials differ at least in test F1
    assert (tmp / "results" / "record" / "sensitivity" / "DK-FR1_timematch.png").stat().st_size > 10_000
    artifacts = {a.path for a in client.list_artifacts(launch.info.run_id, "report/sensitivity")}
    assert artifacts == {"report/sensitivity/DK-FR1_timematch.png"}
    # the report's table as one chart of the launch run, in MLflow's chart view (an image with a key)
    images = [a.path for a in client.list_artifacts(launch.info.run_id, "images")]
    assert any(p.startswith("images/test_macro_f1 per scenario+step+0+") for p in images), images


def test_the_printed_address_opens_the_model_training_view():
    from timematch.runner.tracking import ui_address

    assert ui_address("http://mlflow:5000/", "3", "abc") == (
        "http://mlflow:5000/#/experiments/3/runs/abc?workflowType=machine_learning")
    local = ui_address("sqlite:////srv/exp/mlflow.db", "3")
    assert local.startswith("http://127.0.0.1:5000/#/experiments/3?workflowType=machine_learning")
    assert "make ui STORE=/srv/exp/mlflow.db" in local

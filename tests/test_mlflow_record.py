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
            "--scenario", "DK-FR1", "--method", "timematch", "--trials", "3", "--set", "methods.timematch.epochs=3"]
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
    assert len(adapt) == 4  # 3 searched + the source-only baseline
    names = [r.info.run_name for r in adapt]
    assert len(set(names)) == len(names)
    for run in adapt:
        tags = run.data.tags
        short = get_method(tags["method"]).short_name  # the full name is the method tag
        # one fold, one seed: the name shows the trial's number where its group has several
        suffix = " #[0-9]" if tags["method"] == "timematch" else ""
        assert re.fullmatch(rf"{tags['scenario']} {short}{suffix}", run.info.run_name), run.info.run_name
        assert len(run.info.run_name) <= 16  # fits the UI's name column (looked at: see README)
        assert run.info.status == "FINISHED", tags.get("error")
        if tags.get("stopped_early") == "asha":  # the scheduler's choice, not a failure
            assert 1 <= int(tags["epochs_run"]) < 3 and "test_macro_f1" not in run.data.metrics
        else:
            assert "test_macro_f1" in run.data.metrics
    (pretrain,) = runs["pretrain"]
    assert pretrain.info.run_name == "pretrain DK" and pretrain.info.status == "FINISHED"


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
        assert any(metrics[f"avg_test_macro_f1/{method}"] == pytest.approx(100 * r.data.metrics["test_macro_f1"])
                   for r in chosen)
        assert metrics[f"test_macro_f1/DK-FR1/{method}"] == metrics[f"avg_test_macro_f1/{method}"]
    assert metrics["report_trials"] == len(finished)
    assert metrics["trials_failed"] == 0 and metrics["trials_done"] + metrics["trials_stopped_early"] == 4
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
    assert len(trials) == 3 and all(t.state.is_finished() for t in trials)


def test_the_best_models_are_registered_and_predict_raw_parcels_on_their_own(sweep, data_root):
    from timematch.data.dataset import DataConfig, open_domains
    from timematch.evaluation import predict
    from timematch.serving import parcels_input

    uri, client, _, runs, tmp = sweep
    finished = [r for r in runs["adapt"] if r.data.tags["method"] == "timematch" and "test_macro_f1" in r.data.metrics]
    top = max(r.data.metrics["final_target_val_f1"] for r in finished)
    registered = client.get_model_version_by_alias("record.DK-FR1.timematch", "best")
    best = next(r for r in finished if r.info.run_id == registered.run_id)
    assert best.data.metrics["final_target_val_f1"] == top  # by the objective, never the test split
    assert client.get_model_version_by_alias("record.DK-FR1.source_only", "best")

    mlflow.set_tracking_uri(uri)
    model = mlflow.pyfunc.load_model("models:/record.DK-FR1.timematch@best")
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


def test_the_printed_address_opens_the_model_training_view():
    from timematch.runner.tracking import ui_address

    assert ui_address("http://mlflow:5000/", "3", "abc") == (
        "http://mlflow:5000/#/experiments/3/runs/abc?workflowType=machine_learning")
    local = ui_address("sqlite:////srv/exp/mlflow.db", "3")
    assert local.startswith("http://127.0.0.1:5000/#/experiments/3?workflowType=machine_learning")
    assert "make ui STORE=/srv/exp/mlflow.db" in local

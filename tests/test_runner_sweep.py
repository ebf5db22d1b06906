"""End to end on real Ray, Optuna and MLflow (SQLite in a temporary folder), smoke budgets.

One Ray instance serves the whole test session; launches run in this process (they join it)
or as ``launch.py`` subprocesses given its address (to be killed and resumed).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from mlflow import MlflowClient

from tests.support.launches import REPO, common_args, metric_log, runs_of, tracking_uri
from timematch.runner.cli import EXIT_OK, EXIT_TRIALS_FAILED, EXIT_USAGE, main

TAGS = ("stage", "scenario", "source", "target", "method", "fold", "objective", "selection_uses_target_labels")
pytestmark = pytest.mark.slow


def test_sweep_logs_runs_and_reuses_source_models(ray_address, data_root, tmp_path, monkeypatch, capsys):
    cache = tmp_path / "cache"
    monkeypatch.setenv("TIMEMATCH_CACHE", str(cache))
    uri = tracking_uri(tmp_path)
    args = common_args(data_root, tmp_path, "sweep")
    code = main(args + ["--scenario", "DK-FR1,FR1-FR2", "--method", "timematch,fixmatch", "--trials", "2",
                        "--gpus-per-trial", "0.5"], project_root=REPO)
    out = capsys.readouterr().out
    assert code == EXIT_OK, out
    assert "source models: 2 done" in out and "adaptation: " in out and "0 failed (10 planned)" in out
    assert "gpus per trial 0.5, trials at once 2" in out

    # -- the experiment opens in MLflow's model-training view; the launch's parent run and the pretraining children
    assert MlflowClient(uri).get_experiment_by_name("sweep").tags["mlflow.experimentKind"] == "custom_model_development"
    (parent,) = runs_of(uri, "sweep", "launch")
    assert parent.info.status == "FINISHED" and parent.data.tags["objective"] == "target_val_f1"
    assert parent.data.tags["gpus_per_trial"] == "0.5"
    assert parent.data.params["scenarios"] == "DK-FR1,FR1-FR2"
    pretrain = runs_of(uri, "sweep", "pretrain")
    assert len(pretrain) == 2 and {r.data.tags["source"] for r in pretrain} == {"DK", "FR1"}
    for run in pretrain:
        assert run.info.status == "FINISHED" and run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert "final_source_val_f1" in run.data.metrics
        assert len(run.data.tags["ray_node_id"]) >= 16 and run.data.tags["ray_node_address"]
    models = sorted((cache / "source_models").glob("*.pt"))
    assert len(models) == 2
    stamps = {p: p.stat().st_mtime_ns for p in models}

    # -- one child run per trial: tags, full config, per-epoch and test metrics, artifacts
    adapt = runs_of(uri, "sweep", "adapt")
    assert len(adapt) == 2 * 2 * 2 + 2
    assert len({r.data.tags["trial_key"] for r in adapt}) == len(adapt)
    assert all(r.info.status == "FINISHED" for r in adapt)  # stopped by ASHA is not a failure
    stopped = [r for r in adapt if r.data.tags.get("stopped_early") == "asha"]
    finished = [r for r in adapt if r not in stopped]
    assert all(int(r.data.tags["epochs_run"]) < int(r.data.params["epochs"]) for r in stopped)
    assert all("test_macro_f1" not in r.data.metrics for r in stopped)
    client = MlflowClient(uri)
    from timematch.methods import config_fields

    for run in adapt:
        tags = run.data.tags
        assert all(tags.get(t) for t in TAGS), tags
        assert tags["selection_uses_target_labels"] == "true" and tags["mlflow.parentRunId"] == parent.info.run_id
        assert set(run.data.params) == set(config_fields(tags["method"]))
        assert tags["device"].startswith("cuda:") if torch.cuda.is_available() else tags["device"] == "cpu"
        assert [m.step for m in client.get_metric_history(run.info.run_id, "target_val_f1")][0] == 1
    # one Ray node here: every trial and source model ran on it, and says so
    assert len({r.data.tags["ray_node_id"] for r in adapt + pretrain}) == 1
    for run in finished:
        metrics = run.data.metrics
        assert {"test_macro_f1", "test_accuracy", "test_kappa", "final_target_val_f1"} <= set(metrics)
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"per_class_report.json", "per_class_report.csv", "plots"} <= artifacts
        plots = {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
        assert "plots/confusion_matrix.png" in plots
        if run.data.tags["method"] == "timematch":
            assert "plots/shift_scores.png" in plots and "estimated_shift" in metrics
            epochs = int(run.data.params["epochs"])
            history = client.get_metric_history(run.info.run_id, "train_loss")
            assert sorted(m.step for m in history) == list(range(1, epochs + 1))
    baselines = [r for r in adapt if r.data.tags["method"] == "source_only"]
    assert len(baselines) == 2 and all(r.data.tags["baseline"] == "true" for r in baselines)

    # -- the model loads with mlflow.pytorch.load_model and runs
    run = next(r for r in finished if r.data.tags["method"] == "timematch" and r.data.tags["source"] == "DK")
    mlflow.set_tracking_uri(uri)
    model = mlflow.pytorch.load_model(run.data.tags["model_uri"]).eval()
    classes = mlflow.artifacts.load_dict(f"runs:/{run.info.run_id}/confusion_matrix.json")["classes"]
    pixels = torch.rand(3, 52, 64, 10)
    mask = torch.ones(3, 64, dtype=torch.bool)
    positions = torch.arange(0, 52 * 7, 7).repeat(3, 1)
    with torch.no_grad():
        logits, features = model(pixels, mask, positions)
    assert logits.shape == (3, len(classes)) and torch.isfinite(logits).all()

    # -- the report, on disk and in MLflow
    report = tmp_path / "results" / "sweep" / "report.md"
    assert report.is_file() and "timematch" in report.read_text() and "DK → FR1" in report.read_text()
    # two trials per searched group: no importance, and one line per group that says why
    notes = re.findall(r"^- (\S+) (\S+): no importance: .*an importance needs at least 4$", report.read_text(), re.M)
    assert sorted(notes) == sorted((s, m) for s in ("DK-FR1", "FR1-FR2") for m in ("fixmatch", "timematch"))
    assert "| parameter |" not in report.read_text()
    logged = {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    assert {"report/report.md", "report/report.html", "report/report.png"} <= logged
    code = main(["report", "--experiment", "sweep", "--tracking-uri", uri, "--results-dir", str(tmp_path / "r2")],
                project_root=REPO)
    out = capsys.readouterr().out
    assert code == EXIT_OK and "| source_only |" in out and "| timematch |" in out

    # -- a second launch reuses both source models; one of them corrupted makes its trials
    # fail, are logged as failed, the sweep goes on and the summary lists them
    fr1 = next(p for p in models if p.name.startswith("france"))
    fr1.write_bytes(b"not a model")
    code = main(args + ["--scenario", "DK-FR1,FR1-FR2", "--method", "fixmatch", "--no-search"], project_root=REPO)
    out = capsys.readouterr().out
    assert code == EXIT_TRIALS_FAILED, out
    # the launch's report is scoped to this launch: no row of the first launch's timematch trials
    table = out[out.index("| Method |"):]
    assert "| fixmatch |" in table and "| timematch |" not in table and "of launch " in table
    assert "Each cell selects from (finished trials per fold x folds): source_only 1 x 1; fixmatch 1 x 1." in table
    code = main(["report", "--experiment", "sweep", "--tracking-uri", uri, "--results-dir", str(tmp_path / "r3"),
                 "--launch", "all"], project_root=REPO)
    pooled = capsys.readouterr().out
    assert code == EXIT_OK and "| timematch |" in pooled and "all launches of experiment 'sweep' pooled" in pooled
    # the pooled cells select from both launches' trials
    pooled_counts = re.search(r"; fixmatch (\d+)(?:-(\d+))? x 1", pooled)
    assert pooled_counts and int(pooled_counts.group(2) or pooled_counts.group(1)) >= 2, pooled
    code = main(["report", "--experiment", "sweep", "--tracking-uri", uri, "--launch", "nope"], project_root=REPO)
    assert code == EXIT_USAGE and "--launch nope: no such launch" in capsys.readouterr().err
    assert "source models: 0 done, 0 stopped early by ASHA, 0 failed, 2 reused from the cache" in out
    assert "FAILED FR1-FR2/fixmatch/fold0" in out and "FAILED FR1-FR2/source_only/fold0" in out
    assert len(runs_of(uri, "sweep", "pretrain")) == 2  # no second pretraining
    dk = next(p for p in models if p.name.startswith("denmark"))
    assert dk.stat().st_mtime_ns == stamps[dk]
    second = [r for r in runs_of(uri, "sweep", "adapt") if r.info.run_id not in {a.info.run_id for a in adapt}]
    assert len(second) == 4
    for run in second:
        if run.data.tags["source"] == "FR1":
            assert run.info.status == "FAILED" and "not a readable source-model file" in run.data.tags["error"]
        else:
            assert run.info.status == "FINISHED" and "test_macro_f1" in run.data.metrics


def test_every_registered_method_runs_through_the_runner(ray_address, data_root, tmp_path, monkeypatch, capsys):
    from timematch.methods import get_method, methods_in_table_order

    monkeypatch.setenv("TIMEMATCH_CACHE", str(tmp_path / "cache"))
    uri = tracking_uri(tmp_path)
    # a two-trial search of every method (its search space sampled after the defaults)
    code = main(common_args(data_root, tmp_path, "all-methods") + ["--scenario", "DK-FR1", "--method", "all",
                                                                    "--trials", "2"], project_root=REPO)
    out = capsys.readouterr().out
    methods = methods_in_table_order()
    assert code == EXIT_OK, out
    assert f"0 failed ({1 + 2 * (len(methods) - 1)} planned)" in out  # the baseline once, the others twice
    adapt = runs_of(uri, "all-methods", "adapt")
    assert sorted(set(r.data.tags["method"] for r in adapt)) == sorted(methods)
    assert all(r.info.status == "FINISHED" for r in adapt)
    for method in methods:  # each: its defaults and one sampled trial (ASHA may stop the second early)
        mine = [r for r in adapt if r.data.tags["method"] == method]
        assert len(mine) == (1 if method == "source_only" else 2), method
        assert any("test_macro_f1" in r.data.metrics for r in mine), method
        assert len(mine) == 1 or any("sampled" in r.data.tags for r in mine), method
    adapt = [r for r in adapt if "test_macro_f1" in r.data.metrics]
    table = out[out.index("| Method |"):out.index("Selection gap")]  # the main table only
    # a row's name, without the mark of rows that are one model ("dann (=A)")
    rows = [line.split("|")[1].strip().split(" (")[0] for line in table.splitlines()
            if line.startswith("| ") and "Method" not in line]
    assert rows == methods  # the paper's order, from each method class's table_order
    for line in table.splitlines():
        name = line.split("|")[1].strip().split(" (")[0] if line.startswith("| ") else ""
        if name and name != "Method" and get_method(name).reference:
            assert "**" not in line, line  # reference rows are never marked best
    # per-epoch logs that say whether a competitor works, in each default trial (#0: a sampled
    # config at this tiny budget may, e.g., transport no mass at all)
    adapt = [r for r in runs_of(uri, "all-methods", "adapt") if r.info.run_name.endswith("#0")]
    dann = next(r for r in adapt if r.data.tags["method"] == "dann")
    assert {"discriminator_accuracy", "grl_coefficient", "transfer_loss"} <= set(dann.data.metrics)
    jumbot = next(r for r in adapt if r.data.tags["method"] == "jumbot")
    assert 0 < jumbot.data.metrics["transported_mass"] <= 1.0 + 1e-6
    alda = next(r for r in adapt if r.data.tags["method"] == "alda")
    assert "pseudo_label_acceptance" in alda.data.metrics
    for name in ("mad", "cmad"):  # the time-aligning methods: transport, DTW offset in days, rounds
        run = next(r for r in adapt if r.data.tags["method"] == name)
        assert {"transport_cost", "dtw_offset", "bcd_rounds", "ot_failures_count"} <= set(run.data.metrics), name
        assert abs(run.data.metrics["dtw_offset"]) < 365
        assert run.data.tags["planted_shift"] == "25"  # DK -> FR1 on the generator's default shifts
    raincoat = next(r for r in adapt if r.data.tags["method"] == "raincoat")
    assert {"transport_cost", "reconstruction_loss"} <= set(raincoat.data.metrics)
    # shift augmentation trains once on the source tile (stage 1) and its trial evaluates it
    trainings = {r.data.tags["pretrain_key"]: r for r in runs_of(uri, "all-methods", "pretrain")}
    shift_aug = next(r for r in runs_of(uri, "all-methods", "adapt")
                     if r.data.tags["method"] == "shift_aug" and r.data.tags["pretrain_key"] in trainings)
    training = trainings[shift_aug.data.tags["pretrain_key"]]
    # its own method tag, apart from the shift-augmentation trials in "Group by: method"
    assert training.data.tags["method"] == "pretrain:shift_aug" and training.data.tags["trains"] == "shift_aug"
    assert training.info.run_name == "train DK SA"
    assert training.data.params["shift_aug"] == "True" and training.info.status == "FINISHED"
    assert "stage 1, source models: 2" in out and "DK/fold0/shift_aug" in out
    _check_movement_and_one_model_rows(uri, tmp_path / "results", out)


def _check_movement_and_one_model_rows(uri: str, results: Path, out: str) -> None:
    """Every adaptation trial logs how far it moved from its source model, per epoch and final,
    and its target test predictions; the report names exactly the rows that are one model."""
    from timematch.methods import get_method
    from timematch.movement import MOVEMENT_METRICS
    from timematch.report import best_trials
    from timematch.report.agreement import SAME, THRESHOLD
    from timematch.runner import runs
    from timematch.runner.launch_state import ExperimentFolder
    from timematch.runner.reporting import build_report

    client = MlflowClient(uri)
    finished = [r for r in runs_of(uri, "all-methods", "adapt") if "test_macro_f1" in r.data.metrics]
    for run in finished:
        moves = get_method(run.data.tags["method"]).starts_from_source
        assert moves == ({f"final_{m}" for m in MOVEMENT_METRICS} <= set(run.data.metrics)), run.info.run_name
        if moves:
            history = client.get_metric_history(run.info.run_id, "changed_by_batch_norm")
            assert sorted(m.step for m in history) == [1, 2], run.info.run_name
        assert runs.read_predictions(client, run.info.run_id) is not None, run.info.run_name
    report = build_report(uri, ExperimentFolder(results, "all-methods"), log_to_mlflow=False)
    selected = best_trials(report.rows, "target_val_f1")
    predictions = {r.method: runs.read_predictions(client, r.run_id) for r in selected}
    together = {frozenset(d.methods) for d in report.degenerate if d.reason == SAME}
    # at the smoke budget (4 steps) the competitors cannot differ: they are named as one model
    assert any({"dann", "cdan"} <= group for group in together), report.degenerate
    for a in predictions:
        for b in predictions:
            if a < b and np.mean(predictions[a] == predictions[b]) >= THRESHOLD:
                assert any({a, b} <= group for group in together), (a, b, together)
    for group in together:  # each named group is linked by agreements of >= 99 %
        assert any(np.mean(predictions[a] == predictions[b]) >= THRESHOLD for a in group for b in group if a != b)
    shown = report.markdown[:report.markdown.index("Selection gap")]
    assert all(d.sentence() in shown for d in report.degenerate)  # under the main table
    group = next(d for d in report.degenerate if {"dann", "cdan"} <= set(d.methods))
    mark = "=" + "ABCDEFGHIJ"[[d for d in report.degenerate if d.reason == SAME].index(group)]
    assert f"| dann ({mark}" in shown and f"({mark}) " + group.sentence() in shown
    assert ("rows that do not differ at this budget" in out) == bool(report.degenerate)
    launch = next(r for r in runs_of(uri, "all-methods", "launch"))
    assert group.sentence() in launch.data.tags["mlflow.note.content"]  # the launch run's description too
    moved = report.markdown[report.markdown.index("## How far each method moved"):]
    assert "| dann |" in moved and "| source_only |" not in moved.split("\n## ")[0]


def test_killed_launch_resumes_without_rerunning_or_losing_anything(ray_address, data_root, tmp_path):
    env = {**os.environ, "TIMEMATCH_CACHE": str(tmp_path / "cache")}
    uri = tracking_uri(tmp_path)
    args = common_args(data_root, tmp_path, "resume")
    launch = [sys.executable, str(REPO / "launch.py"), "--address", ray_address]
    planned = ["--scenario", "DK-FR1", "--method", "timematch", "--trials", "3",
               "--set", "methods.timematch.epochs=3"]
    process = subprocess.Popen(launch + args + planned, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env=env)
    watchdog = threading.Timer(300, process.kill)
    watchdog.start()
    seen = []
    try:
        for line in process.stdout:
            seen.append(line)
            if line.split("]", 1)[-1].strip().startswith("done") and "DK-FR1/timematch" in line:
                process.send_signal(signal.SIGKILL)  # mid-sweep: one trial finished, others in flight
                break
        process.wait(timeout=60)
    finally:
        watchdog.cancel()
    assert process.returncode == -signal.SIGKILL, "".join(seen)

    client = MlflowClient(uri)
    before = {r.info.run_id: metric_log(client, r) for r in runs_of(uri, "resume")}
    finished_before = {r.data.tags["trial_key"] for r in runs_of(uri, "resume", "adapt") if r.info.status == "FINISHED"}
    assert finished_before

    resumed = subprocess.run(launch + args + ["--resume"], capture_output=True, text=True, env=env, timeout=600)
    assert resumed.returncode == EXIT_OK, resumed.stdout + resumed.stderr
    assert "resuming launch" in resumed.stdout
    assert "adaptation: " in resumed.stdout and "0 failed (4 planned)" in resumed.stdout

    after = {r.info.run_id: r for r in runs_of(uri, "resume")}
    # nothing logged before the kill was lost
    for run_id, entries in before.items():
        assert run_id in after
        assert entries <= metric_log(client, after[run_id])
    adapt = [r for r in after.values() if r.data.tags.get("stage") == "adapt"]
    assert len({r.data.tags["trial_key"] for r in adapt}) == len(adapt)  # one run per trial
    assert not [r for r in adapt if r.info.status == "RUNNING"]
    completed = [r for r in adapt if r.info.status == "FINISHED"]
    assert len(completed) == 4  # every planned trial (3 searched + the baseline) exactly once
    for run in completed:
        if run.data.tags.get("stopped_early") != "asha":
            assert "test_macro_f1" in run.data.metrics
        if run.data.tags["trial_key"] in finished_before:  # finished before the kill: not run again
            assert run.data.tags["attempt"] == "1"
    assert all(r.data.tags.get("interrupted") == "true" for r in adapt if r not in completed)
    # the trials' resumable states (trial_run) are gone once each ended without an error
    states = list((tmp_path / "results" / "resume" / "launches").glob("*/trial_states/*.pt"))
    assert not states, states

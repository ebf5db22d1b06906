"""Arrays of trials through the runner (--array K), end to end on real Ray, Optuna and MLflow.

Each member is still a trial: its own Optuna trial in its group's study (the defaults first),
its own MLflow run with every epoch, its models and the array's tags, its own stop at a rung;
the report, winner tags and registry treat it as any trial. A member that goes NaN fails
alone; a launch killed mid-array resumes every member from its last epoch, once.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading

import optuna
import pytest
from mlflow import MlflowClient

from tests.support.launches import REPO, common_args, metric_log, runs_of, tracking_uri
from timematch.runner.cli import EXIT_OK, EXIT_TRIALS_FAILED, main

pytestmark = pytest.mark.slow


def _studies(results, experiment: str) -> dict[str, list]:
    storage = f"sqlite:///{results / experiment / 'optuna.db'}"
    return {s.study_name.split(" ", 1)[1]: optuna.load_study(study_name=s.study_name, storage=storage).trials
            for s in optuna.get_all_study_summaries(storage)}


def test_an_arrays_members_are_trials(ray_address, data_root, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TIMEMATCH_CACHE", str(tmp_path / "cache"))
    uri = tracking_uri(tmp_path)
    code = main(common_args(data_root, tmp_path, "arrays") + [
        "--scenario", "DK-FR1", "--method", "dann,timematch,raincoat", "--trials", "4", "--array", "2"],
        project_root=REPO)
    out = capsys.readouterr().out
    assert code == EXIT_OK, out
    assert "trials per array: 2 (--array)" in out
    assert "DK-FR1/dann/fold0" in out and "in 2 array(s) of 2+2 trained as one model" in out
    assert out.count("array of 2:") == 6  # two arrays each
    assert "adaptation: " in out and "0 failed (13 planned)" in out

    client = MlflowClient(uri)
    adapt = runs_of(uri, "arrays", "adapt")
    assert len(adapt) == 3 * 4 + 1 and all(r.info.status == "FINISHED" for r in adapt)
    studies = _studies(tmp_path / "results", "arrays")
    for method in ("dann", "timematch"):
        members = [r for r in adapt if r.data.tags["method"] == method]
        assert len(members) == 4
        arrays = {r.data.tags["array"] for r in members}
        assert len(arrays) == 2 and {r.data.tags["array_member"] for r in members} == {"0", "1"}
        assert len({r.data.tags["trial_key"] for r in members}) == 4
        trials = {t.number: t for t in studies[f"DK-FR1/{method}/fold0"]}
        assert sorted(trials) == [0, 1, 2, 3] and {int(r.data.tags["optuna_trial"]) for r in members} == set(trials)
        assert len({r.data.tags["sampled"] for r in members}) == 4  # each member its own sampled values
        for run in members:
            trial = trials[int(run.data.tags["optuna_trial"])]
            assert json.loads(run.data.tags["sampled"]) == trial.params
            epochs = {m.step for m in client.get_metric_history(run.info.run_id, "target_val_f1")}
            if run.data.tags.get("stopped_early") == "asha":
                assert trial.state == optuna.trial.TrialState.PRUNED and "test_macro_f1" not in run.data.metrics
                assert max(trial.intermediate_values) == int(run.data.tags["epochs_run"]) == max(epochs)
            else:
                assert trial.state == optuna.trial.TrialState.COMPLETE
                assert trial.value == pytest.approx(run.data.metrics["final_target_val_f1"])
                assert "test_macro_f1" in run.data.metrics and "final_moved_encoder" in run.data.metrics
                assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {
                    "target_test_predictions.npy", "confusion_matrix.json"}
                assert epochs == set(range(1, 1 + max(epochs)))
        assert sum(r.data.tags.get("best") == "true" for r in members) == 1
        assert client.get_model_version_by_alias(f"arrays-DK-FR1-{method}", "best")
    defaults = trials[0].params  # timematch's study asked the profile's defaults first
    assert defaults["pseudo_threshold"] == 0.9 and defaults["max_temporal_shift"] == 60
    # RAINCOAT's searched fourier_modes sets a shape: members that differ there train as arrays in turn
    raincoat = [r for r in adapt if r.data.tags["method"] == "raincoat"]
    assert len({r.data.params["fourier_modes"] for r in raincoat}) > 1
    assert all("test_macro_f1" in r.data.metrics or r.data.tags.get("stopped_early") for r in raincoat)
    (baseline,) = [r for r in adapt if r.data.tags["method"] == "source_only"]
    assert "array" not in baseline.data.tags
    assert (tmp_path / "results" / "arrays" / "report.md").is_file()


def test_a_member_that_goes_nan_fails_alone(data_root, tmp_path):
    """NaN in member #1 of an array (TIMEMATCH_INJECT_NAN=dann#1:...): its run FAILED with where it
    diverged, its study trial FAIL; its array's other member finishes."""
    env = {**os.environ, "TIMEMATCH_CACHE": str(tmp_path / "cache"), "TIMEMATCH_INJECT_NAN": "dann#1:1:2"}
    args = common_args(data_root, tmp_path, "nan") + ["--scenario", "DK-FR1", "--method", "dann", "--trials", "2",
                                                       "--array", "2", "--no-baseline"]
    done = subprocess.run([sys.executable, str(REPO / "launch.py"), *args], capture_output=True, text=True, env=env,
                          timeout=900)
    assert done.returncode == EXIT_TRIALS_FAILED, done.stdout + done.stderr
    assert "array of 2: 1 done, 0 stopped, 1 failed" in done.stdout
    runs = {r.data.tags["optuna_trial"]: r for r in runs_of(tracking_uri(tmp_path), "nan", "adapt")}
    assert runs["1"].info.status == "FAILED" and "NonFiniteLoss" in runs["1"].data.tags["error"]
    assert (runs["1"].data.tags["diverged_epoch"], runs["1"].data.tags["diverged_step"]) == ("1", "2")
    assert runs["0"].info.status == "FINISHED" and "test_macro_f1" in runs["0"].data.metrics
    states = {t.number: t.state for t in _studies(tmp_path / "results", "nan")["DK-FR1/dann/fold0"]}
    assert states == {0: optuna.trial.TrialState.COMPLETE, 1: optuna.trial.TrialState.FAIL}


def test_a_launch_killed_mid_array_resumes_every_member_once(ray_address, data_root, tmp_path):
    env = {**os.environ, "TIMEMATCH_CACHE": str(tmp_path / "cache")}
    uri = tracking_uri(tmp_path)
    args = common_args(data_root, tmp_path, "resume") + [
        "--scenario", "DK-FR1", "--method", "timematch", "--trials", "2", "--array", "2", "--no-baseline",
        "--set", "methods.timematch.epochs=4", "--set", "methods.timematch.steps_per_epoch=12",
        "--set", "scheduler.grace_period=4"]
    launch = [sys.executable, str(REPO / "launch.py"), "--address", ray_address]
    process = subprocess.Popen(launch + args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    watchdog = threading.Timer(600, process.kill)
    watchdog.start()
    client = MlflowClient(uri)
    seen = []
    try:
        for line in process.stdout:
            seen.append(line)
            if "start   DK-FR1/timematch" in line:
                break
        while process.poll() is None:  # kill once both members logged an epoch (of four)
            members = runs_of(uri, "resume", "adapt") if (tmp_path / "mlflow" / "mlflow.db").exists() else []
            if len(members) == 2 and all(client.get_metric_history(r.info.run_id, "target_val_f1") for r in members):
                process.send_signal(signal.SIGKILL)
                break
            threading.Event().wait(0.5)
        process.wait(timeout=60)
    finally:
        watchdog.cancel()
    assert process.returncode == -signal.SIGKILL, "".join(seen)
    before = {r.info.run_id: metric_log(client, r) for r in runs_of(uri, "resume", "adapt")}

    resumed = subprocess.run(launch + common_args(data_root, tmp_path, "resume") + ["--resume"], capture_output=True,
                             text=True, env=env, timeout=900)
    assert resumed.returncode == EXIT_OK, resumed.stdout + resumed.stderr
    assert "0 failed (2 planned)" in resumed.stdout
    after = runs_of(uri, "resume", "adapt")
    assert {r.info.run_id for r in after} == set(before)  # the same two runs, continued
    for run in after:
        assert run.info.status == "FINISHED" and "test_macro_f1" in run.data.metrics
        assert before[run.info.run_id] <= metric_log(client, run)
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "target_val_f1")]
        assert sorted(steps) == [1, 2, 3, 4]  # every epoch logged once
    trials = _studies(tmp_path / "results", "resume")["DK-FR1/timematch/fold0"]
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE] * 2


def test_which_groups_run_in_arrays(data_root, tmp_path, capsys):
    """A searched group of a method that can share an array does; a method whose step runs on the
    host (JUMBOT), a group of one trial and the baseline run alone; --array 1 is today's path."""
    args = common_args(data_root, tmp_path, "plan") + ["--scenario", "DK-FR1", "--method", "dann,jumbot,mmd",
                                                        "--dry-run"]
    assert main(args + ["--trials", "5", "--array", "2"], project_root=REPO) == EXIT_OK
    out = capsys.readouterr().out
    assert "trials per array: 2 (--array)" in out
    lines = {line.split()[0]: line for line in out.splitlines() if line.startswith("  DK-FR1/")}
    assert "in 3 array(s) of 2+2+1" in lines["DK-FR1/dann/fold0"] and "in 3 array(s) of 2+2+1" in lines["DK-FR1/mmd/fold0"]
    assert "array" not in lines["DK-FR1/jumbot/fold0"] and "array" not in lines["DK-FR1/source_only/fold0"]
    assert main(args + ["--trials", "1", "--array", "4"], project_root=REPO) == EXIT_OK
    assert "array(s)" not in capsys.readouterr().out  # one trial per group: nothing to share
    assert main(args + ["--trials", "5"], project_root=REPO) == EXIT_OK
    assert "trials per array: 1 (auto: 1 on a CPU)" in capsys.readouterr().out

"""Faults of a long sweep, injected into real launches (smoke profile, real Ray, Optuna, MLflow on
SQLite), and what the user must see: no corrupted or duplicated record, bad data caught once and
early, a full disk named in one line with nothing half-written left, concurrent launches sharing
one source-model training.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from tests.support.cluster_harness import RUNNER, Services, runner_env, start_mlflow
from timematch import training
from timematch.runner import run_names, tracking
from timematch.runner.runs import find_run, open_run

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def uri_of(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}"


def launch_argv(ray_address: str, data_root: Path | None, tmp_path: Path, experiment: str, *extra: str) -> list[str]:
    argv = [sys.executable, str(REPO / "launch.py"), "--address", ray_address, "--profile", "smoke",
            "--set", "data.min_parcels=20", "--results-dir", str(tmp_path / "results"),
            "--tracking-uri", uri_of(tmp_path), "--experiment", experiment, "--folds", "1",
            "--scenario", "DK-FR1", "--method", "timematch", "--trials", "1", "--no-baseline", *extra]
    if data_root is not None:
        argv += ["--data-root", str(data_root)]
    return argv


def env_with(cache: Path) -> dict[str, str]:
    return {**os.environ, "TIMEMATCH_CACHE": str(cache)}


def one_error_line(done: subprocess.CompletedProcess) -> str:
    assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-2000:]
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    return lines[0]


def runs(uri: str, experiment: str, stage: str | None = None) -> list:
    client = MlflowClient(uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return []
    everything = client.search_runs([found.experiment_id], max_results=1000)
    return [r for r in everything if stage is None or r.data.tags.get("stage") == stage]


# -- no record corrupted or duplicated -----------------------------------------------------


def test_a_pretraining_run_is_found_only_among_pretraining_runs(tmp_path):
    """An adaptation run carries the pretrain_key of its source model: a later training of that
    model must not be logged into it (nor flip it to FINISHED)."""
    uri = uri_of(tmp_path)
    client = tracking.client(uri)
    experiment = tracking.ensure_experiment(uri, "lookup")
    adaptation = client.create_run(experiment, tags={"stage": "adapt", "pretrain_key": "K", "trial_key": "l/t1"})
    client.set_terminated(adaptation.info.run_id, status="FAILED")

    run_id, finished = open_run(client, experiment, run_names.pretrain_run_key("K"), {"method": "m"}, {},
                                "pretrain", None, reuse_finished=False)
    assert run_id != adaptation.info.run_id and not finished
    assert client.get_run(adaptation.info.run_id).info.status == "FAILED"
    # a retried training continues its own run
    client.set_terminated(run_id, status="FAILED")
    again, _ = open_run(client, experiment, run_names.pretrain_run_key("K"), {}, {}, "pretrain", None,
                        reuse_finished=False)
    assert again == run_id and client.get_run(run_id).data.tags["attempt"] == "2"


def test_a_run_is_found_by_tag_values_with_quotes(tmp_path):
    """Filters quote every tag value the way MLflow's parser reads it: a value holding ``'``
    (a user's ``--launch`` or experiment text) finds its run, and only its run."""
    uri = uri_of(tmp_path)
    client = tracking.client(uri)
    experiment = tracking.ensure_experiment(uri, "quotes")
    for value in ("it's", 'say "x"', "plain"):
        run = client.create_run(experiment, tags={"launch_id": value})
        assert find_run(client, experiment, {"launch_id": value}).info.run_id == run.info.run_id, value
    assert find_run(client, experiment, {"launch_id": "it"}) is None


def test_driver_killed_during_pretraining_resumes_with_every_epoch_logged_once(ray_address, data_root, tmp_path):
    argv = launch_argv(ray_address, data_root, tmp_path, "kill-pretrain", "--set", "pretrain.epochs=6")
    env = env_with(tmp_path / "cache")
    # killed once two epochs are trained and checkpointed
    _kill_when(argv, env, lambda line: line.split("]", 1)[-1].split()[:2] == ["epoch", "2"] and "pretrain" in line)
    uri = uri_of(tmp_path)
    (killed,) = runs(uri, "kill-pretrain", "pretrain")
    before = [m.step for m in MlflowClient(uri).get_metric_history(killed.info.run_id, "train_loss")]
    assert before and len(before) == len(set(before))

    resumed = subprocess.run(argv[:argv.index("--profile")] + ["--resume", "--experiment", "kill-pretrain",
                                                               "--results-dir", str(tmp_path / "results")],
                             capture_output=True, text=True, env=env, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    (pretrain,) = runs(uri, "kill-pretrain", "pretrain")  # the same run, continued
    assert pretrain.info.run_id == killed.info.run_id and pretrain.info.status == "FINISHED"
    steps = [m.step for m in MlflowClient(uri).get_metric_history(pretrain.info.run_id, "train_loss")]
    assert sorted(steps) == list(range(1, 7)), f"each epoch once: {sorted(steps)}"
    assert not [r for r in runs(uri, "kill-pretrain") if r.info.status == "RUNNING"]


def _kill_when(argv: list[str], env: dict[str, str], seen_line) -> list[str]:
    """Run a launch and SIGKILL it at the first line for which ``seen_line`` is true."""
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    watchdog = threading.Timer(400, process.kill)
    watchdog.start()
    seen = []
    try:
        for line in process.stdout:
            seen.append(line)
            if seen_line(line):
                process.send_signal(signal.SIGKILL)
                break
        process.wait(timeout=60)
    finally:
        watchdog.cancel()
    assert process.returncode == -signal.SIGKILL, "".join(seen)
    return seen


def _resume_to_one_clean_record(argv: list[str], env: dict[str, str], tmp_path: Path, experiment: str) -> str:
    """``--resume`` the killed launch: every planned trial done once, nothing RUNNING, the report whole."""
    resumed = subprocess.run(argv[:argv.index("--profile")] + ["--resume", "--experiment", experiment,
                                                               "--results-dir", str(tmp_path / "results")],
                             capture_output=True, text=True, env=env, timeout=600)
    out = resumed.stdout + resumed.stderr
    assert resumed.returncode == 0, out[-3000:]
    assert "resuming launch" in out and "adaptation: 1 done" in out and "| timematch |" in out, out[-3000:]
    assert (tmp_path / "results" / experiment / "report.md").is_file()
    uri = uri_of(tmp_path)
    by_stage = {stage: runs(uri, experiment, stage) for stage in ("launch", "pretrain", "adapt")}
    assert [len(by_stage[s]) for s in ("launch", "pretrain", "adapt")] == [1, 1, 1], by_stage
    assert all(r.info.status == "FINISHED" for group in by_stage.values() for r in group)
    steps = [m.step for m in MlflowClient(uri).get_metric_history(by_stage["adapt"][0].info.run_id, "train_loss")]
    assert sorted(steps) == sorted(set(steps)), f"an epoch logged twice: {steps}"
    return out


def test_driver_killed_while_it_generates_the_embedded_data_resumes(ray_address, tmp_path):
    """No --data-root: the launch generates the embedded dataset into a fresh cache and is killed
    part-way; --resume regenerates it (the half-written one is never used) and runs the sweep."""
    argv = launch_argv(ray_address, None, tmp_path, "kill-generate")
    env = env_with(tmp_path / "cache")
    seen = _kill_when(argv, env, lambda line: "generating the embedded synthetic dataset" in line)
    assert not runs(uri_of(tmp_path), "kill-generate"), "nothing started before the data was there"
    assert not list((tmp_path / "cache" / "synthetic").glob("*/.complete.json")), "".join(seen)
    _resume_to_one_clean_record(argv, env, tmp_path, "kill-generate")
    assert list((tmp_path / "cache" / "synthetic").glob("*/.complete.json"))


def test_driver_killed_during_the_report_resumes_to_a_complete_report(ray_address, data_root, tmp_path):
    """Killed once every trial is done, as it builds the report: --resume runs nothing again
    (attempt 1 everywhere), writes the report and ends the launch run FINISHED."""
    argv = launch_argv(ray_address, data_root, tmp_path, "kill-report")
    env = env_with(tmp_path / "cache")
    _kill_when(argv, env, lambda line: line.startswith("adaptation: "))  # the summary, just before the report
    assert not (tmp_path / "results" / "kill-report" / "report.md").exists()
    out = _resume_to_one_clean_record(argv, env, tmp_path, "kill-report")
    started = [line for line in out.splitlines() if line.split("]", 1)[-1].split()[:1] == ["start"]]
    assert not started, f"a finished trial ran again: {started}"
    assert all(r.data.tags["attempt"] == "1" for r in runs(uri_of(tmp_path), "kill-report", "adapt"))


def test_two_launches_at_once_train_a_source_model_once_on_a_new_sqlite_store(ray_address, data_root, tmp_path):
    env = env_with(tmp_path / "cache")
    assert not (tmp_path / "mlflow").exists()  # a new store: both launches create its schema at once
    processes = [subprocess.Popen(launch_argv(ray_address, data_root, tmp_path, name), stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True, env=env) for name in ("twin-a", "twin-b")]
    outputs = [p.communicate(timeout=900) for p in processes]
    for process, (out, err) in zip(processes, outputs):
        assert process.returncode == 0, out[-3000:] + err[-3000:]
        assert "Traceback" not in err
    uri = uri_of(tmp_path)
    pretraining = runs(uri, "twin-a", "pretrain") + runs(uri, "twin-b", "pretrain")
    assert len(pretraining) == 1, "the source model was trained once"
    (source_run,) = pretraining
    assert source_run.info.status == "FINISHED"
    for name in ("twin-a", "twin-b"):
        (parent,) = runs(uri, name, "launch")
        assert parent.data.tags["source_run DK/fold0"] == source_run.info.run_id  # each launch links to it
        (adapt,) = runs(uri, name, "adapt")
        assert adapt.info.status == "FINISHED"


# -- bad data found once, early ------------------------------------------------------------


def _tile(root: Path, tile: str = "FR1") -> Path:
    from timematch.data.tiles import TILES

    return root / TILES[tile]


def _corrupt_chunk(root: Path) -> Path:
    parcel = _tile(root) / "data" / "3.zarr"
    (parcel / "0.0.0").write_bytes(os.urandom(200))
    return parcel


def _truncate_metadata(root: Path) -> Path:
    path = _tile(root) / "meta" / "metadata.pkl"
    path.write_bytes(path.read_bytes()[:100])
    return path


def _wrong_shape(root: Path) -> Path:
    import zarr

    parcel = _tile(root) / "data" / "5.zarr"
    shape = zarr.open_array(str(parcel), mode="r").shape
    zarr.open_array(str(parcel), mode="w", shape=(shape[0], shape[1], shape[2] + 3), dtype="uint16")[...] = 7
    return parcel


FAULTS = {"corrupt chunk": (_corrupt_chunk, "corrupt"), "truncated metadata.pkl": (_truncate_metadata, "metadata"),
          "parcel shape disagrees with the metadata": (_wrong_shape, "disagrees with the metadata")}


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_bad_data_is_one_line_naming_the_file_before_anything_starts(fault, ray_address, tmp_path):
    from timematch.data.synthetic import generate_dataset

    root = tmp_path / "data"
    generate_dataset(root, parcels_per_tile=200, tiles=["DK", "FR1"])
    inject, words = FAULTS[fault]
    bad_file = inject(root)
    done = subprocess.run(launch_argv(ray_address, root, tmp_path, "bad-data"), capture_output=True, text=True,
                          env=env_with(tmp_path / "cache"), timeout=300)
    line = one_error_line(done)
    assert str(bad_file) in line and words in line, line
    assert not runs(uri_of(tmp_path), "bad-data"), "no run was started"
    assert not (tmp_path / "cache" / "source_models").exists()

    info = subprocess.run([sys.executable, "-m", "timematch.data", "info", str(root), "--verify", "--tile", "FR1"],
                          capture_output=True, text=True, timeout=300)
    assert info.returncode != 0
    assert str(bad_file) in info.stdout + info.stderr


def test_info_verify_reads_every_parcel_of_a_good_tile(data_root):
    done = subprocess.run([sys.executable, "-m", "timematch.data", "info", str(data_root), "--verify", "--tile", "DK"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "verified: 200 of 200 parcel arrays" in done.stdout and "200/200 parcels, 0 bad" in done.stderr


def _kill_trial_workers() -> int:
    """SIGKILL the worker processes running trials (Ray names them after the trainable)."""
    found = subprocess.run(["pgrep", "-f", "^ray::ImplicitFunc"], capture_output=True, text=True).stdout.split()
    for pid in found:
        try:
            os.kill(int(pid), signal.SIGKILL)
        except ProcessLookupError:
            pass
    return len(found)


def test_a_failed_source_model_skips_its_adaptation_trials(ray_address, data_root, tmp_path):
    """The worker training the source model is killed twice (smoke: one retry): the model fails,
    its adaptation trial is not started, and the summary says why."""
    argv = launch_argv(ray_address, data_root, tmp_path, "no-source", "--set", "pretrain.epochs=20")
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env=env_with(tmp_path / "cache"))
    watchdog = threading.Timer(600, process.kill)
    watchdog.start()
    kills, seen = 0, []
    try:
        for line in process.stdout:
            seen.append(line)
            words = line.split("]", 1)[-1].split()
            if kills < 2 and words[:1] == ["epoch"] and "pretrain" in line:
                kills += bool(_kill_trial_workers())
        process.wait(timeout=60)
    finally:
        watchdog.cancel()
    out = "".join(seen)
    assert kills == 2 and process.returncode == 1, out[-3000:]
    assert "SKIPPED DK-FR1/timematch/fold0: not started: its source model DK/fold0 failed to train" in out
    # the cause in a few words on the terminal; Ray's whole text in the run
    retries = [line for line in seen if "] retry " in line]
    assert retries and all(line.rstrip().endswith("after: its worker process died (killed, out of memory or "
                                                  "crashed)") for line in retries), retries
    (pretrain,) = runs(uri_of(tmp_path), "no-source", "pretrain")
    assert pretrain.info.status == "FAILED" and pretrain.data.tags["attempt"] == "2"
    logged = [a.path for a in MlflowClient(uri_of(tmp_path)).list_artifacts(pretrain.info.run_id, "errors")]
    assert logged == ["errors/attempt-1.txt"], logged
    assert not runs(uri_of(tmp_path), "no-source", "adapt")


# -- numerical faults ------------------------------------------------------------------------


def test_a_nan_loss_stops_its_trial_with_epoch_step_and_checkpoint_and_the_sweep_goes_on(data_root, tmp_path):
    """$TIMEMATCH_INJECT_NAN makes FixMatch's loss NaN at epoch 2, step 1, in a real sweep: that
    trial fails saying where and what was kept, its retry ends at once instead of diverging
    again, TimeMatch's trial finishes and the report is written. A launch-owned local Ray
    (no --address) so the trials inherit the variable."""
    argv = launch_argv("", data_root, tmp_path, "nan", "--method", "timematch,fixmatch", "--set",
                       "methods.fixmatch.epochs=3")
    argv.remove("--address")
    argv.remove("")
    env = {**env_with(tmp_path / "cache"), training.INJECT_NAN_VARIABLE: "fixmatch:2:1"}
    done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=600)
    out = done.stdout + done.stderr
    assert done.returncode == 1, out[-3000:]  # a trial failed; the sweep did not stop
    failed = [line for line in out.splitlines() if "FAILED" in line and "fixmatch" in line]
    assert failed and "loss became nan at epoch 2, step 1; the last checkpoint holds epoch 1" in failed[0], out[-8000:]
    assert "adaptation: 1 done" in out and "1 failed" in out and "| timematch |" in out, out[-3000:]
    uri = uri_of(tmp_path)
    by_method = {r.data.tags["method"]: r for r in runs(uri, "nan", "adapt")}
    assert by_method["timematch"].info.status == "FINISHED"
    diverged = by_method["fixmatch"]
    assert diverged.info.status == "FAILED", diverged.info.status
    tags = diverged.data.tags
    assert (tags["diverged_epoch"], tags["diverged_step"]) == ("2", "1") and tags["attempt"] == "2"
    assert "not retried" in tags["error"]  # the retry refused to train into the same NaN
    steps = [m.step for m in MlflowClient(uri).get_metric_history(diverged.info.run_id, "train_loss")]
    assert steps == [1], f"the good epoch logged once: {steps}"
    assert not [r for r in runs(uri, "nan") if r.info.status == "RUNNING"]


# -- tracking server down ----------------------------------------------------------------


def _launch_against(url: str, ray_address: str, data_root: Path, tmp_path: Path, experiment: str, **env: str):
    argv = launch_argv(ray_address, data_root, tmp_path, experiment, "--set", "pretrain.epochs=4",
                       "--set", "methods.timematch.epochs=4")
    argv[argv.index("--tracking-uri") + 1] = url
    return argv, runner_env(TIMEMATCH_CACHE=str(tmp_path / "cache"), **env)


def _until_first_epoch(process: subprocess.Popen, seen: list[str]) -> None:
    for line in process.stdout:
        seen.append(line)
        if line.split("]", 1)[-1].split()[:1] == ["epoch"]:
            return
    raise AssertionError("no epoch reported:\n" + "".join(seen))


def _assert_one_clean_record(url: str, experiment: str) -> None:
    os.environ.update(MLFLOW_TRACKING_USERNAME=RUNNER[0], MLFLOW_TRACKING_PASSWORD=RUNNER[1])
    try:
        client = MlflowClient(url)
        found = client.search_runs([client.get_experiment_by_name(experiment).experiment_id], max_results=100)
        by_stage = {stage: [r for r in found if r.data.tags.get("stage") == stage] for stage in ("pretrain", "adapt")}
        assert len(by_stage["pretrain"]) == 1 and len(by_stage["adapt"]) == 1, by_stage
        for run in by_stage["pretrain"] + by_stage["adapt"]:
            assert run.info.status == "FINISHED", run.data.tags.get("error")
            steps = [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")]
            assert sorted(steps) == list(range(1, 5)), f"{run.data.tags['stage']}: steps {sorted(steps)}"
    finally:
        for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
            os.environ.pop(name, None)


def test_a_tracking_server_down_for_a_while_is_waited_for_and_said(ray_address, data_root, tmp_path):
    services = Services(tmp_path)
    try:
        store = f"sqlite:///{tmp_path / 'server.db'}"
        url = start_mlflow(services, store)
        port = int(url.rsplit(":", 1)[1])
        argv, env = _launch_against(url, ray_address, data_root, tmp_path, "server-down")
        process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        seen: list[str] = []
        _until_first_epoch(process, seen)
        services.kill("mlflow", signal.SIGKILL)  # the server goes away mid-training
        time.sleep(25)
        start_mlflow(services, store, port=port)
        out, _ = process.communicate(timeout=900)
        out = "".join(seen) + out
        assert process.returncode == 0, out[-4000:]
        assert f"the MLflow server {url} does not answer" in out and "retrying in" in out
        assert f"the MLflow server {url} answers again" in out
        _assert_one_clean_record(url, "server-down")
    finally:
        services.stop()


def test_a_tracking_server_gone_past_the_patience_fails_naming_it_and_resume_finishes(
        ray_address, data_root, tmp_path):
    services = Services(tmp_path)
    try:
        store = f"sqlite:///{tmp_path / 'server.db'}"
        url = start_mlflow(services, store)
        port = int(url.rsplit(":", 1)[1])
        argv, env = _launch_against(url, ray_address, data_root, tmp_path, "server-gone",
                                    TIMEMATCH_TRACKING_PATIENCE_S="20")
        process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        seen: list[str] = []
        _until_first_epoch(process, seen)
        services.kill("mlflow", signal.SIGKILL)
        out, _ = process.communicate(timeout=900)
        out = "".join(seen) + out
        assert process.returncode != 0, out[-4000:]
        assert f"the MLflow server {url} has not answered for" in out and "--resume" in out
        assert "Traceback" not in out.split("launch.py: error")[-1]

        start_mlflow(services, store, port=port)
        resume = argv[:argv.index("--profile")] + ["--resume", "--experiment", "server-gone",
                                                   "--results-dir", str(tmp_path / "results")]
        done = subprocess.run(resume, capture_output=True, text=True, env=env, timeout=900)
        assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
        _assert_one_clean_record(url, "server-gone")
    finally:
        services.stop()


# -- full disk -------------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path):
    """A 30 MB tmpfs (mounting needs root: CI runs as root; elsewhere this skips)."""
    mount = tmp_path / "small-disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=30m", "tmpfs", str(mount)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({done.stderr.strip() or 'mount failed'}); CI runs as root")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_generating_the_embedded_data_on_a_full_disk_is_one_line(ray_address, small_disk, tmp_path):
    done = subprocess.run(launch_argv(ray_address, None, tmp_path, "full-disk"), capture_output=True, text=True,
                          env=env_with(small_disk / "cache"), timeout=300)
    line = one_error_line(done)
    assert str(small_disk / "cache" / "synthetic") in line and "not enough disk space" in line
    assert "needs about 201.3 MB" in line
    left = [p for p in (small_disk / "cache").rglob("*") if not p.name.endswith(".lock")]
    assert left == [small_disk / "cache" / "synthetic"], f"a half-written dataset was left: {left}"


def test_packing_a_tile_on_a_full_disk_is_one_line_and_leaves_nothing(ray_address, data_root, small_disk, tmp_path):
    filler = small_disk / "filler"
    with open(filler, "wb") as handle:  # leave about 12 MB: less than a tile's pixels plus the margin
        handle.write(b"\0" * (18 * 1024**2))
    done = subprocess.run(launch_argv(ray_address, data_root, tmp_path, "full-cache"), capture_output=True, text=True,
                          env=env_with(small_disk / "cache"), timeout=300)
    line = one_error_line(done)
    assert str(small_disk / "cache" / "packed") in line and "the packed cache of" in line
    assert not list((small_disk / "cache" / "packed").glob(".*-*")), "a half-written cache was left"
    assert not runs(uri_of(tmp_path), "full-cache")


def test_a_build_killed_mid_way_leaves_nothing_the_next_build_keeps(data_root, tmp_path):
    from timematch.data.packed import PackedTile

    cache = tmp_path / "cache"
    first = PackedTile.open(data_root, "DK", cache)
    stale = first.path.parent / f".{first.path.name}-killed"
    stale.mkdir()
    (stale / "pixels.npy").write_bytes(b"\0" * 1024)  # what a SIGKILLed build leaves
    shutil.rmtree(first.path)
    PackedTile.open(data_root, "DK", cache)
    assert not stale.exists()

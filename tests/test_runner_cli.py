"""Bad input fails within seconds, before any training, with one line and exit code 2 (no Ray)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from timematch.data.tiles import TILES
from timematch.runner.cli import EXIT_OK, EXIT_USAGE, main

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def data_root(tmp_path):
    """A dataset root with the four tiles' metadata files (enough for the start-up checks)."""
    root = tmp_path / "data"
    for tile in TILES.values():
        (root / tile / "meta").mkdir(parents=True)
        (root / tile / "meta" / "metadata.pkl").write_bytes(b"")
    return root


@pytest.fixture
def args(data_root, tmp_path, cache_dir):
    return ["--data-root", str(data_root), "--results-dir", str(tmp_path / "results"),
            "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}"]


def run(argv, capsys, root=REPO):
    code = main(argv, project_root=root)
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err, *fragments):
    assert code == EXIT_USAGE, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens once the socket is closed


@pytest.mark.parametrize("extra, fragments", [
    (["--scenario", "DK-XX"], ["unknown scenario 'DK-XX'", "DK-FR1", "pairs", "SRC:TGT"]),
    (["--scenario", "DK:ES1"], ["unknown tile 'ES1'", "FR1 (france/30TXT/2017)"]),
    (["--method", "timematch,dan"], ["unknown method 'dan'", "dann", "fixmatch", "jumbot", "upper_bound"]),
    (["--profile", "fast"], ["unknown profile 'fast'", "paper, quick, smoke"]),
    (["--objective", "test_macro_f1"], ["unknown objective", "target_val_f1", "source_val_f1", "target_im_score"]),
    (["--folds", "5"], ["--folds '5'", "n_folds=3"]),
    (["--set", "methods.timematch.epoch=2"], ["unknown config key", "epochs"]),
    (["--set", "methods.jumbot.epsilon=0"], ["error: --set methods.jumbot.epsilon=0: ",
                                             "JUMBOTConfig.epsilon=0 is out of range", "allowed: (0.0, 100.0]"]),
    (["--set", "methods.dann.trade_off=-1"], ["error: --set methods.dann.trade_off=-1: ",
                                              "DANNConfig.trade_off=-1 is out of range", "allowed: [0.0, 100.0]"]),
    (["--set", "data.min_parcels=50", "--set", "methods.alda.lr=0"], ["error: --set methods.alda.lr=0: ",
                                                                      "ALDAConfig.lr=0 is out of range"]),
    (["--set", "methods.timematch.lr=abc"], ["error: --set methods.timematch.lr=abc: ", "'abc' is not a number"]),
])
def test_unknown_names_list_the_choices(capsys, args, extra, fragments):
    code, _, err = run(args + extra, capsys)
    assert_one_line_error(code, err, *fragments)
    if "--set" in extra:
        assert ".yaml" not in err, "a bad --set is blamed on --set, not on the profile file"


def test_resume_after_the_embedded_data_moved_is_one_line(capsys, tmp_path, monkeypatch):
    from timematch.runner.cli import launch_parser, plan_launch

    results = tmp_path / "results"
    monkeypatch.delenv("TIMEMATCH_DATA", raising=False)
    monkeypatch.setenv("TIMEMATCH_CACHE", str(tmp_path / "cache-a"))
    plan = plan_launch(launch_parser().parse_args(["--scenario", "DK-FR1", "--method", "timematch",
                                                   "--experiment", "moved"]), REPO)
    assert plan.synthetic_data
    launch = results / "moved" / "launches" / "L1"
    launch.mkdir(parents=True)
    (launch / "launch.json").write_text(json.dumps({"plan": json.loads(plan.to_json()), "tracking_uri": "sqlite:///x.db"}))
    (results / "moved" / "LATEST").write_text("L1\n")
    monkeypatch.setenv("TIMEMATCH_CACHE", str(tmp_path / "cache-b"))
    code, _, err = run(["--resume", "--experiment", "moved", "--results-dir", str(results)], capsys)
    assert_one_line_error(code, err, "--resume: launch of experiment 'moved' ran on the embedded dataset at",
                          str(tmp_path / "cache-a"), "set TIMEMATCH_CACHE back")


@pytest.fixture
def project(tmp_path):
    """A copy of the project's config folders, to break a search space."""
    root = tmp_path / "project"
    shutil.copytree(REPO / "experiments", root / "experiments")
    shutil.copytree(REPO / "search_spaces", root / "search_spaces")
    return root


@pytest.mark.parametrize("text, fragments", [
    ("max_temporal_shift: {type: int, low: 0, high: 60}\n", ["max_temporal_shift", "not a config key", "fixmatch",
                                                             "pseudo_threshold"]),
    ("lr: {type: float, low: 1.0e-3, high: 1.0e-5}\n", ["low=0.001 > high=1e-05"]),
    ("lr: {type: float, low: 0.0, high: 1.0e-3, log: true}\n", ["log scale needs low > 0"]),
])
def test_bad_search_space_fails_at_start_up(capsys, args, project, text, fragments):
    (project / "search_spaces" / "fixmatch.yaml").write_text(text)
    code, _, err = run(args + ["--method", "fixmatch"], capsys, root=project)
    assert_one_line_error(code, err, "fixmatch.yaml", *fragments)


def test_search_space_is_only_needed_when_searching(capsys, args, project):
    (project / "search_spaces" / "fixmatch.yaml").unlink()
    code, _, err = run(args + ["--method", "fixmatch"], capsys, root=project)
    assert code == EXIT_USAGE and "no search space for method 'fixmatch'" in err
    code, out, err = run(args + ["--method", "fixmatch", "--no-search", "--dry-run"], capsys, root=project)
    assert code == EXIT_OK, err


def test_unreachable_ray_address(capsys, args):
    port = closed_port()
    for address in (f"127.0.0.1:{port}", f"ray://127.0.0.1:{port}"):
        code, _, err = run(args + ["--address", address], capsys)
        assert_one_line_error(code, err, f"--address '{address}'", "cannot reach", "Ray head")
    code, _, err = run(args + ["--address", "http://somewhere"], capsys)
    assert_one_line_error(code, err, "'auto'", "ray://HOST:PORT")


def test_unreachable_tracking_server(capsys, args):
    uri = f"http://127.0.0.1:{closed_port()}"
    code, _, err = run(args + ["--tracking-uri", uri], capsys)
    assert_one_line_error(code, err, f"--tracking-uri {uri}", "does not answer", "mlflow/server.sh")
    code, _, err = run(args + ["--tracking-uri", "/tmp/mlruns"], capsys)
    assert_one_line_error(code, err, "sqlite:///")


def test_missing_data(capsys, args, data_root, tmp_path):
    code, _, err = run(args + ["--data-root", str(tmp_path / "nowhere")], capsys)
    assert_one_line_error(code, err, "no such directory; leave --data-root out to use the embedded synthetic")
    shutil.rmtree(data_root / TILES["AT1"])
    code, _, err = run(args + ["--scenario", "DK-AT1"], capsys)
    assert_one_line_error(code, err, "missing tile(s) austria/33UVP/2017", "tiles found: denmark/32VNH/2017")


def test_nothing_to_resume(capsys, args):
    code, _, err = run(args + ["--resume", "--experiment", "never-launched"], capsys)
    assert_one_line_error(code, err, "--resume", "never-launched")


def test_argparse_errors_are_one_line_with_code_2(capsys, args):
    with pytest.raises(SystemExit) as info:
        main(args + ["--trials", "-1"], project_root=REPO)
    assert info.value.code == EXIT_USAGE
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "--trials" in err


def test_report_of_an_unknown_experiment(capsys, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    code, _, err = run(["report", "--experiment", "nope", "--tracking-uri", uri], capsys)
    assert_one_line_error(code, err, "no MLflow store at", "run a launch first")
    from mlflow import MlflowClient

    MlflowClient(uri).create_experiment("other")
    code, _, err = run(["report", "--experiment", "nope", "--tracking-uri", uri], capsys)
    assert_one_line_error(code, err, "--experiment: no MLflow experiment 'nope'", "experiments there: other")


def test_dry_run_prints_the_plan(capsys, args):
    code, out, err = run(args + ["--scenario", "DK-FR1,FR1-FR2", "--method", "timematch", "--profile",
                                          "smoke", "--dry-run"], capsys)
    assert code == EXIT_OK, err
    assert "stage 1, source models: 2" in out and "DK/fold0" in out and "FR1/fold0" in out
    assert "stage 2, adaptation: 4 groups, 6 trials" in out
    assert "DK-FR1/timematch/fold0" in out and "2 trials over pseudo_threshold" in out
    assert "DK-FR1/source_only/fold0" in out and "baseline" in out
    assert "cpus per trial" in out and "tracking sqlite:///" in out
    assert not (Path(args[3]) / "timematch-smoke").exists()  # nothing written


def test_help_lists_every_option():
    result = subprocess.run([sys.executable, str(REPO / "launch.py"), "--help"], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0
    for option in ("--scenario", "--method", "--data-root", "--profile", "--folds", "--trials", "--no-search",
                   "--objective", "--seed", "--gpus-per-trial", "--cpus-per-trial", "--address", "--tracking-uri",
                   "--experiment", "--resume", "--dry-run", "--no-baseline", "report"):
        assert option in result.stdout


def test_bad_input_from_the_real_command_line(data_root, tmp_path):
    """As a user sees it: exit code 2, one line on stderr (how fast: benchmarks/cli_startup.py)."""
    env = {**os.environ, "TIMEMATCH_CACHE": str(tmp_path / "cache")}
    result = subprocess.run(
        [sys.executable, str(REPO / "launch.py"), "--data-root", str(data_root), "--scenario", "DK-FR1",
         "--method", "timematch,nope"], capture_output=True, text=True, env=env, timeout=60,
    )
    assert result.returncode == EXIT_USAGE
    assert result.stderr.strip().count("\n") == 0 and "unknown method 'nope'" in result.stderr


def test_a_failure_cause_in_a_few_words():
    from timematch.runner.progress import short_cause

    ray_text = (
        "Failure # 1 (occurred at 2026-12-04_10-00-00)\nray::ImplicitFunc.train() (pid=123, ip=10.0.0.1)\n"
        "ray.exceptions.ActorDiedError: The actor died unexpectedly before finishing this task.\n"
        "\tclass_name: ImplicitFunc\n\tactor_id: 0123\n\tpid: 123\n"
        "The actor is dead because its worker process has died. Worker exit type: SYSTEM_ERROR Worker exit detail: "
        "Worker unexpectedly exits with a connection error code 2. End of file. There are some potential root "
        "causes. (1) The process is killed by SIGKILL by OOM killer due to high memory usage. (2) ray stop "
        "--force is called. (3) The worker is crashed unexpectedly due to SIGSEGV or other unexpected errors.")
    assert short_cause(ray_text) == "its worker process died (killed, out of memory or crashed)"
    assert short_cause("ray.exceptions.OutOfMemoryError: Task was killed due to the node running low on memory."
                       ) == "its worker was killed for lack of memory (Ray's memory monitor)"
    own = 'Traceback (most recent call last):\n  File "x.py", line 1\nNonFiniteLoss: loss became nan at epoch 2'
    assert short_cause(own) == "NonFiniteLoss: loss became nan at epoch 2"
    assert len(short_cause("ValueError: " + "x" * 2000)) == 500


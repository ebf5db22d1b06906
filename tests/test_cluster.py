"""The cluster path end to end on this machine, with real services only: a PostgreSQL server, the
project's MLflow server (``mlflow/server.sh --auth``: basic auth, artifacts served by the server,
PostgreSQL as its store), and a Ray cluster of a head and two worker nodes started with
``ray start`` (token authentication on, as in k8s/). ``launch.py`` runs from outside, as a user's
laptop or a RayJob's driver would, and logs as the ``runner`` user.

Without PostgreSQL's server binaries the multi-node sweep skips (saying so) and the other tests
use a SQLite store; ``.ci/run`` installs Debian's ``postgresql`` so that CI runs all of them.
"""

from __future__ import annotations

import base64
import collections
import json
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.cluster_harness import (
    ADMIN, REPO, RUNNER, RayCluster, Services, postgres_bin, runner_env, start_mlflow, start_postgres, start_ray,
)

pytestmark = pytest.mark.slow
NO_POSTGRES = ("no PostgreSQL server binaries (initdb, postgres) on this machine: install Debian's postgresql "
               "(apt-get install -y postgresql; .ci/run does) to run the multi-node test against a PostgreSQL store")


@dataclass(frozen=True)
class Deployment:
    services: Services
    tracking_uri: str
    ray: RayCluster
    postgres: bool


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    services = Services(tmp_path_factory.mktemp("cluster"))
    try:
        postgres = postgres_bin() is not None
        if postgres:
            store = start_postgres(services)
            url = start_mlflow(services, store, auth_db=store)
        else:
            url = start_mlflow(services, f"sqlite:///{services.root / 'mlflow.db'}")
        ray = start_ray(services, (1, 1, 1))
        yield Deployment(services, url, ray, postgres)
    finally:
        services.stop()


def launch(deployment: Deployment, args: list[str], tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    environment = runner_env(**deployment.ray.env, TIMEMATCH_CACHE=str(tmp_path / "cache"))
    environment.update(env)
    return subprocess.run(
        [sys.executable, "launch.py", "--address", deployment.ray.address, "--tracking-uri", deployment.tracking_uri,
         "--results-dir", str(tmp_path / "results"), *args],
        cwd=REPO, env=environment, capture_output=True, text=True, timeout=1200,
    )


def smoke(data_root: Path, experiment: str) -> list[str]:
    return ["--profile", "smoke", "--set", "data.min_parcels=20", "--data-root", str(data_root), "--folds", "1",
            "--experiment", experiment, "--scenario", "DK-FR1,FR1-FR2", "--method", "timematch,fixmatch",
            "--trials", "1", "--no-baseline"]


@pytest.fixture
def as_runner(deployment, monkeypatch):
    """This process reads the server as the runner user."""
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", RUNNER[0])
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", RUNNER[1])
    mlflow.set_tracking_uri(deployment.tracking_uri)
    from mlflow import MlflowClient

    return MlflowClient(deployment.tracking_uri)


def one_error_line(done: subprocess.CompletedProcess) -> str:
    assert done.returncode == 2, done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("launch.py: error: "), done.stderr
    assert "Traceback" not in done.stdout + done.stderr
    return lines[0]


def experiment_permission(url: str, experiment_id: str, user: str) -> str:
    """The user's permission on an experiment, asked of the basic-auth app as the admin."""
    token = base64.b64encode(f"{ADMIN[0]}:{ADMIN[1]}".encode()).decode()
    query = urllib.parse.urlencode({"username": user, "resource_type": "experiment", "resource_id": experiment_id})
    request = urllib.request.Request(f"{url}/api/3.0/mlflow/users/permissions/get?{query}",
                                     headers={"Authorization": f"Basic {token}"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.load(response)["permission"]


def test_wrong_credentials_fail_before_anything_runs_naming_server_and_user(deployment, data_root, tmp_path, as_runner):
    done = launch(deployment, smoke(data_root, "denied"), tmp_path, MLFLOW_TRACKING_PASSWORD="not-the-password")
    line = one_error_line(done)
    assert deployment.tracking_uri in line and f"user {RUNNER[0]!r}" in line and "401" in line
    assert as_runner.get_experiment_by_name("denied") is None  # nothing was created
    assert not (tmp_path / "cache" / "source_models").exists()


def test_no_login_on_a_server_that_requires_one_says_so(deployment, data_root, tmp_path):
    done = launch(deployment, smoke(data_root, "anonymous"), tmp_path, MLFLOW_TRACKING_USERNAME="",
                  MLFLOW_TRACKING_PASSWORD="")
    line = one_error_line(done)
    assert deployment.tracking_uri in line and "requires a login" in line and "MLFLOW_TRACKING_USERNAME" in line


def test_a_changed_password_is_refused_at_once_although_logins_are_cached(deployment):
    """server.sh caches a checked login for a minute (a hash per request made a trial's finish take
    a minute); a password changed through the API must still be refused from the next request."""
    from timematch.runner.accounts import ensure_user

    def answer(password: str) -> int:
        token = base64.b64encode(f"analyst:{password}".encode()).decode()
        request = urllib.request.Request(f"{deployment.tracking_uri}/api/2.0/mlflow/experiments/search?max_results=1",
                                         headers={"Authorization": f"Basic {token}"})
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status
        except urllib.error.HTTPError as err:
            return err.code

    import configparser

    ini = configparser.ConfigParser()
    ini.read(deployment.services.root / "mlflow" / "basic_auth.ini")  # what server.sh wrote
    assert ini.getint("mlflow", "auth_cache_ttl_seconds") == 60
    ensure_user(deployment.tracking_uri, "analyst", "first-password-1234", ADMIN)
    assert [answer("first-password-1234") for _ in range(2)] == [200, 200]  # the second from the cache
    assert ensure_user(deployment.tracking_uri, "analyst", "second-password-1234", ADMIN) == "password updated"
    assert answer("first-password-1234") == 401
    assert answer("second-password-1234") == 200


def test_the_heads_wait_for_the_runners_login_ends_either_way(deployment):
    """k8s/'s head waits (init container) until the runner's login is accepted, at most so long,
    then lets the launch say what is wrong."""
    from timematch.runner.accounts import ensure_user, wait_for_login

    uri = deployment.tracking_uri
    assert "no login is given" in wait_for_login(uri, None, 0, 30)
    assert "still refuses user 'latecomer'" in wait_for_login(uri, ("latecomer", "its-password-1234"), 0, 1)
    ensure_user(uri, "latecomer", "its-password-1234", ADMIN)
    assert "accepts user 'latecomer'" in wait_for_login(uri, ("latecomer", "its-password-1234"), 0, 30)


def test_gpu_trials_on_a_cluster_without_gpus_are_an_error_not_pending_trials(deployment, data_root, tmp_path):
    done = launch(deployment, smoke(data_root, "gpu-ask") + ["--gpus-per-trial", "1"], tmp_path)
    line = one_error_line(done)
    assert "--gpus-per-trial 1" in line and "no GPU" in line


def test_sweep_on_three_nodes_logs_every_run_and_model_to_the_server(deployment, data_root, tmp_path, as_runner):
    if not deployment.postgres:
        pytest.skip(NO_POSTGRES)
    import mlflow
    import torch

    started = time.monotonic()
    done = launch(deployment, smoke(data_root, "cluster"), tmp_path)
    wall = time.monotonic() - started
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "3 node(s)" in done.stdout

    experiment = as_runner.get_experiment_by_name("cluster")
    runs = as_runner.search_runs([experiment.experiment_id], max_results=100)
    by_stage = collections.defaultdict(list)
    for run in runs:
        by_stage[run.data.tags["stage"]].append(run)
    assert len(by_stage["launch"]) == 1 and len(by_stage["pretrain"]) == 2 and len(by_stage["adapt"]) == 4
    trials = by_stage["pretrain"] + by_stage["adapt"]
    assert all(run.info.status == "FINISHED" for run in runs)
    for run in trials:
        tags = run.data.tags
        assert tags["ray_node_id"] and tags["ray_node_address"] and tags["host"], tags
        assert {a.path for a in as_runner.list_artifacts(run.info.run_id)}, "no artifact reached the server"
    # The runs were created as the runner: it manages the experiment the launch made.
    assert experiment_permission(deployment.tracking_uri, experiment.experiment_id, RUNNER[0]) == "MANAGE"
    per_node = collections.Counter(run.data.tags["ray_node_id"] for run in trials)
    assert len(per_node) > 1, f"every trial ran on one node: {per_node}"
    print(f"\n3-node sweep: {wall:.0f} s; trials per node: {sorted(per_node.values(), reverse=True)}")

    # a model loads back from the server and predicts
    run = next(r for r in by_stage["adapt"] if r.data.tags["method"] == "timematch")
    model = mlflow.pytorch.load_model(run.data.tags["model_uri"]).eval()
    pixels = torch.rand(2, 52, 32, 10)
    mask = torch.ones(2, 32, dtype=torch.bool)
    positions = torch.arange(0, 52 * 7, 7).repeat(2, 1)
    with torch.no_grad():
        logits, _ = model(pixels, mask, positions)
    classes = mlflow.artifacts.load_dict(f"runs:/{run.info.run_id}/confusion_matrix.json")["classes"]
    assert logits.shape == (2, len(classes)) and torch.isfinite(logits).all()


def test_a_worker_node_lost_mid_sweep_its_trials_finish_on_the_others(deployment, data_root, tmp_path, as_runner):
    """SIGKILL of a worker node (its ``ray start``, raylet and trial processes) while trials run:
    Ray declares the node dead, Tune retries its trials from their checkpoints on the remaining
    nodes, and the sweep completes. Last in this module: the cluster has one node less after it."""
    environment = runner_env(**deployment.ray.env, TIMEMATCH_CACHE=str(tmp_path / "cache"))
    argv = [sys.executable, "launch.py", "--address", deployment.ray.address, "--tracking-uri",
            deployment.tracking_uri, "--results-dir", str(tmp_path / "results"),
            *smoke(data_root, "node-lost"), "--set", "methods.timematch.epochs=6", "--set",
            "methods.fixmatch.epochs=6"]
    process = subprocess.Popen(argv, cwd=REPO, env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
    seen: list[str] = []
    killed = False
    try:
        for line in process.stdout:
            seen.append(line)
            words = line.split("]", 1)[-1].split()
            if not killed and words[:1] == ["epoch"] and "fold0" in line and "pretrain" not in line:
                deployment.services.kill("ray-worker-2")  # adaptation trials are running: a node goes
                killed = True
        process.wait(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    out = "".join(seen)
    assert killed and process.returncode == 0, out[-4000:]
    experiment = as_runner.get_experiment_by_name("node-lost")
    adapt = [r for r in as_runner.search_runs([experiment.experiment_id], max_results=100)
             if r.data.tags.get("stage") == "adapt"]
    assert len(adapt) == 4 and all(r.info.status == "FINISHED" for r in adapt), [r.info.status for r in adapt]
    print(f"\nnode lost: {sum('retry' in line for line in seen)} trial retries; "
          f"attempts {sorted(r.data.tags['attempt'] for r in adapt)}")

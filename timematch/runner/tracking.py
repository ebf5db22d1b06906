"""MLflow: where runs go and what each run holds (the schema of ``shared/design.md``).

- one experiment per launch name; one parent run per launch (``stage=launch``);
- one child run per trial (``stage=adapt``) and per source-model training
  (``stage=pretrain``), tagged ``stage, scenario, source, target, method, fold, objective``
  (+ ``selection_uses_target_labels``, ``launch_id``, ``group``, ``trial_key``);
- run names ``<scenario> <method> f<fold> <trial>`` (``pretrain <tile> f<fold>``): the
  start of a truncated column still tells runs apart;
- params: the full resolved method config; metrics per epoch (step = epoch), then the
  final selection metrics (``final_<name>``), the target test metrics and timings once, at
  :data:`FINAL_STEP` for every method (MLflow's chart view shows them as bars per run);
  pretraining runs log source metrics only; the launch run logs the report's numbers;
- a trial stopped by ASHA is FINISHED, tagged ``stopped_early=asha`` and ``epochs_run``;
- artifacts: the model (``mlflow.pytorch.load_model``) and a self-contained parcel
  classifier (``mlflow.pyfunc``), confusion-matrix and shift-score plots, the per-class
  report (JSON and CSV); the data as a dataset input; system metrics.

Runs are addressed by explicit ids through :class:`mlflow.MlflowClient` (trial processes
never depend on a global active run), and found again by tag, so a retried or resumed
trial continues its own run instead of starting a second one.
"""

from __future__ import annotations

import json
import re
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlparse

from timematch.errors import ConfigError, NonFiniteLoss, TimeMatchError
from timematch.methods import get_method

CHECK_TIMEOUT_S = 3.0
#: The step of every metric logged once per run (final, selection, test, timings, a launch's
#: report): one x for every method, whatever its number of epochs.
FINAL_STEP = 0
#: Requirements written with logged models: writing them skips MLflow's slow inference.
PIP_REQUIREMENTS = ["torch", "numpy", "timematch"]
TERMINAL = ("FINISHED", "FAILED", "KILLED")
T = TypeVar("T")


def default_tracking_uri(project_root: Path) -> str:
    """``$MLFLOW_TRACKING_URI``, else SQLite under ``<project>/mlflow/``."""
    import os

    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    return f"sqlite:///{(Path(project_root) / 'mlflow' / 'mlflow.db').resolve()}"


#: How a client authenticates to an MLflow server (MLflow's own variables, read by every
#: MLflow client): basic auth (the server's ``basic-auth`` app) or a bearer token.
CREDENTIAL_VARIABLES = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")


def credentials() -> dict[str, str]:
    """The MLflow credentials of this process's environment (to hand to the trials)."""
    import os

    return {name: os.environ[name] for name in CREDENTIAL_VARIABLES if os.environ.get(name)}


def _authorization(found: Mapping[str, str]) -> dict[str, str]:
    import base64

    if "MLFLOW_TRACKING_TOKEN" in found:
        return {"Authorization": f"Bearer {found['MLFLOW_TRACKING_TOKEN']}"}
    if "MLFLOW_TRACKING_USERNAME" in found:
        pair = f"{found['MLFLOW_TRACKING_USERNAME']}:{found.get('MLFLOW_TRACKING_PASSWORD', '')}"
        return {"Authorization": "Basic " + base64.b64encode(pair.encode()).decode()}
    return {}


def check_tracking(uri: str) -> None:
    """Fail fast on a tracking server that does not answer or refuses this user, or a SQLite
    path that cannot exist (before anything is trained)."""
    scheme = urlparse(uri).scheme
    if scheme in ("http", "https"):
        _check_server(uri)
    elif scheme == "sqlite":
        path = sqlite_path(uri)
        if path is not None:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as err:
                raise ConfigError(f"--tracking-uri {uri}: cannot create {path.parent} ({err})") from None
    elif scheme in ("", "file"):
        raise ConfigError(
            f"--tracking-uri {uri}: MLflow 3 no longer writes plain file stores; use "
            "sqlite:////abs/path/mlflow.db or an http(s):// tracking server"
        )
    elif not scheme.startswith(("postgresql", "mysql", "mssql", "databricks")):
        raise ConfigError(
            f"--tracking-uri {uri}: unknown scheme {scheme!r}; use sqlite:////abs/path/mlflow.db, an http(s):// "
            "tracking server or a database URI (postgresql://...)"
        )


def _check_server(uri: str) -> None:
    base = uri.rstrip("/")
    try:
        with urllib.request.urlopen(base + "/health", timeout=CHECK_TIMEOUT_S) as response:
            if response.status != 200:
                raise ConfigError(f"--tracking-uri {uri}: {base}/health answered HTTP {response.status}")
    except urllib.error.HTTPError as err:
        raise ConfigError(f"--tracking-uri {uri}: {base}/health answered HTTP {err.code}") from None
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise ConfigError(
            f"--tracking-uri {uri}: the MLflow server does not answer ({reason}); start it "
            "(bash mlflow/server.sh) or leave --tracking-uri out to use the local SQLite store"
        ) from None
    # /health answers everyone; an API call shows whether this user may use the server.
    found = credentials()
    request = urllib.request.Request(base + "/api/2.0/mlflow/experiments/search?max_results=1",
                                     headers=_authorization(found))
    user = found.get("MLFLOW_TRACKING_USERNAME")
    try:
        with urllib.request.urlopen(request, timeout=CHECK_TIMEOUT_S):
            return
    except urllib.error.HTTPError as err:
        if err.code == 401:
            if user or "MLFLOW_TRACKING_TOKEN" in found:
                who = f"user {user!r}" if user else "the token in MLFLOW_TRACKING_TOKEN"
                raise ConfigError(
                    f"--tracking-uri {uri}: the MLflow server rejected {who} (HTTP 401: wrong user name or "
                    "password); check MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"
                ) from None
            raise ConfigError(
                f"--tracking-uri {uri}: the MLflow server requires a login (HTTP 401); set "
                "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"
            ) from None
        if err.code == 403:
            raise ConfigError(
                f"--tracking-uri {uri}: the MLflow server denies user {user!r} access (HTTP 403); ask its "
                "admin for permission"
            ) from None
        raise ConfigError(f"--tracking-uri {uri}: {base} answered HTTP {err.code} to an API call") from None
    except (urllib.error.URLError, OSError) as err:
        raise ConfigError(f"--tracking-uri {uri}: the MLflow API does not answer ({getattr(err, 'reason', err)})") from None


def sqlite_path(uri: str) -> Path | None:
    if not uri.startswith("sqlite:///"):
        return None
    rest = uri[len("sqlite:///"):]  # "/abs/path.db" for sqlite:////abs/path.db, else relative
    return None if rest in ("", ":memory:") else Path(rest)


def artifact_location(uri: str, experiment: str) -> str | None:
    """Artifacts of a SQLite store live beside it (``<dir>/artifacts/<experiment>``); a server decides its own."""
    path = sqlite_path(uri)
    if path is None:
        return None
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", experiment)
    return (path.parent.resolve() / "artifacts" / safe).as_uri()


def client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


#: How long a trial or the driver waits for a tracking server that does not answer before it
#: gives up naming it ($TIMEMATCH_TRACKING_PATIENCE_S); the trial then fails (Tune retries it)
#: and ``--resume`` finishes the sweep once the server is back.
PATIENCE_S = 600.0
PATIENCE_VARIABLE = "TIMEMATCH_TRACKING_PATIENCE_S"
#: MLflow's own HTTP retries, made short in trial processes so that :func:`retry` decides (and
#: says) how long to wait; MLflow's default retries silently for minutes.
CLIENT_HTTP_SETTINGS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "20",
                        "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}


#: The file a trial appends its tracking messages to (the driver shows them: worker output is
#: not forwarded without --verbose); unset in the driver, which prints them itself.
EVENTS_VARIABLE = "TIMEMATCH_EVENTS_FILE"


def say(message: str) -> None:
    """Show ``message`` on the launch's terminal, from the driver or from a trial."""
    import os
    import socket
    import sys

    events = os.environ.get(EVENTS_VARIABLE)
    if not events:
        print(message, file=sys.stderr, flush=True)
        return
    line = f"{message} (on {socket.gethostname()}, pid {os.getpid()})\n"
    try:
        with open(events, "a") as handle:  # one short append: whole lines, whatever the writers
            handle.write(line)
    except OSError:
        print(message, file=sys.stderr, flush=True)


class EventTail:
    """The driver's side of :func:`say`: a thread printing the lines trials append to ``path``."""

    def __init__(self, path: Path, show: Callable[[str], None], every_s: float = 1.0) -> None:
        import threading

        self.path, self.show, self.every_s = Path(path), show, every_s
        self.offset = self.path.stat().st_size if self.path.is_file() else 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="timematch-events", daemon=True)

    def __enter__(self) -> "EventTail":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._read()

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            self._read()

    def _read(self) -> None:
        if not self.path.is_file():
            return
        with open(self.path) as handle:
            handle.seek(self.offset)
            text = handle.read()
        complete = text[: text.rfind("\n") + 1]
        self.offset += len(complete.encode())
        for line in complete.splitlines():
            self.show(f"[trial] {line}")


class TrackingUnavailable(TimeMatchError):
    """The tracking server did not answer within the patience."""


def _server_down(err: BaseException) -> bool:
    """Whether ``err`` says the tracking server did not answer (not that it refused a request)."""
    text = f"{type(err).__name__}: {err}".lower()
    return any(word in text for word in ("connection refused", "max retries exceeded", "connectionerror",
                                         "failed to establish a new connection", "read timed out",
                                         "remote end closed connection", "connection reset", "bad gateway",
                                         "service unavailable")) or bool(
        re.search(r"(error code|status code|status|http) 50[234]\b", text))


def patience() -> float:
    """``$TIMEMATCH_TRACKING_PATIENCE_S``, else :data:`PATIENCE_S`."""
    import os

    try:
        return float(os.environ.get(PATIENCE_VARIABLE, PATIENCE_S))
    except ValueError:
        return PATIENCE_S


def retry(call: Callable[[], T], attempts: int = 6, what: str = "") -> T:
    """Run a tracking call; retry one that lost a race for the SQLite write lock (trials log
    concurrently), and one that found the tracking server down: back-off 2, 4, ... 30 s, each
    wait said on the terminal, for up to ``$TIMEMATCH_TRACKING_PATIENCE_S`` (600 s), then
    :class:`TrackingUnavailable` naming the server."""
    import os

    delay = 0.2
    for attempt in range(attempts):
        try:
            return call()
        except Exception as err:  # noqa: BLE001 - only lock and connection errors are retried
            if _server_down(err):
                return _wait_for_server(call, err, what)
            if "locked" not in str(err).lower() or attempt == attempts - 1:
                raise
            time.sleep(delay)
            delay *= 2
    raise AssertionError("unreachable")


def _wait_for_server(call: Callable[[], T], first: BaseException, what: str) -> T:
    import os

    server = os.environ.get("MLFLOW_TRACKING_URI") or "the tracking server"
    patience_s = patience()
    started = time.monotonic()
    delay, err = 2.0, first
    while True:
        waited = time.monotonic() - started
        if waited + delay > patience_s:
            raise TrackingUnavailable(
                f"the MLflow server {server} has not answered for {waited:.0f} s "
                f"({type(err).__name__}); giving up{f' on {what}' if what else ''}. Start it again and "
                "continue with: python launch.py --resume"
            ) from None
        say(f"[tracking] the MLflow server {server} does not answer ({_short(err)}); retrying in {delay:.0f} s "
            f"(waited {waited:.0f} s of {patience_s:.0f} s)")
        time.sleep(delay)
        try:
            result = call()
        except Exception as again:  # noqa: BLE001
            if not _server_down(again):
                raise
            err = again
            delay = min(delay * 2, 30.0)
            continue
        say(f"[tracking] the MLflow server {server} answers again after {time.monotonic() - started:.0f} s")
        return result


def _short(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return (text[-1] if text else type(err).__name__)[:160]


#: MLflow 3's UI opens an experiment without this tag in its GenAI view (traces, prompts);
#: with it, in the model-training view (runs, charts). MLflow 3.17's new sidebar has a global
#: switch instead (GenAI by default): :func:`ui_address` adds ``?workflowType=machine_learning``.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}


def ensure_experiment(uri: str, name: str) -> str:
    """The id of experiment ``name``, created (with its artifact location) when missing, and
    tagged as a model-training experiment.

    On SQLite the first call of a launch creates (or migrates) the store's schema: two launches
    starting at once on a new file would race through MLflow's migrations, so they take turns.
    """
    path = sqlite_path(uri)
    if path is None:
        return _ensure_experiment(uri, name)
    from timematch.locks import cache_lock

    with cache_lock(path):
        return _ensure_experiment(uri, name)


def _ensure_experiment(uri: str, name: str) -> str:
    mlflow_client = client(uri)
    experiment = mlflow_client.get_experiment_by_name(name)
    if experiment is not None:
        if experiment.lifecycle_stage == "deleted":
            mlflow_client.restore_experiment(experiment.experiment_id)
        for key, value in EXPERIMENT_KIND.items():
            if experiment.tags.get(key) != value:
                mlflow_client.set_experiment_tag(experiment.experiment_id, key, value)
        return experiment.experiment_id
    return mlflow_client.create_experiment(name, artifact_location=artifact_location(uri, name), tags=EXPERIMENT_KIND)


def pretrain_run_key(key: str) -> dict[str, str]:
    """The tags that find the pretraining run of source model ``key``: adaptation runs carry
    ``pretrain_key`` too (the model they start from), so the stage is part of the key."""
    return {"stage": "pretrain", "pretrain_key": key}


def adapt_run_key(launch_id: str, trial_id: str) -> dict[str, str]:
    """The tags that find the run of one adaptation trial of a launch."""
    return {"stage": "adapt", "trial_key": f"{launch_id}/{trial_id}"}


def logged_steps(mlflow_client, run_id: str, key: str) -> set[int]:
    """The steps at which metric ``key`` is already in the run's history."""
    return {m.step for m in retry(lambda: mlflow_client.get_metric_history(run_id, key))}


def find_source_run(mlflow_client, key: str) -> Any:
    """The finished pretraining run of source model ``key``, in any experiment (a later
    launch of another name reuses the cached model), or None."""
    from mlflow.entities import ViewType

    experiments = retry(lambda: mlflow_client.search_experiments(view_type=ViewType.ALL, max_results=1000))
    clauses = " and ".join(f"tags.{k} = '{_quote(v)}'" for k, v in pretrain_run_key(key).items())
    runs = retry(lambda: mlflow_client.search_runs(
        [e.experiment_id for e in experiments], filter_string=f"{clauses} and attributes.status = 'FINISHED'",
        max_results=1, order_by=["attributes.start_time DESC"]))
    return runs[0] if runs else None


def find_run(mlflow_client, experiment_id: str, tags: Mapping[str, str], statuses: tuple[str, ...] = ()) -> Any:
    """The most recent run of the experiment carrying every tag of ``tags`` (and one of ``statuses``)."""
    clauses = [f"tags.{key} = '{_quote(value)}'" for key, value in tags.items()]
    runs = retry(lambda: mlflow_client.search_runs(
        [experiment_id], filter_string=" and ".join(clauses), max_results=100,
        order_by=["attributes.start_time DESC"],
    ))
    # (the search grammar compares status with one value only, so several are filtered here)
    return next((run for run in runs if not statuses or run.info.status in statuses), None)


def trial_run_name(scenario: str, method: str, fold: int | None, number: int | str | None,
                   seed: int | None = None) -> str:
    """``DK-FR1 TM f1#2``: scenario, the method's short name, then only what varies within the
    launch: the fold (``None`` with one fold), the seed (``None`` without ``--seeds``) and the
    trial's number in its group (``#0`` is the defaults; ``None`` with one trial per group).
    So a name fits the UI's name column (about 15 characters in a launch's nested rows) and
    its visible part tells the launch's runs apart; the full method name, fold, seed and Ray's
    trial id are the run's tags."""
    trial = "" if number is None else (f"#{number}" if isinstance(number, int) else f" {number}")
    return f"{scenario} {get_method(method).short_name}{_suffix(fold, seed, trial)}"


def pretrain_run_name(tile: str, fold: int | None, seed: int | None = None) -> str:
    """``pretrain DK``, with the fold and seed where the launch has several (``pretrain DK f1s0``)."""
    return f"pretrain {tile}{_suffix(fold, seed)}"


def _suffix(fold: int | None, seed: int | None, trial: str = "") -> str:
    text = ("" if fold is None else f"f{fold}") + ("" if seed is None else f"s{seed}") + trial
    return f" {text.strip()}" if text else ""


def ui_address(uri: str, experiment_id: str, run_id: str | None = None) -> str:
    """Where a researcher sees the experiment (or one run) in MLflow's UI: the server's own
    page, or, for a SQLite store, the page ``make ui STORE=...`` serves."""
    # MLflow 3.17's UI keeps a global GenAI / model-training switch (GenAI by default): the
    # query opens the model-training view (runs, charts) whatever a browser last chose.
    page = f"#/experiments/{experiment_id}" + (f"/runs/{run_id}" if run_id else "") + "?workflowType=machine_learning"
    if urlparse(uri).scheme in ("http", "https"):
        return f"{uri.rstrip('/')}/{page}"
    path = sqlite_path(uri)
    return f"http://127.0.0.1:5000/{page} (start the UI with: make ui STORE={path or uri})"


def log_dataset(mlflow_client, run_id: str, name: str, digest: str, source: Mapping[str, Any],
                profile: Mapping[str, Any], context: str) -> None:
    """Record the data a run used as an MLflow dataset input: which tile and split, its sizes
    and the cache's fingerprint (``digest``), not the pixels."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    dataset = Dataset(name=name, digest=digest[:36], source_type="timematch",
                      source=json.dumps(dict(source), default=str), profile=json.dumps(dict(profile), default=str))
    retry(lambda: mlflow_client.log_inputs(
        run_id, datasets=[DatasetInput(dataset, [InputTag("mlflow.data.context", context)])]))


class SystemMetrics:
    """MLflow's system metrics (CPU, memory, and GPU utilisation and memory where NVML sees a
    GPU) of this process's machine, sampled into a run while the ``with`` block runs."""

    def __init__(self, uri: str, run_id: str, every_s: float = 5.0) -> None:
        self.uri, self.run_id, self.every_s = uri, run_id, every_s
        self.monitor = None

    def __enter__(self) -> "SystemMetrics":
        import logging

        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)
        self.monitor = SystemMetricsMonitor(self.run_id, sampling_interval=self.every_s, resume_logging=True,
                                            tracking_uri=self.uri)
        self.monitor.start()
        return self

    def __exit__(self, *exc) -> None:
        monitor = self.monitor
        if monitor is None:
            return
        monitor.finish()
        try:  # the samples since the last publication (all of them in a run shorter than every_s)
            tail = monitor.aggregate_metrics()
            if tail:
                monitor.publish_metrics(tail)
                monitor.mlflow_logger.flush()
        except Exception as err:  # noqa: BLE001 - system metrics never fail a trial
            say(f"[tracking] system metrics of run {self.run_id} not logged: {_short(err)}")


def register_best(mlflow_client, name: str, model_uri: str, run_id: str, tags: Mapping[str, str],
                  alias: str = "best") -> int:
    """Register ``model_uri`` as a new version of ``name`` and point ``alias`` at it; returns the version."""
    from mlflow.exceptions import MlflowException

    try:
        retry(lambda: mlflow_client.create_registered_model(name, description=tags.get("description")))
    except MlflowException as err:
        if "already exists" not in str(err).lower() and "RESOURCE_ALREADY_EXISTS" not in str(err):
            raise
    source, model_id = model_uri, None
    if model_uri.startswith("models:/m-"):  # a logged model: resolved here, not through MLflow's global URI
        logged = retry(lambda: mlflow_client.get_logged_model(model_uri.removeprefix("models:/")))
        source, model_id = logged.artifact_location, logged.model_id
    version = retry(lambda: mlflow_client.create_model_version(name, source, run_id=run_id, tags=dict(tags),
                                                               model_id=model_id))
    retry(lambda: mlflow_client.set_registered_model_alias(name, alias, version.version))
    return int(version.version)


def _quote(value: str) -> str:
    return str(value).replace("'", "\\'")


def run_tags(stage: str, scenario: str, source: str, target: str, method: str, fold: int, objective: str,
             uses_target_labels: bool, **extra: Any) -> dict[str, str]:
    tags = {
        "stage": stage, "scenario": scenario, "source": source, "target": target, "method": method,
        "fold": str(fold), "objective": objective,
        "selection_uses_target_labels": "true" if uses_target_labels else "false",
    }
    tags.update({key: str(value) for key, value in extra.items() if value is not None})
    return tags


def open_run(mlflow_client, experiment_id: str, key_tags: Mapping[str, str], tags: Mapping[str, str],
             params: Mapping[str, Any], run_name: str, parent_run_id: str | None,
             reuse_finished: bool = True, refresh: Mapping[str, str] | None = None) -> tuple[str, bool]:
    """Continue the run identified by ``key_tags`` (a retried or resumed trial), else create it.

    Returns ``(run_id, finished)``: ``finished`` when that run already completed (with
    ``reuse_finished=False`` a completed run is left alone and a new one created). A continued
    run gets the tags of ``refresh`` anew (where this attempt runs: another node, maybe).
    """
    from mlflow.entities import Param, RunTag

    statuses = () if reuse_finished else ("RUNNING", "SCHEDULED", "FAILED", "KILLED")
    existing = find_run(mlflow_client, experiment_id, key_tags, statuses)
    if existing is not None:
        run_id = existing.info.run_id
        if existing.info.status == "FINISHED":
            return run_id, True
        retry(lambda: mlflow_client.update_run(run_id, status="RUNNING"))
        if "error" in existing.data.tags and "diverged_epoch" not in existing.data.tags:
            retry(lambda: mlflow_client.delete_tag(run_id, "error"))  # a divergence's stays: it is refused
        if "interrupted" in existing.data.tags:  # continued now
            retry(lambda: mlflow_client.delete_tag(run_id, "interrupted"))
        attempt = int(existing.data.tags.get("attempt", "1")) + 1
        fresh = [RunTag(k, str(v)) for k, v in {**(refresh or {}), "attempt": attempt}.items()]
        retry(lambda: mlflow_client.log_batch(run_id, tags=fresh))
        return run_id, False
    all_tags = {**tags, **(refresh or {}), **key_tags, "attempt": "1"}
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    run = retry(lambda: mlflow_client.create_run(experiment_id, tags=all_tags, run_name=run_name))
    run_id = run.info.run_id
    retry(lambda: mlflow_client.log_batch(run_id, params=[Param(k, _param(v)) for k, v in params.items()]))
    return run_id, False


def _param(value: Any) -> str:
    return json.dumps(value) if isinstance(value, (list, dict)) else str(value)


def log_metrics(mlflow_client, run_id: str, metrics: Mapping[str, float], step: int) -> None:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    batch = [Metric(key, float(value), now, step) for key, value in metrics.items() if _is_number(value)]
    if batch:
        retry(lambda: mlflow_client.log_batch(run_id, metrics=batch))


#: How a run's training steps ran (:func:`timematch.training.fit`'s ``step_path``) -> its tags.
STEP_PATH_TAGS = {"path": "step_path", "reason": "step_path_reason", "precision": "precision", "placement": "tiles"}


def tag_step_path(mlflow_client, run_id: str, step_path: Mapping[str, str]) -> None:
    """Tag a run with how its steps ran: ``step_path`` (``cuda_graph`` or ``eager``) and the
    reason (why a GPU run fell back to eager, say), ``precision``, ``tiles`` (where they were)."""
    for key, tag in STEP_PATH_TAGS.items():
        if step_path.get(key):
            retry(lambda t=tag, v=str(step_path[key]): mlflow_client.set_tag(run_id, t, v[:5000]))


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def mark_failed(mlflow_client, run_id: str, err: BaseException | str, traceback_text: str | None = None) -> None:
    """Tag a run with its error (first 5000 characters) and end it as FAILED.

    A non-finite loss also tags where it happened (``diverged_epoch``, ``diverged_step``):
    a retry of the trial then ends at once (:func:`refuse_if_diverged`) instead of training
    into the same divergence again.
    """
    error = err if isinstance(err, str) else f"{type(err).__name__}: {err}"
    retry(lambda: mlflow_client.set_tag(run_id, "error", error[:5000]))
    if isinstance(err, NonFiniteLoss):
        for key, value in (("diverged_epoch", err.epoch), ("diverged_step", err.step)):
            retry(lambda k=key, v=value: mlflow_client.set_tag(run_id, k, str(v)))
    if traceback_text:
        retry(lambda: mlflow_client.log_text(run_id, traceback_text, "error.txt"))
    retry(lambda: mlflow_client.set_terminated(run_id, status="FAILED"))


def mark_interrupted(mlflow_client, experiment_id: str, launch_id: str, parent_run_id: str) -> None:
    """End the launch run and its RUNNING trial runs as KILLED, tagged ``interrupted=true``
    (Ctrl-C): ``--resume`` continues each of them in the same run."""
    found = retry(lambda: mlflow_client.search_runs(
        [experiment_id], f"tags.launch_id = '{_quote(launch_id)}' and attributes.status = 'RUNNING'",
        max_results=1000))
    for run_id in {parent_run_id, *(run.info.run_id for run in found)}:
        retry(lambda r=run_id: mlflow_client.set_tag(r, "interrupted", "true"))
        retry(lambda r=run_id: mlflow_client.set_terminated(r, status="KILLED"))


def refuse_if_diverged(mlflow_client, run_id: str) -> None:
    """Raise the recorded :class:`NonFiniteLoss` again when an earlier attempt of this run diverged."""
    tags = retry(lambda: mlflow_client.get_run(run_id)).data.tags
    if "diverged_epoch" in tags:
        epoch, step = int(tags["diverged_epoch"]), int(tags.get("diverged_step", 0))
        error, note = tags.get("error", "").removeprefix("NonFiniteLoss: "), " (not retried: it would diverge again)"
        raise NonFiniteLoss(error if error.endswith(note) else error + note, epoch, step, "")


def finish_with_models(uri: str, run_id: str, predictor, input_example: Mapping[str, Any]) -> dict[str, str]:
    """Log the run's models as its last artifacts and end it FINISHED; returns their URIs.

    ``parcel_classifier`` (:mod:`timematch.runner.serving`): a pyfunc model that predicts
    class names and probabilities from raw parcels with nothing else on disk (its weights,
    classes, band statistics and positional settings travel with it, nothing is unpickled);
    ``pytorch_module``: the module itself (``mlflow.pytorch.load_model``). Explicit pip
    requirements, since inferring them costs seconds per model.
    """
    from timematch.runner.serving import log_parcel_model

    return retry(lambda: log_parcel_model(uri, run_id, predictor, dict(input_example),
                                          pip_requirements=PIP_REQUIREMENTS), what="logging the model")

"""MLflow, connection and credentials: which store a launch uses, that it answers and admits
this user, the experiment, and the process settings of an MLflow client.

The rest of what the runner does with MLflow has one module per concern:
:mod:`.waiting` (a server that does not answer: retry, back off, say so), :mod:`.run_names`
(run names, tags and the keys that find a run again) and :mod:`.runs` (a run's life: open,
log, finish, stopped early, failed, killed, continued; the only code that sets a status).
"""

from __future__ import annotations

import base64
import os
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlparse

from timematch.errors import ConfigError
from timematch.locks import cache_lock
from timematch.runner.launch_state import safe_name
from timematch.runner.waiting import EVENTS_VARIABLE, PATIENCE_VARIABLE


CHECK_TIMEOUT_S = 3.0


def default_tracking_uri(project_root: Path) -> str:
    """``$MLFLOW_TRACKING_URI``, else SQLite under ``<project>/mlflow/``."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    return f"sqlite:///{(Path(project_root) / 'mlflow' / 'mlflow.db').resolve()}"


#: How a client authenticates to an MLflow server (MLflow's own variables, read by every
#: MLflow client): basic auth (the server's ``basic-auth`` app) or a bearer token.
CREDENTIAL_VARIABLES = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")


def credentials() -> dict[str, str]:
    """The MLflow credentials of this process's environment (to hand to the trials)."""
    return {name: os.environ[name] for name in CREDENTIAL_VARIABLES if os.environ.get(name)}


def _authorization(found: Mapping[str, str]) -> dict[str, str]:
    if "MLFLOW_TRACKING_TOKEN" in found:
        return {"Authorization": f"Bearer {found['MLFLOW_TRACKING_TOKEN']}"}
    if "MLFLOW_TRACKING_USERNAME" in found:
        pair = f"{found['MLFLOW_TRACKING_USERNAME']}:{found.get('MLFLOW_TRACKING_PASSWORD', '')}"
        return {"Authorization": "Basic " + base64.b64encode(pair.encode()).decode()}
    return {}


#: The API call that shows whether a login may use a server (/health answers everyone); also
#: what the Ray head's init container waits on (accounts.wait_for_login).
LOGIN_CHECK_PATH = "/api/2.0/mlflow/experiments/search?max_results=1"


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
    request = urllib.request.Request(base + LOGIN_CHECK_PATH, headers=_authorization(found))
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
                "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (on Kubernetes: the Secret "
                "timematch-mlflow-runner, made by k8s/create-secrets.sh)"
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
    return (path.parent.resolve() / "artifacts" / safe_name(experiment)).as_uri()


def client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


@contextmanager
def using_uri(uri: str) -> Iterator[None]:
    """MLflow's global tracking URI is ``uri`` inside the block and what it was before after
    it, for MLflow calls that write through MLflow's default client (``Model.log``,
    ``mlflow.register_model``). In a trial it is ``uri`` already (:func:`configure_client`):
    nothing global changes."""
    import mlflow

    previous = mlflow.get_tracking_uri()
    if previous == uri:
        yield
        return
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous)


#: MLflow's own HTTP retries, made short in trial processes so that :func:`retry` decides (and
#: says) how long to wait; MLflow's default retries silently for minutes.
CLIENT_HTTP_SETTINGS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "20",
                        "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}


def configure_client(uri: str, credentials: Mapping[str, str] | None = None, events_path: str = "",
                     patience_s: float | None = None) -> None:
    """Make this process (the driver, or a trial's worker) a tracking client of ``uri``: the
    URI named in the messages of a server that stops answering, MLflow's own silent HTTP
    retries made short (:data:`CLIENT_HTTP_SETTINGS`, so :func:`retry` decides and says how
    long to wait), and in a trial the driver's credentials, events file and patience."""
    os.environ.update(credentials or {})
    os.environ["MLFLOW_TRACKING_URI"] = uri
    if events_path:
        os.environ[EVENTS_VARIABLE] = events_path
    if patience_s is not None:
        os.environ[PATIENCE_VARIABLE] = str(patience_s)
    for name, value in CLIENT_HTTP_SETTINGS.items():
        os.environ.setdefault(name, value)


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

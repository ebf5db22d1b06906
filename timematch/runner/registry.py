"""The Model Registry: the model of each (scenario, method)'s selected trial, registered after
the report (:func:`register_best_models`), under a name MLflow's UI shows as it is
(:func:`registered_name`) and an alias that says what it is: ``best`` for an adaptation
method's winner, ``reference`` for a reference method's (source-only, the upper bound), which
is never a winner.
"""

from __future__ import annotations

import contextlib
import io
import re
from collections.abc import Mapping

from timematch.report import is_reference
from timematch.runner import tracking, waiting
from timematch.runner.launch_state import safe_name
from timematch.runner.reporting import Report, cell_winners

#: A registered model name of three dotted parts (``a.b.c``) is, to MLflow's UI, a Unity Catalog
#: model: it links the version to a page the open-source server does not have and lists it twice
#: on its run's page (once from the registry, once from the logged model). MLflow 3.17.
UNITY_CATALOG_SHAPE = re.compile(r"[^. /]+\.[^. /]+\.[^. /]+")

#: The Model Registry's alias of the model of a selected trial: ``best`` for an adaptation
#: method, ``reference`` for a reference method (source-only, the upper bound), never ``best``.
BEST_ALIAS, REFERENCE_ALIAS = "best", "reference"


def registered_name(experiment: str, scenario: str, method: str) -> str:
    """The Model Registry name of a (scenario, method) of ``experiment``:
    ``<experiment>-<scenario>-<method>`` (``timematch-quick-DK-FR1-timematch``), never of the
    shape MLflow's UI takes for a Unity Catalog name (:data:`UNITY_CATALOG_SHAPE`)."""
    name = safe_name(f"{experiment}-{scenario}-{method}")
    return name.replace(".", "_") if UNITY_CATALOG_SHAPE.fullmatch(name) else name


def register_best_models(uri: str, experiment: str, report: Report, objective: str, launch_id: str) -> list[str]:
    """Register, per (scenario, method), the model of the best trial by ``objective``
    (:func:`~timematch.runner.reporting.cell_winners`) in the Model Registry as
    :func:`registered_name`, with the alias ``best`` pointing at it, or ``reference`` for a
    reference method (source-only, the upper bound: a row to compare with, never a winner; its
    version is tagged ``reference=true``).

    ``objective`` is the launch's selection rule (never the test split). Returns what it
    registered, as ``<name>@<alias>`` (the model's URI less ``models:/``).
    """
    registered = []
    for (scenario, method), row in sorted(cell_winners(report.rows, objective, with_model=True).items()):
        name = registered_name(experiment, scenario, method)
        reference = is_reference(method)
        role = "the reference row's trial" if reference else "the best trial"
        tags = {"objective": objective, objective: f"{row.metrics[objective]:.4f}", "fold": str(row.fold),
                "launch_id": launch_id, "trial_key": row.trial, "reference": "true" if reference else "false",
                "description": f"{method} for {scenario}; {role} of launch {launch_id} by {objective}"}
        alias = REFERENCE_ALIAS if reference else BEST_ALIAS
        register_best(uri, name, str(row.model_uri), row.run_id, tags, alias)
        registered.append(f"{name}@{alias}")
    return registered


def register_best(uri: str, name: str, model_uri: str, run_id: str, tags: Mapping[str, str],
                  alias: str = BEST_ALIAS) -> int:
    """Register ``model_uri`` as a new version of ``name`` and point ``alias`` at it; returns the version.

    A logged model (``models:/m-...``) goes through ``mlflow.register_model``, which links both
    ways: the version records the logged model and its run, and the logged model lists the
    version (its ``mlflow.modelVersions``, which ``MlflowClient.create_model_version`` leaves
    unset, so the UI would offer to register a model that is registered already).
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    mlflow_client = tracking.client(uri)
    try:
        waiting.retry(lambda: mlflow_client.create_registered_model(name, description=tags.get("description")))
    except MlflowException as err:
        if "already exists" not in str(err).lower() and "RESOURCE_ALREADY_EXISTS" not in str(err):
            raise
    if model_uri.startswith("models:/m-"):
        # MLflow writes "Registered model ... already exists" to stderr: the launch says what it registered
        with tracking.using_uri(uri), contextlib.redirect_stderr(io.StringIO()):
            version = waiting.retry(lambda: mlflow.register_model(model_uri, name, tags=dict(tags)))
    else:  # a model of an older launch, logged as a run's artifact
        version = waiting.retry(lambda: mlflow_client.create_model_version(name, model_uri, run_id=run_id,
                                                                           tags=dict(tags)))
    waiting.retry(lambda: mlflow_client.set_registered_model_alias(name, alias, version.version))
    return int(version.version)

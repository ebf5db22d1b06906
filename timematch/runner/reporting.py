"""The report of an experiment, read back from MLflow: finished trials -> rows -> table and plot.

Used at the end of a launch and by ``python launch.py report``. The table itself is built
by :mod:`timematch.report` (no MLflow there); this module finds the runs, writes
``report.md``, ``report.html`` and ``report.png`` to ``results/<experiment>/`` and logs
them to the latest launch's parent run.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from collections.abc import Mapping
from typing import Any

from timematch.errors import ConfigError
from timematch.report import (
    AVERAGE, ResultTable, best_trials, paired_comparison, plot_methods, selection_gap, summarize,
)
from timematch.runner import runs, tracking, waiting
from timematch.runner.launch_state import ExperimentFolder, safe_name
from timematch.runner.plan import OBJECTIVES, get_objective
from timematch.selection import ORACLE


class NoFinishedTrial(ConfigError):
    """The launch (or experiment) has no finished adaptation trial to tabulate."""


@dataclass
class Report:
    table: ResultTable
    markdown: str
    files: list[Path]
    runs: int
    rows: list[dict[str, Any]]
    launch_run_id: str | None = None


def experiment_id(uri: str, name: str) -> str:
    client = tracking.client(uri)
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        names = sorted(e.name for e in client.search_experiments() if e.name != "Default")
        raise ConfigError(
            f"no MLflow experiment {name!r} in {uri}; experiments there: {', '.join(names) or 'none'}"
        )
    return experiment.experiment_id


ALL_LAUNCHES = "all"


def latest_launch(uri: str, exp_id: str):
    client = tracking.client(uri)
    runs = client.search_runs([exp_id], "tags.stage = 'launch'", max_results=1,
                              order_by=["attributes.start_time DESC"])
    return runs[0] if runs else None


def find_launch(uri: str, exp_id: str, launch_id: str | None):
    """The parent run of launch ``launch_id`` (None: the latest launch of the experiment)."""
    if launch_id is None:
        return latest_launch(uri, exp_id)
    client = tracking.client(uri)
    runs = client.search_runs([exp_id], f"tags.stage = 'launch' and tags.launch_id = '{launch_id}'", max_results=1)
    if not runs:
        known = [r.data.tags.get("launch_id", "?") for r in client.search_runs(
            [exp_id], "tags.stage = 'launch'", max_results=50, order_by=["attributes.start_time DESC"])]
        raise ConfigError(f"--launch {launch_id}: no such launch in this experiment; launches (newest first): "
                          f"{', '.join(known) or 'none'}, or '{ALL_LAUNCHES}'")
    return runs[0]


def collect_rows(uri: str, exp_id: str, launch_id: str | None = None) -> list[dict[str, Any]]:
    """One row per finished adaptation trial of launch ``launch_id`` (None: of every launch)."""
    client = tracking.client(uri)
    rows, token = [], None
    query = "tags.stage = 'adapt' and attributes.status = 'FINISHED'"
    if launch_id is not None:
        query += f" and tags.launch_id = '{launch_id}'"
    while True:
        page = client.search_runs([exp_id], query, max_results=1000, page_token=token)
        for run in page:
            tags, metrics = run.data.tags, run.data.metrics
            if "test_macro_f1" not in metrics:
                continue
            row = {"scenario": tags.get("scenario"), "method": tags.get("method"), "fold": int(tags.get("fold", 0)),
                   "seed": int(tags.get("seed", 0)),
                   "trial": tags.get("trial_key", run.info.run_id), "run_id": run.info.run_id,
                   "model_uri": tags.get("classifier_uri") or tags.get("model_uri")}
            row.update({k: v for k, v in metrics.items() if k.startswith("test_")})
            row.update({name: metrics[f"final_{name}"] for name in OBJECTIVES if f"final_{name}" in metrics})
            rows.append(row)
        token = page.token
        if not token:
            return rows


def build_report(uri: str, folder: ExperimentFolder, objective: str | None = None,
                 log_to_mlflow: bool = True, launch_id: str | None = None) -> Report:
    """Collect, tabulate, write (into ``folder``) and log the report of one launch of the
    folder's experiment.

    ``launch_id``: a launch (None: the latest; :data:`ALL_LAUNCHES`: every launch pooled,
    which turns each cell into a best-of-all-their-trials). The report is logged to that
    launch's parent run (the latest one when pooling).
    """
    experiment = folder.experiment
    exp_id = experiment_id(uri, experiment)
    pooled = launch_id == ALL_LAUNCHES
    launch = find_launch(uri, exp_id, None if pooled else launch_id)
    if objective is None:
        objective = launch.data.tags.get("objective", "target_val_f1") if launch else "target_val_f1"
    chosen = get_objective(objective)
    scope = None if pooled or launch is None else launch.data.tags.get("launch_id")
    rows = collect_rows(uri, exp_id, scope)
    if not rows:
        where = f"launch {scope}" if scope else f"experiment {experiment!r}"
        raise NoFinishedTrial(f"{where} has no finished adaptation trial yet; nothing to report")
    order = launch.data.params.get("scenarios", "").split(",") if launch else []
    seen = list(dict.fromkeys(str(r["scenario"]) for r in rows))
    scenarios = [s for s in order if s in seen] + [s for s in seen if s not in order]
    notes = [
        f"Selection by {chosen.name}: {chosen.description}. "
        + ("Target validation labels were used to select trials." if chosen.uses_target_labels
           else "No target labels were used to select trials."),
        (f"{len(rows)} finished trials of launch {scope} of experiment '{experiment}'" if scope else
         f"{len(rows)} finished trials of all launches of experiment '{experiment}' pooled")
        + "; the target test split is never used for selection.",
    ]
    table = summarize(rows, chosen.name, "test_macro_f1", scenarios, notes)
    gap = selection_gap(rows, list(OBJECTIVES), oracle=ORACLE, scenarios=scenarios)
    markdown = table.to_markdown() + "\n" + gap.to_markdown()
    if len(table.seeds) > 1 or len(table.folds) > 1:
        paired = paired_comparison(rows, chosen.name, scenarios=scenarios)
        if paired.rows:
            markdown += "\n" + paired.to_markdown()
    folder.path.mkdir(parents=True, exist_ok=True)
    files = folder.report_files
    files[0].write_text(f"# {experiment}\n\n{markdown}")
    files[1].write_text(table.to_html(title=experiment))
    import matplotlib.pyplot as plt

    figure = plot_methods(table, title=f"{experiment}: {table.metric}, best trial per fold by {chosen.name}")
    figure.savefig(files[2], dpi=120)
    plt.close(figure)
    if log_to_mlflow and launch is not None:
        client = tracking.client(uri)
        for path in files:
            waiting.retry(lambda p=path: client.log_artifact(launch.info.run_id, str(p), "report"))
        runs.log_metrics(client, launch.info.run_id, report_metrics(table, len(rows)), step=runs.FINAL_STEP)
    return Report(table, markdown, files, len(rows), rows, launch.info.run_id if launch is not None else None)


def report_metrics(table: ResultTable, n_rows: int) -> dict[str, float]:
    """The report's numbers as metrics of the launch run, so launches compare like trials do:
    ``avg_<metric>/<method>``, ``<metric>/<scenario>/<method>`` (x100, as in the table) and
    ``report_trials`` (the finished trials it selected from)."""
    metrics: dict[str, float] = {"report_trials": float(n_rows)}
    for method in table.methods:
        for column in table.columns:
            value = table.value(method, column)
            if value.n:
                name = f"avg_{table.metric}/{method}" if column == AVERAGE else f"{table.metric}/{column}/{method}"
                metrics[name] = 100.0 * value.mean
    return metrics


def register_best_models(uri: str, experiment: str, report: Report, objective: str, launch_id: str) -> list[str]:
    """Register, per (scenario, method), the model of the best trial by ``objective`` in the
    Model Registry as ``<experiment>.<scenario>.<method>``, alias ``best`` pointing at it.

    ``objective`` is the launch's selection rule (never the test split); reference methods
    (the upper bound) are registered too, tagged as such. Returns the names registered.
    """
    client = tracking.client(uri)
    best: dict[tuple[str, str], dict[str, Any]] = {}
    for row in best_trials(report.rows, objective):
        key = (str(row["scenario"]), str(row["method"]))
        if row.get("model_uri") and (key not in best or row[objective] > best[key][objective]):
            best[key] = row
    names = []
    for (scenario, method), row in sorted(best.items()):
        name = f"{safe_name(experiment)}.{scenario}.{method}"
        tags = {"objective": objective, objective: f"{row[objective]:.4f}", "fold": str(row["fold"]),
                "launch_id": launch_id, "trial_key": str(row["trial"]),
                "description": f"{method} adapted for {scenario}; the best trial of launch {launch_id} by {objective}"}
        register_best(client, name, str(row["model_uri"]), str(row["run_id"]), tags)
        names.append(name)
    return names


def register_best(mlflow_client, name: str, model_uri: str, run_id: str, tags: Mapping[str, str],
                  alias: str = "best") -> int:
    """Register ``model_uri`` as a new version of ``name`` and point ``alias`` at it; returns the version."""
    from mlflow.exceptions import MlflowException

    try:
        waiting.retry(lambda: mlflow_client.create_registered_model(name, description=tags.get("description")))
    except MlflowException as err:
        if "already exists" not in str(err).lower() and "RESOURCE_ALREADY_EXISTS" not in str(err):
            raise
    source, model_id = model_uri, None
    if model_uri.startswith("models:/m-"):  # a logged model: resolved here, not through MLflow's global URI
        logged = waiting.retry(lambda: mlflow_client.get_logged_model(model_uri.removeprefix("models:/")))
        source, model_id = logged.artifact_location, logged.model_id
    version = waiting.retry(lambda: mlflow_client.create_model_version(name, source, run_id=run_id, tags=dict(tags),
                                                               model_id=model_id))
    waiting.retry(lambda: mlflow_client.set_registered_model_alias(name, alias, version.version))
    return int(version.version)

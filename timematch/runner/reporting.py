"""The report of an experiment, read back from MLflow: finished trials -> rows -> table and plot.

Used at the end of a launch and by ``python launch.py report``. The table itself is built
by :mod:`timematch.report` (no MLflow there); this module finds the runs, turns each into a
:class:`~timematch.report.TrialRow` (:func:`trial_row`, the one place that reads a trial's
tags and metrics for the report), writes ``report.md`` and ``report.html`` (one
:class:`~timematch.report.Document`, the same sections in both; the HTML embeds the figures)
and ``report.png`` to ``results/<experiment>/``, logs them to the launch's parent run, tags
the trials' runs with their ranks (:func:`mark_winners`) and sets the launch run's
description to name the winners (:func:`winners_description`).
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from timematch.errors import ConfigError
from timematch.importance import EVALUATOR, Importance, importance_section, param_importances, plot_sensitivity
from timematch.movement import MOVEMENT_METRICS
from timematch.report import (
    AVERAGE, Document, Figure, ResultTable, Section, TrialRow, agg_pyplot, best_trials, column_label, is_reference,
    method_order, paired_comparison, plot_methods, ranked_trials, selection_gap, summarize,
)
from timematch.report.agreement import Degenerate, labelled, movement_section, one_model_rows, terminal_line
from timematch.runner import runs, tracking, waiting
from timematch.runner.launch_state import ExperimentFolder
from timematch.runner.plan import OBJECTIVES, LaunchPlan, get_objective
from timematch.runner.run_names import quoted
from timematch.runner.search_space import to_optuna
from timematch.selection import ORACLE


class NoFinishedTrial(ConfigError):
    """The launch (or experiment) has no finished adaptation trial to tabulate."""


@dataclass
class Report:
    table: ResultTable
    markdown: str
    files: list[Path]
    runs: int
    rows: list[TrialRow]
    launch_run_id: str | None = None
    #: What :func:`mark_winners` tagged, in one line ("" when nothing was logged to MLflow)
    tagged: str = ""
    #: Rows that are one model (:mod:`timematch.report.agreement`), named under the table
    degenerate: list[Degenerate] = field(default_factory=list)

    def degenerate_line(self) -> str:
        """:attr:`degenerate` in one line for the terminal ("" when no rows are one model)."""
        return terminal_line(self.degenerate)


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
    runs = client.search_runs([exp_id], f"tags.stage = 'launch' and tags.launch_id = {quoted(launch_id)}",
                              max_results=1)
    if not runs:
        known = [r.data.tags.get("launch_id", "?") for r in client.search_runs(
            [exp_id], "tags.stage = 'launch'", max_results=50, order_by=["attributes.start_time DESC"])]
        raise ConfigError(f"--launch {launch_id}: no such launch in this experiment; launches (newest first): "
                          f"{', '.join(known) or 'none'}, or '{ALL_LAUNCHES}'")
    return runs[0]


def collect_trials(uri: str, exp_id: str, launch_id: str | None = None) -> list[TrialRow]:
    """One row per adaptation trial of launch ``launch_id`` (None: of every launch) that ended
    well (:func:`trial_row`)."""
    client = tracking.client(uri)
    rows: list[TrialRow] = []
    token = None
    query = "tags.stage = 'adapt' and attributes.status = 'FINISHED'"
    if launch_id is not None:
        query += f" and tags.launch_id = {quoted(launch_id)}"
    while True:
        page = client.search_runs([exp_id], query, max_results=1000, page_token=token)
        rows.extend(row for row in map(trial_row, page) if row is not None)
        token = page.token
        if not token:
            return rows


def trial_row(run) -> TrialRow | None:
    """The report's row of a FINISHED adaptation trial's run: one that ran to the end (with
    its test metrics; its objectives are its final model's, ``final_<objective>``) or that ASHA
    stopped early (``stopped``: its objectives are its last epoch's, it has no test metric);
    None for any other (a finished run without test metrics). ``params``: its sampled values."""
    tags, metrics = run.data.tags, run.data.metrics
    stopped = "stopped_early" in tags
    if "test_macro_f1" not in metrics and not stopped:
        return None
    if not all(tags.get(key) for key in ("scenario", "method")):
        return None  # not a trial's run (made by hand in the experiment): nothing to place in the table
    values = {name: value for name, value in metrics.items() if name.startswith("test_")}
    prefix = "" if stopped else "final_"  # a stopped trial has its last epoch's value only
    values.update({name: metrics[prefix + name] for name in OBJECTIVES if prefix + name in metrics})
    # how far its returned model moved from the source model (timematch.movement), as logged
    values.update({f"final_{name}": metrics[f"final_{name}"] for name in MOVEMENT_METRICS
                   if f"final_{name}" in metrics})
    return TrialRow(
        scenario=tags["scenario"], method=tags["method"], fold=int(tags.get("fold", 0)),
        trial=tags.get("trial_key", run.info.run_id), metrics=values,
        seed=int(tags.get("seed", 0)),  # untagged on the runs of older launches
        run_id=run.info.run_id, model_uri=tags.get("classifier_uri") or tags.get("model_uri"),
        params=json.loads(tags.get("sampled") or "{}"), stopped=stopped, run_name=run.info.run_name or "",
    )


def build_report(uri: str, folder: ExperimentFolder, objective: str | None = None,
                 log_to_mlflow: bool = True, launch_id: str | None = None) -> Report:
    """Collect, tabulate, write (into ``folder``) and log the report of one launch of the
    folder's experiment.

    ``launch_id``: a launch (None: the latest; :data:`ALL_LAUNCHES`: every launch pooled,
    which turns each cell into a best-of-all-their-trials). The report is logged to that
    launch's parent run (the latest one when pooling), with its table as one chart and a
    description that names the winners (:func:`winners_description`), and every ranked
    trial's run is tagged with its rank by the objective (:func:`mark_winners`).
    """
    experiment = folder.experiment
    exp_id = experiment_id(uri, experiment)
    pooled = launch_id == ALL_LAUNCHES
    launch = find_launch(uri, exp_id, None if pooled else launch_id)
    if objective is None:
        objective = launch.data.tags.get("objective", "target_val_f1") if launch else "target_val_f1"
    chosen = get_objective(objective)
    scope = None if pooled or launch is None else launch.data.tags.get("launch_id")
    trials = collect_trials(uri, exp_id, scope)
    rows = [row for row in trials if not row.stopped]
    if not rows:
        where = f"launch {scope}" if scope else f"experiment {experiment!r}"
        raise NoFinishedTrial(f"{where} has no finished adaptation trial yet; nothing to report")
    order = launch.data.params.get("scenarios", "").split(",") if launch else []
    seen = list(dict.fromkeys(r.scenario for r in rows))
    scenarios = [s for s in order if s in seen] + [s for s in seen if s not in order]
    notes = [
        f"Selection by {chosen.name}: {chosen.description}. "
        + ("Target validation labels were used to select trials." if chosen.uses_target_labels
           else "No target labels were used to select trials."),
        (f"{len(rows)} finished trials of launch {scope} of experiment '{experiment}'" if scope else
         f"{len(rows)} finished trials of all launches of experiment '{experiment}' pooled")
        + "; the target test split is never used for selection.",
    ]
    client = tracking.client(uri)
    degenerate = one_model_rows(rows, chosen.name, lambda run_id: runs.read_predictions(client, run_id))
    marks, flagged = labelled(degenerate)
    table = summarize(rows, chosen.name, "test_macro_f1", scenarios, notes + flagged, marks)
    gap = selection_gap(rows, list(OBJECTIVES), oracle=ORACLE, scenarios=scenarios)
    moved = movement_section(rows, chosen.name)
    sections = [gap.section(), *([moved] if moved else [])]
    if len(table.seeds) > 1 or len(table.folds) > 1:
        paired = paired_comparison(rows, chosen.name, scenarios=scenarios)
        if paired.rows:
            sections.append(paired.section())
    folder.path.mkdir(parents=True, exist_ok=True)
    searched = searched_spaces(client, launch) if launch is not None else {}
    sensitivity = hyperparameter_sensitivity(trials, searched, chosen.name, folder)
    files = folder.report_files
    plt = agg_pyplot()
    figure = plot_methods(table, title=f"{experiment}: {table.metric}, best trial per fold by {chosen.name}")
    figure.savefig(files[2], dpi=120)
    plt.close(figure)
    bars = Figure(files[2], files[2].name, f"{table.metric} (x100) per scenario and method, as in the table")
    document = Document(experiment, [table.section(figures=[bars]), *sections, *sensitivity.sections],
                        markdown_preface=MARKDOWN_PREFACE)
    files[0].write_text(document.to_markdown())
    files[1].write_text(document.to_html())
    report = Report(table, document.to_markdown(preface=False), files + sensitivity.files, len(rows), rows,
                    launch.info.run_id if launch is not None else None)
    report.degenerate = degenerate
    if log_to_mlflow and launch is not None:
        run_id = launch.info.run_id
        for path in files:
            waiting.retry(lambda p=path: client.log_artifact(run_id, str(p), "report"))
        for path in sensitivity.files:
            waiting.retry(lambda p=path: client.log_artifact(run_id, str(p), "report/sensitivity"))
        if sensitivity.importances:
            waiting.retry(lambda: client.log_dict(run_id, sensitivity.as_dict(), "report/importance.json"))
        with Image.open(files[2]) as image:  # the table as one chart in the run's chart view
            chart = image.convert("RGB")
        waiting.retry(lambda: client.log_image(run_id, chart, key=f"{table.metric} per scenario", step=0))
        runs.log_metrics(client, run_id, report_metrics(table, len(rows)), step=runs.FINAL_STEP)
        report.tagged = mark_winners(client, trials, chosen.name)
        description = winners_description(rows, chosen.name, table.metric, scenarios, scope,
                                          launch.info.experiment_id, run_id)
        description += "".join(f"\n\n**One model** {note}" for note in flagged)  # as under the table
        waiting.retry(lambda: client.set_tag(run_id, DESCRIPTION_TAG, description))
    return report


#: Under the title of ``report.md`` only: where its figures show inline.
MARKDOWN_PREFACE = ("The figures are linked files beside this one (`report.png`, `sensitivity/`). In MLflow's UI "
                    "open `report.html` instead: the same report with the figures in the page.")

#: The tag that holds a run's description in MLflow's UI (its run page; the launch's card in the chart view).
DESCRIPTION_TAG = "mlflow.note.content"


def mark_winners(mlflow_client, trials: list[TrialRow], objective: str) -> str:
    """Tag every finished trial's run with its place in its (scenario, method, fold, seed) by
    ``objective`` and ``selected_by`` (``objective``). A trial of an adaptation method gets
    ``rank`` (1: the trial the report selects, a winner) and ``best`` (``true`` on rank 1). A
    trial of a reference method (source-only, the upper bound: rows to compare with, never
    marked best) gets ``reference=true``, ``best=false``, ``rank=reference`` and its place as
    ``reference_rank`` (1: the trial its row shows). A re-selection (``report --objective``)
    rewrites the tags; trials without a value for the objective, and trials stopped early, get
    ``rank`` (or ``reference_rank``) none and ``best=false``. Returns what it did, in one line."""
    from mlflow.entities import RunTag

    ranked = ranked_trials([row for row in trials if not row.stopped], objective)
    rank = {row.run_id: index + 1 for group in ranked.values() for index, row in enumerate(group)}
    for row in trials:
        place = str(rank.get(row.run_id) or "none")
        if is_reference(row.method):
            tags = [RunTag("rank", REFERENCE_RANK), RunTag("reference_rank", place), RunTag("reference", "true"),
                    RunTag("best", "false")]
        else:
            tags = [RunTag("rank", place), RunTag("best", "true" if place == "1" else "false")]
        tags.append(RunTag("selected_by", objective))
        waiting.retry(lambda r=row, t=tags: mlflow_client.log_batch(r.run_id, tags=t))
    winners = [key for key in ranked if not is_reference(key[1])]
    references = sorted({key[1] for key in ranked if is_reference(key[1])})
    line = (f"tagged {len(trials)} trial runs by {objective}: rank (1 = selected) and best=true on "
            f"{len(winners)} winner{'' if len(winners) == 1 else 's'} (filter the runs table with: tags.best = 'true')")
    if references:
        line += f"; reference rows ({', '.join(references)}): reference=true, never best"
    return line


#: The ``rank`` tag of a reference method's trial: never a winner (its place: ``reference_rank``).
REFERENCE_RANK = "reference"


def cell_winners(rows: list[TrialRow], objective: str, with_model: bool = False) -> dict[tuple[str, str], TrialRow]:
    """Per (scenario, method), the selected trial (:func:`best_trials`) with the highest
    ``objective`` over its folds and seeds (the first in the report's order on a tie): the trial
    the launch's description names and the Model Registry holds. ``with_model``: among the
    trials that logged a model only."""
    best: dict[tuple[str, str], TrialRow] = {}
    for row in best_trials(rows, objective):
        key = (row.scenario, row.method)
        if (row.model_uri or not with_model) and (key not in best
                                                  or row.metrics[objective] > best[key].metrics[objective]):
            best[key] = row
    return best


def winners_description(rows: list[TrialRow], objective: str, metric: str, scenarios: list[str],
                        launch_id: str | None, experiment_id: str, run_id: str) -> str:
    """The launch run's description (Markdown, a line per (scenario, method)): the trial the
    report selects (:func:`cell_winners`), linked by its run name, with its ``objective``
    and test metric (as logged: 0 to 1) and its sampled hyper-parameters; the winners of the
    adaptation methods first, then the reference rows, said to be references; and a link to
    the whole report, ``report/report.html`` (the figures inline)."""
    runs_page = f"#/experiments/{experiment_id}/runs"
    winners = cell_winners(rows, objective)
    scenarios = [*scenarios, *sorted({scenario for scenario, _ in winners} - set(scenarios))]
    methods = method_order(method for _, method in winners)
    pooled = "" if launch_id else ", all launches pooled"
    lines = [f"**Winners** by `{objective}`{pooled} ([the report]({runs_page}/{run_id}/artifacts/report/report.html): "
             "report/report.html)"]
    for reference in (False, True):
        for (scenario, method), row in sorted(winners.items(), key=lambda item: (scenarios.index(item[0][0]),
                                                                                  methods.index(item[0][1]))):
            if is_reference(method) != reference:
                continue
            name = f"[{row.run_name or row.trial}]({runs_page}/{row.run_id})" if row.run_id else row.run_name
            replicates = len({r.replicate for r in rows if (r.scenario, r.method) == (scenario, method)})
            best_of = f" (the best over {replicates} folds x seeds)" if replicates > 1 else ""
            values = f"{objective} {row.metrics[objective]:.3f}, {metric} {row.metrics.get(metric, float('nan')):.3f}"
            params = ", ".join(f"{key}={_short(value)}" for key, value in sorted(row.params.items())) or "defaults"
            kind = f"{method} (reference, never best)" if reference else f"**{method}**"
            lines.append(f"- {column_label(scenario)} {kind}: {name}{best_of}: {values}; {params}")
    return "\n".join(lines)


def _short(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


@dataclass
class Sensitivity:
    """The hyper-parameter importances and sensitivity plots of a report."""

    importances: list[Importance] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)
    #: The report's sections: the importance table and notes, then the plots (none when nothing was searched)
    sections: list[Section] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"evaluator": EVALUATOR,
                "rows": [row for item in self.importances for row in item.rows()], "notes": self.notes}


def searched_spaces(mlflow_client, launch) -> dict[tuple[str, str], dict[str, Any]]:
    """The searched space of each (scenario, method) of ``launch`` as Optuna distributions,
    read from the plan it logged (``launch/plan.json``); empty when it has none."""
    from mlflow.exceptions import MlflowException

    with tempfile.TemporaryDirectory() as directory:
        try:
            path = waiting.retry(lambda: mlflow_client.download_artifacts(launch.info.run_id, "launch/plan.json",
                                                                          directory))
        except (MlflowException, OSError):
            # a launch run without its plan (an older launch): nothing searched to read. The artifact
            # store says so with MLflow's "failed to download" or, over HTTP or a file system, an
            # OSError. A server that does not answer is not this: waiting.retry raises TrackingUnavailable.
            return {}
        plan = LaunchPlan.from_json(Path(path).read_text())
    return {(g.scenario.name, g.method): to_optuna(g.space) for g in plan.groups if g.searched and g.trials > 1}


def hyperparameter_sensitivity(trials: list[TrialRow], spaces: Mapping[tuple[str, str], dict[str, Any]],
                               objective: str, folder: ExperimentFolder) -> Sensitivity:
    """Per searched (scenario, method): the fANOVA importance of each searched key for the
    objective and test F1 (:mod:`timematch.importance`), and its sensitivity plot, written to
    ``folder.sensitivity_plot``; a group with too few finished trials gets a one-line note instead."""
    plt = agg_pyplot()
    out = Sensitivity()
    plotted: list[tuple[str, str]] = []
    for (scenario, method), distributions in spaces.items():
        group = [t for t in trials if t.scenario == scenario and t.method == method]
        if not group:
            continue
        try:
            importance = param_importances(scenario, method, group, distributions, objective)
            out.importances.append(importance)
        except ValueError as err:
            importance = None
            out.notes.append(f"{scenario} {method}: no importance: {err}")
        figure = plot_sensitivity(scenario, method, group, distributions, objective, importance)
        path = folder.sensitivity_plot(scenario, method)
        path.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(path, dpi=110)
        plt.close(figure)
        out.files.append(path)
        plotted.append((scenario, method))
    if out.importances or out.notes:
        out.sections.append(importance_section(out.importances, out.notes, objective))
    if out.files:
        out.sections.append(Section("Sensitivity: each trial's F1 against each searched hyper-parameter", tuple(
            Figure(path, f"sensitivity/{path.name}", f"{scenario} {method}")
            for (scenario, method), path in zip(plotted, out.files))))
    return out


def report_metrics(table: ResultTable, n_rows: int) -> dict[str, float]:
    """The report's numbers as metrics of the launch run, so launches compare like trials do:
    ``avg_<metric>/<method>``, ``<metric>/<scenario>/<method>`` (on the trials' scale, 0 to 1;
    the table prints them x100) and ``report_trials`` (the finished trials it selected from)."""
    metrics: dict[str, float] = {"report_trials": float(n_rows)}
    for method in table.methods:
        for column in table.columns:
            value = table.value(method, column)
            if value.n:
                name = f"avg_{table.metric}/{method}" if column == AVERAGE else f"{table.metric}/{column}/{method}"
                metrics[name] = value.mean
    return metrics

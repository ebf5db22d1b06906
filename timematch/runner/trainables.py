"""The Tune trainables: one source-model training, one adaptation trial.

Both are plain functions ``f(config, context)`` run by Ray Tune in worker processes (they
live in the installed package so workers can import them). ``context`` (a
:class:`TrialContext`, bound with ``tune.with_parameters``) carries the launch plan and
where to log; ``config`` names what to run. Both run in the one trial body of
:mod:`.trial_run` (their run's life, data, resumable state, epochs and end).

Adaptation trial, per epoch: log the epoch's metrics to MLflow, save its resumable state,
report them to Tune. The last epoch is reported only once the target test split is
evaluated and everything is logged, because ASHA stops a trial at its last epoch's report.
A retried or resumed trial continues from its last state and its own MLflow run; one whose
run already finished reports its logged results again instead of training twice.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from ray import tune

from timematch.data import packed
from timematch.data.dataset import Normalizer
from timematch.data.synthetic import planted_shift
from timematch.data.tiles import short_name
from timematch.experiment import (
    ExperimentResult, ExperimentSpec, PretrainedSource, pretrain_source, run_experiment, source_training,
)
from timematch.locks import cache_lock
from timematch.models import build_model
from timematch.movement import MOVEMENT_METRICS
from timematch.report import per_class_csv, plot_confusion, plot_shift_scores
from timematch.runner import run_names, runs, tracking, waiting
from timematch.runner.launch_state import LaunchFolder
from timematch.runner.plan import (
    OBJECTIVES, LaunchPlan, PretrainTask, TrialGroup, get_objective, source_model_path, source_model_state_path,
)
from timematch.runner.trial_config import AdaptConfig, TrainingConfig
from timematch.runner.trial_run import log_data, numbers, placement_tags, trial_run
from timematch.serving import ParcelPredictor, example_input

if TYPE_CHECKING:
    from mlflow import MlflowClient

TEST_PREFIX = "test_"


@dataclass(frozen=True)
class TrialContext:
    """What every trial of a launch shares."""

    plan: LaunchPlan
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    launch_id: str
    cpus_per_trial: float
    #: The GPU share of a trial (0 on a CPU cluster): where its tiles fit (timematch.data.views).
    gpus_per_trial: float = 0.0
    #: The driver's MLflow credentials (``MLFLOW_TRACKING_USERNAME`` ...), checked against the
    #: server at start-up; trials on other nodes do not inherit the driver's environment.
    credentials: dict[str, str] = field(default_factory=dict, repr=False)
    #: Where trials write what the driver must show (a tracking server not answering): a file
    #: in the launch's results folder, which every node shares; the driver prints new lines.
    events_path: str = ""
    #: How long trials wait for a tracking server that does not answer (the driver's setting).
    tracking_patience_s: float = waiting.PATIENCE_S
    #: The launch's folder (:class:`~timematch.runner.launch_state.LaunchFolder`), which every
    #: node shares: adaptation trials keep their resumable states there.
    folder: LaunchFolder = field(kw_only=True)


def start_worker(context: TrialContext) -> None:
    """Set up this worker process for a trial: threads, the launch's MLflow credentials, and the
    fingerprints of the tiles the driver checked before the trials started."""
    torch.set_num_threads(max(1, int(context.cpus_per_trial)))
    packed.trust_fingerprints(context.plan.tile_fingerprints)
    tracking.configure_client(context.tracking_uri, context.credentials, context.events_path,
                              context.tracking_patience_s)


def _source_only(metrics: Mapping[str, Any]) -> dict[str, float]:
    """A pretraining epoch's metrics without the target criteria: its "target" is the source
    tile itself, so they would fill the target columns with source values."""
    return {k: v for k, v in numbers(metrics).items() if not k.startswith("target_")}


# -- stage 1: source models -------------------------------------------------------------


def pretrain_trial(config: dict[str, Any], context: TrialContext) -> None:
    """Train (or finish training) one source model and store it under the cache."""
    start_worker(context)
    plan = context.plan
    task = plan.task(TrainingConfig.of(config).task)
    path = source_model_path(plan.cache_dir, task.key)
    # One training per source model, whatever the number of launches: a second launch that
    # needs it waits here for the first's, then reuses it.
    with cache_lock(path):
        if path.is_file():  # trained meanwhile by another launch
            tune.report({"reused": 1.0, "final": 1.0})
            return
        _train_source_model(task, path, context)


def _placed(spec: ExperimentSpec, context: TrialContext) -> ExperimentSpec:
    """``spec`` with this trial's GPU share (how much of its GPU its tiles may take)."""
    return spec.replace(gpu_share=context.gpus_per_trial) if context.gpus_per_trial > 0 else spec


def _varying_fold(plan: LaunchPlan, fold: int) -> int | None:
    """The fold, for run names, where the launch has several (else None: names leave it out)."""
    return fold if len(plan.folds) > 1 else None


def _train_source_model(task: PretrainTask, path: Path, context: TrialContext) -> None:
    plan = context.plan
    spec = _placed(plan.pretrain_spec(task), context)
    client = tracking.client(context.tracking_uri)
    tags = run_names.run_tags(
        stage="pretrain", scenario=",".join(task.scenarios), source=short_name(task.source), target="",
        method=run_names.training_method_tag(task.method), fold=task.fold, objective="source_val_f1",
        uses_target_labels=False, trains=task.method, launch_id=context.launch_id, model=spec.model,
        seed=spec.seed, source_model_path=str(path),
    )
    opened = runs.open_run(
        client, context.experiment_id, run_names.pretrain_run_key(task.key), tags,
        plan.resolved_pretrain_config(task),
        run_names.pretrain_run_name(short_name(task.source), _varying_fold(plan, task.fold), task.seed,
                                    None if task.is_source_model else task.method),
        context.parent_run_id, reuse_finished=False, refresh=placement_tags(),
    )
    state = source_model_state_path(plan.cache_dir, task.key)
    data = lambda run_id: log_data(client, run_id, plan, [(task.source, "train")], task.fold)  # noqa: E731
    with trial_run(client, context.tracking_uri, opened, state, data, metric_filter=_source_only) as run:
        with run.measured():
            pretrained = pretrain_source(spec, run.on_epoch, run.resume_state)
        pretrained.save(path)
        state.unlink(missing_ok=True)
        model = build_model(spec.model, num_classes=len(pretrained.classes))
        model.load_state_dict(pretrained.state_dict)
        described = {"classes": pretrained.classes, "key": pretrained.key}
        waiting.retry(lambda: client.log_dict(run.run_id, described, "source_model.json"))
        predictor = ParcelPredictor(model.eval(), list(pretrained.classes), Normalizer.from_dict(pretrained.normalizer),
                                    info={"model": spec.model,
                                          "method": "pretrain" if task.is_source_model else task.method, "source": spec.source,
                                          "fold": spec.fold, "key": pretrained.key})
        run.finish(pretrained.step_path, {"best_epoch": pretrained.best_epoch,
                                          "final_source_val_f1": pretrained.source_val_f1},
                   predictor, example_input(plan.data_root, spec.source),
                   {"source_val_f1": pretrained.source_val_f1, "best_epoch": pretrained.best_epoch, "final": 1.0})


# -- stage 2: adaptation trials ---------------------------------------------------------


def adapt_run_tags(plan: LaunchPlan, group: TrialGroup, **extra: Any) -> dict[str, str]:
    """The tags of a trial's run in ``group`` (also those the driver gives the run of a trial
    that died before it could open its own)."""
    objective = get_objective(plan.objective)
    source, target = group.scenario.source_short, group.scenario.target_short
    # on a synthetic dataset, the planted shift beside TimeMatch's estimate and MAD's DTW offset
    planted = planted_shift(plan.data_root, source, target)
    return run_names.run_tags(stage="adapt", scenario=group.scenario.name, source=source, target=target,
                              method=group.method, fold=group.fold, objective=objective.name,
                              uses_target_labels=objective.uses_target_labels, group=group.id,
                              planted_shift=planted, **extra)


def adapt_trial(config: dict[str, Any], context: TrialContext) -> None:
    """One trial (``config``: an :class:`~timematch.runner.trial_config.AdaptConfig`): adapt the
    group's source model with its sampled params, evaluate, log, report. (Stage 2's Tune trials
    start in :func:`timematch.runner.trial_arrays.adaptation_trial`, which hands a single trial here.)"""
    trial = AdaptConfig.of(config)
    start_worker(context)
    plan = context.plan
    group = plan.group(trial.group)
    params = dict(trial.params)
    trial_id = tune.get_context().get_trial_id()
    opened = open_adapt_run(context, group, params, trial_id, trial.number if group.trials > 1 else None)
    with trial_run(opened.client, context.tracking_uri, opened.opened, opened.state, opened.data,
                   report_until=opened.last_epoch) as run:
        if run.finished:  # completed before an interruption that Tune had not recorded yet
            tune.report(_logged_final(opened.client, run.run_id, plan.objective, opened.last_epoch))
            return
        with run.measured():
            result = run_experiment(opened.spec, load_source_model(plan, group), run.on_epoch, run.resume_state)
        finish_adapt_run(run, result, trial_id, context, group, opened.last_epoch)


@dataclass(frozen=True)
class AdaptRun:
    """An adaptation trial's run, opened (or found again): what :func:`trial_run` needs, the
    trial's spec (with its GPU share) and its last epoch."""

    client: Any
    opened: tuple[str, bool]
    state: Path
    data: Any
    spec: ExperimentSpec
    last_epoch: int


def open_adapt_run(context: TrialContext, group: TrialGroup, params: dict[str, Any], trial_id: str,
                   number: int | None, **tags: Any) -> AdaptRun:
    """Open the run of trial ``trial_id`` of ``group`` with sampled ``params`` (``number``: its
    number in its group, for the run name; ``tags``: more run tags), or find it again."""
    plan = context.plan
    resolved = plan.resolved_config(group, params)
    spec = plan.spec(group, params)
    training = source_training(spec)
    client = tracking.client(context.tracking_uri)
    tags = adapt_run_tags(
        plan, group, launch_id=context.launch_id, trial_id=trial_id, baseline="true" if group.baseline else None,
        sampled=json.dumps(params) if params else None, pretrain_key=None if training is None else training.key,
        seed=plan.seed if group.seed is None else group.seed, profile=plan.profile, **tags,
    )
    opened = runs.open_run(
        client, context.experiment_id, run_names.adapt_run_key(context.launch_id, trial_id), tags, resolved,
        run_names.trial_run_name(group.scenario.name, group.method, _varying_fold(plan, group.fold), number,
                                group.seed),
        context.parent_run_id,
        refresh=placement_tags(),
    )
    tiles = [(group.scenario.source, "train"), (group.scenario.target, "target")]
    data = lambda run_id: log_data(client, run_id, plan, tiles, group.fold)  # noqa: E731
    return AdaptRun(client, opened, context.folder.trial_state(trial_id), data, _placed(spec, context),
                    int(resolved["epochs"]))


def finish_adapt_run(run: Any, result: ExperimentResult, trial_id: str, context: TrialContext, group: TrialGroup,
                     last_epoch: int) -> dict[str, float]:
    """Log a trained trial's final metrics, artifacts and models, end its run, report (``run.report``);
    returns the final metrics."""
    plan = context.plan
    final = final_metrics(result)
    _log_artifacts(run.client, run.run_id, result, run.logs)
    predictor = ParcelPredictor.from_result(result, trial=trial_id, launch_id=context.launch_id)
    selection = {name: final[f"final_{name}"] for name in OBJECTIVES if f"final_{name}" in final}
    run.finish(result.step_path, {**final, **result.timings.to_dict()}, predictor,
               example_input(plan.data_root, group.scenario.target),
               {**final, **selection, "epoch": last_epoch, "final": 1.0, "mlflow_run_id": run.run_id})
    return final


def load_source_model(plan: LaunchPlan, group: TrialGroup) -> PretrainedSource | None:
    if group.pretrain_key is None:
        return None
    path = source_model_path(plan.cache_dir, group.pretrain_key)
    if not path.is_file():
        # Stage 1 stores every source model before stage 2 starts; a cache that is not shared
        # between the nodes of a cluster ends up here. run_experiment then trains it itself.
        return None
    return PretrainedSource.load(path)


def final_metrics(result: ExperimentResult) -> dict[str, float]:
    """``final_<objective>`` of the returned model (its best epoch's for methods that keep
    one, as :func:`run_experiment` reports them), its estimated shift and how far it moved from
    the source model (``final_moved_encoder``, ...: :mod:`timematch.movement`), and the target
    test metrics."""
    source = dict(result.metrics)
    final = {f"final_{name}": float(source[name]) for name in OBJECTIVES if name in source}
    final.update({k: float(v) for k, v in result.metrics.items() if k.startswith(TEST_PREFIX)})
    for name in ("estimated_shift", *MOVEMENT_METRICS):
        if name in result.metrics:
            final[f"final_{name}"] = float(result.metrics[name])
    return final


def _logged_final(client: MlflowClient, run_id: str, objective: str, epochs: int) -> dict[str, float]:
    metrics = client.get_run(run_id).data.metrics
    final = {k: v for k, v in metrics.items() if k.startswith(("final_", TEST_PREFIX))}
    final.update({name: metrics[f"final_{name}"] for name in OBJECTIVES if f"final_{name}" in metrics})
    return {**final, "epoch": epochs, "final": 1.0, "mlflow_run_id": run_id}


def _log_artifacts(client: MlflowClient, run_id: str, result: ExperimentResult, logs: list[str]) -> None:
    import matplotlib.pyplot as plt  # ~0.5 s to import: the driver's start-up (--help, --dry-run) skips it

    spec = result.spec
    title = f"{spec.method}: {short_name(spec.source)} -> {short_name(spec.target)}, fold {spec.fold}"
    figure = plot_confusion(result.confusion, result.classes, title=f"{title} (target test)")
    waiting.retry(lambda: client.log_figure(run_id, figure, "plots/confusion_matrix.png"))
    plt.close(figure)
    matrix = {"classes": result.classes, "matrix": result.confusion.tolist()}
    waiting.retry(lambda: client.log_dict(run_id, matrix, "confusion_matrix.json"))
    waiting.retry(lambda: client.log_dict(run_id, _plain(result.report), "per_class_report.json"))
    waiting.retry(lambda: client.log_text(run_id, per_class_csv(result.report), "per_class_report.csv"))
    if result.shift_scores:
        figure = plot_shift_scores(result.shift_scores, title=f"{title}: shift scores")
        waiting.retry(lambda: client.log_figure(run_id, figure, "plots/shift_scores.png"))
        plt.close(figure)
        waiting.retry(lambda: client.log_dict(run_id, _plain(result.shift_scores), "shift_scores.json"))
    if logs:
        waiting.retry(lambda: client.log_text(run_id, "\n".join(logs) + "\n", "epoch_logs.txt"))
    runs.log_predictions(client, run_id, result.predictions)


def _plain(value: Any) -> Any:
    """numpy and torch values -> JSON-ready Python values."""
    return json.loads(json.dumps(value, default=lambda v: v.tolist() if hasattr(v, "tolist") else str(v)))

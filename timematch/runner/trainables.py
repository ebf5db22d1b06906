"""The Tune trainables: one source-model training, one adaptation trial.

Both are plain functions ``f(config, context)`` run by Ray Tune in worker processes (they
live in the installed package so workers can import them). ``context`` (a
:class:`TrialContext`, bound with ``tune.with_parameters``) carries the launch plan and
where to log; ``config`` names what to run.

Adaptation trial, per epoch: log the epoch's metrics to MLflow, then report them to Tune
with a checkpoint (the resumable state of :func:`timematch.experiment.run_experiment`).
The last epoch is reported only once the target test split is evaluated and everything is
logged, because ASHA stops a trial at its last epoch's report. A retried or resumed trial
continues from its last checkpoint and its own MLflow run; one whose run already
finished reports its logged results again instead of training twice.
"""

from __future__ import annotations

import json
import tempfile
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from ray import tune

from timematch.data.tiles import short_name
from timematch.experiment import (
    ExperimentResult, PretrainedSource, atomic_torch_save, pretrain_key, pretrain_source, run_experiment,
)
from timematch.data.dataset import Normalizer
from timematch.data.synthetic import planted_shift
from timematch.models import build_model
from timematch.serving import ParcelPredictor, example_input
from timematch.report import per_class_csv, plot_confusion, plot_shift_scores
from timematch.runner import run_names, runs, tracking, waiting
from timematch.runner.plan import OBJECTIVES, LaunchPlan, TrialGroup, get_objective, source_model_path
from timematch.runner.trial_config import AdaptConfig, TrainingConfig
from timematch.evaluation import pick_device
from timematch.locks import cache_lock

STATE_FILE = "state.pt"
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


def _start(context: TrialContext) -> None:
    """Set up this worker process for a trial: threads, and the launch's MLflow credentials."""
    torch.set_num_threads(max(1, int(context.cpus_per_trial)))
    tracking.configure_client(context.tracking_uri, context.credentials, context.events_path,
                              context.tracking_patience_s)


def _placement_tags() -> dict[str, str]:
    """Where this trial runs: the Ray node (id and address), the host, and the device."""
    import socket

    import ray

    return {"ray_node_id": ray.get_runtime_context().get_node_id(),
            "ray_node_address": ray.util.get_node_ip_address(),
            "host": socket.gethostname(), "device": _device_tag()}


def _device_tag() -> str:
    """Where this trial computes: ``cpu`` or ``cuda:N (<GPU name>)`` (N among the GPUs Ray gave it)."""
    device = pick_device()
    if device.type != "cuda":
        return "cpu"
    index = torch.cuda.current_device()
    return f"cuda:{index} ({torch.cuda.get_device_name(index)})"


def _numbers(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _source_only(metrics: dict[str, Any]) -> dict[str, float]:
    """A pretraining epoch's metrics without the target criteria: its "target" is the source
    tile itself, so they would fill the target columns with source values."""
    return {k: v for k, v in _numbers(metrics).items() if not k.startswith("target_")}


def _log_data(client, run_id: str, plan: LaunchPlan, tiles: list[tuple[str, str]], fold: int) -> None:
    """Each tile a run uses as an MLflow dataset input: tile, fold, split sizes, cache fingerprint."""
    from timematch.data.packed import PackedTile
    from timematch.data.splits import make_split

    data = plan.data_config()
    for tile, role in tiles:
        packed = PackedTile.open(plan.data_root, tile, plan.cache_dir)
        manifest = json.loads((packed.path / "manifest.json").read_text())
        split = make_split(len(packed), fold, data.split_seed, packed.tile, data.n_folds)
        sizes = {part: int(len(split.part(part))) for part in ("train", "val", "test")}
        runs.log_dataset(
            client, run_id, f"{packed.tile} fold{fold}", str(manifest.get("fingerprint", packed.path.name)),
            {"data_root": plan.data_root, "tile": packed.tile, "cache": str(packed.path)},
            {"fold": fold, "parcels": len(packed), "dates": packed.n_dates, **sizes}, role)


# -- stage 1: source models -------------------------------------------------------------


def pretrain_trial(config: dict[str, Any], context: TrialContext) -> None:
    """Train (or finish training) one source model and store it under the cache."""
    _start(context)
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


def _placed(spec, context: TrialContext):
    """``spec`` with this trial's GPU share (how much of its GPU its tiles may take)."""
    return spec.replace(gpu_share=context.gpus_per_trial) if context.gpus_per_trial > 0 else spec


def _varying_fold(plan: LaunchPlan, fold: int) -> int | None:
    """The fold, for run names, where the launch has several (else None: names leave it out)."""
    return fold if len(plan.folds) > 1 else None


def _train_source_model(task, path: Path, context: TrialContext) -> None:
    plan = context.plan
    spec = _placed(plan.pretrain_spec(task), context)
    client = tracking.client(context.tracking_uri)
    tags = run_names.run_tags(
        "pretrain", ",".join(task.scenarios), short_name(task.source), "", run_names.training_method_tag(task.method_name),
        task.fold, "source_val_f1", False, trains=task.method_name, launch_id=context.launch_id, model=spec.model,
        seed=spec.seed,
        source_model_path=str(path),
    )
    run_id, _ = runs.open_run(
        client, context.experiment_id, run_names.pretrain_run_key(task.key), tags,
        plan.resolved_pretrain_config(task),
        run_names.pretrain_run_name(short_name(task.source), _varying_fold(plan, task.fold), task.seed, task.method),
        context.parent_run_id, reuse_finished=False, refresh=_placement_tags(),
    )
    partial = path.with_name(path.stem + ".partial.pt")
    try:
        runs.refuse_if_diverged(client, run_id)
        _log_data(client, run_id, plan, [(task.source, "train")], task.fold)
        resume_state = torch.load(partial, map_location="cpu", weights_only=True) if partial.is_file() else None
        if resume_state is not None:
            # The epochs the interrupted attempt trained: logged once. A continued run has
            # them already; a new run (the old one was deleted) gets them now.
            history = resume_state.get("history", [])
            first = next(iter(history[0]["metrics"]), None) if history else None
            have = runs.logged_steps(client, run_id, first) if first else set()
            for entry in history:
                if int(entry["epoch"]) not in have:
                    runs.log_metrics(client, run_id, _source_only(entry["metrics"]), step=int(entry["epoch"]))

        def on_epoch(report, state) -> None:
            metrics = _source_only(report.metrics)
            runs.log_metrics(client, run_id, metrics, step=report.epoch)
            atomic_torch_save(state(), partial)
            tune.report({**metrics, "epoch": report.epoch})

        with runs.SystemMetrics(context.tracking_uri, run_id):
            pretrained = pretrain_source(spec, on_epoch, resume_state)
        pretrained.save(path)
        partial.unlink(missing_ok=True)
        runs.tag_step_path(client, run_id, pretrained.info.get("step_path", {}))
        runs.log_metrics(client, run_id, {"best_epoch": pretrained.best_epoch,
                                              "final_source_val_f1": pretrained.source_val_f1},
                             step=runs.FINAL_STEP)
        model = build_model(spec.model, num_classes=len(pretrained.classes))
        model.load_state_dict(pretrained.state_dict)
        described = {"classes": pretrained.classes, "key": pretrained.key}
        waiting.retry(lambda: client.log_dict(run_id, described, "source_model.json"))
        predictor = ParcelPredictor(model.eval(), list(pretrained.classes), Normalizer.from_dict(pretrained.normalizer),
                                    info={"model": spec.model, "method": task.method or "pretrain", "source": spec.source,
                                          "fold": spec.fold, "key": pretrained.key})
        runs.log_models(context.tracking_uri, run_id, predictor, example_input(plan.data_root, spec.source))
        runs.finish(client, run_id)
        tune.report({"source_val_f1": pretrained.source_val_f1, "best_epoch": pretrained.best_epoch, "final": 1.0})
    except Exception as err:
        runs.fail(client, run_id, err, traceback.format_exc())
        raise


# -- stage 2: adaptation trials ---------------------------------------------------------


def adapt_run_tags(plan: LaunchPlan, group: TrialGroup, **extra: Any) -> dict[str, str]:
    """The tags of a trial's run in ``group`` (also those the driver gives the run of a trial
    that died before it could open its own)."""
    objective = get_objective(plan.objective)
    source, target = group.scenario.source_short, group.scenario.target_short
    # on a synthetic dataset, the planted shift beside TimeMatch's estimate and MAD's DTW offset
    planted = planted_shift(plan.data_root, source, target)
    return run_names.run_tags("adapt", group.scenario.name, source, target, group.method, group.fold, objective.name,
                              objective.uses_target_labels, group=group.id, planted_shift=planted, **extra)


def adapt_trial(config: dict[str, Any], context: TrialContext) -> None:
    """One trial (``config``: an :class:`~timematch.runner.trial_config.AdaptConfig`): adapt the
    group's source model with its sampled params, evaluate, log, report."""
    trial = AdaptConfig.of(config)
    _start(context)
    plan = context.plan
    group = plan.group(trial.group)
    params = dict(trial.params)
    objective = get_objective(plan.objective)
    trial_id = tune.get_context().get_trial_id()
    resolved = plan.resolved_config(group, params)
    client = tracking.client(context.tracking_uri)
    tags = adapt_run_tags(
        plan, group, launch_id=context.launch_id, trial_id=trial_id, baseline="true" if group.baseline else None,
        sampled=json.dumps(params) if params else None, pretrain_key=_training_key(plan, group, params),
        seed=plan.seed if group.seed is None else group.seed, profile=plan.profile,
    )
    run_id, finished = runs.open_run(
        client, context.experiment_id, run_names.adapt_run_key(context.launch_id, trial_id), tags, resolved,
        run_names.trial_run_name(group.scenario.name, group.method, _varying_fold(plan, group.fold),
                                trial.number if group.trials > 1 else None, group.seed),
        context.parent_run_id,
        refresh=_placement_tags(),
    )
    if finished:  # completed before an interruption that Tune had not recorded yet
        tune.report(_logged_final(client, run_id, objective.name, resolved["epochs"]))
        return
    try:
        runs.refuse_if_diverged(client, run_id)
        _log_data(client, run_id, plan, [(group.scenario.source, "train"), (group.scenario.target, "target")],
                  group.fold)
        checkpoint = tune.get_checkpoint()
        resume_state = None
        if checkpoint is not None:
            with checkpoint.as_directory() as directory:
                resume_state = torch.load(Path(directory) / STATE_FILE, map_location="cpu", weights_only=True)
        pretrained = _load_source_model(plan, group)
        last_epoch = int(resolved["epochs"])
        logs: list[str] = []

        def on_epoch(report, state) -> None:
            metrics = _numbers(report.metrics)
            runs.log_metrics(client, run_id, metrics, step=report.epoch)
            logs.extend(f"epoch {report.epoch}: {line}" for line in report.logs)
            if report.epoch >= last_epoch:
                return  # reported with the test metrics, below
            snapshot = state()
            if not snapshot:
                return  # nothing to resume from (an evaluation-only epoch)
            with tempfile.TemporaryDirectory() as directory:
                torch.save(snapshot, Path(directory) / STATE_FILE)
                tune.report({**metrics, "epoch": report.epoch},
                            checkpoint=tune.Checkpoint.from_directory(directory))

        with runs.SystemMetrics(context.tracking_uri, run_id):
            result = run_experiment(_placed(plan.spec(group, params), context), pretrained, on_epoch, resume_state)
        runs.tag_step_path(client, run_id, result.step_path)
        final = final_metrics(result)
        runs.log_metrics(client, run_id, {**final, **_numbers(result.timings)}, step=runs.FINAL_STEP)
        _log_artifacts(client, run_id, result, logs)
        predictor = ParcelPredictor.from_result(result, trial=trial_id, launch_id=context.launch_id)
        runs.log_models(context.tracking_uri, run_id, predictor, example_input(plan.data_root, group.scenario.target))
        runs.finish(client, run_id)
        selection = {name: final[f"final_{name}"] for name in OBJECTIVES if f"final_{name}" in final}
        tune.report({**final, **selection, "epoch": last_epoch, "final": 1.0, "mlflow_run_id": run_id})
    except Exception as err:
        runs.fail(client, run_id, err, traceback.format_exc())
        raise


def _training_key(plan: LaunchPlan, group: TrialGroup, params: dict[str, Any]) -> str | None:
    """The key of the source-tile training this trial starts from or evaluates (its own, for a
    sampled config of a method trained on the source alone), or None (the upper bound)."""
    if group.pretrain_key is None or params == (plan.default_point(group) or {}):
        return group.pretrain_key
    return pretrain_key(plan.spec(group, params))


def _load_source_model(plan: LaunchPlan, group: TrialGroup) -> PretrainedSource | None:
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
    one, as :func:`run_experiment` reports them), and the target test metrics."""
    source = dict(result.metrics)
    final = {f"final_{name}": float(source[name]) for name in OBJECTIVES if name in source}
    final.update({k: float(v) for k, v in result.metrics.items() if k.startswith(TEST_PREFIX)})
    if "estimated_shift" in result.metrics:
        final["final_estimated_shift"] = float(result.metrics["estimated_shift"])
    return final


def _logged_final(client, run_id: str, objective: str, epochs: int) -> dict[str, float]:
    metrics = client.get_run(run_id).data.metrics
    final = {k: v for k, v in metrics.items() if k.startswith(("final_", TEST_PREFIX))}
    final.update({name: metrics[f"final_{name}"] for name in OBJECTIVES if f"final_{name}" in metrics})
    return {**final, "epoch": epochs, "final": 1.0, "mlflow_run_id": run_id}


def _log_artifacts(client, run_id: str, result: ExperimentResult, logs: list[str]) -> None:
    import matplotlib.pyplot as plt

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


def _plain(value: Any) -> Any:
    """numpy and torch values -> JSON-ready Python values."""
    return json.loads(json.dumps(value, default=lambda v: v.tolist() if hasattr(v, "tolist") else str(v)))

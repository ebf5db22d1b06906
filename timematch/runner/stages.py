"""The two stages of a launch as Ray Tune runs.

Stage 1 trains the trainings on a source tile alone that are not cached yet (the source
models, and the shift-augmented baseline's models: each once per source tile, for every
scenario of the tile), one trial each (no search).
Stage 2 is one Tuner over every adaptation trial of the plan, with :class:`GroupedSearch`
(Optuna TPE per group behind a concurrency limit) and :class:`GroupedASHA` (ASHA per
group on epochs); each trial's per-epoch state (:mod:`.trial_run`) and ``FailureConfig``
retries make a failed trial continue from its last epoch, and
``Tuner.restore(..., resume_errored=True)`` continues an interrupted launch (``--resume``)
without re-running finished trials.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path

from ray import tune

from timematch.data.tiles import short_name
from timematch.runner import run_names, runs, tracking, waiting
from timematch.runner.launch_state import LaunchFolder
from timematch.runner.plan import LaunchPlan, source_model_path
from timematch.runner.progress import ProgressPrinter, RunStatusCallback, short_cause
from timematch.runner.resources import TrialResources
from timematch.runner.search import GroupedASHA, GroupedSearch
from timematch.runner.trainables import TrialContext, adapt_run_tags, pretrain_trial
from timematch.runner.trial_arrays import adaptation_trial
from timematch.runner.trial_config import config_key

ADAPT_DIR = "adapt"  # the adaptation Tuner's folder in the launch's Tune storage


@dataclass
class StageSummary:
    stage: str
    planned: int = 0
    done: list[str] = field(default_factory=list)
    stopped: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)  # (trial, error)
    skipped: list[str] = field(default_factory=list)  # cached source models
    not_started: list[tuple[str, str]] = field(default_factory=list)  # (trial group, why)
    interrupted: int = 0  # runs of trials that a killed launch started and Tune never recorded

    def lines(self) -> list[str]:
        out = [f"{self.stage}: {len(self.done)} done, {len(self.stopped)} stopped early by ASHA, "
               f"{len(self.failed)} failed" + (f", {len(self.skipped)} reused from the cache" if self.skipped else "")
               + f" ({self.planned} planned)"]
        out += [f"  FAILED {name}: {error}" for name, error in self.failed]
        out += [f"  SKIPPED {name}: {why}" for name, why in self.not_started]
        if self.interrupted:
            out.append(f"  {self.interrupted} run(s) of trials interrupted before Tune recorded them were "
                       "closed as KILLED (tag interrupted=true); their slots ran as new trials")
        return out


def _run_config(name: str, storage: Path, plan: LaunchPlan, callbacks: list) -> tune.RunConfig:
    return tune.RunConfig(
        name=name, storage_path=str(storage), verbose=0, callbacks=callbacks,
        failure_config=tune.FailureConfig(max_failures=plan.retries),
    )


def _trainable(function, context: TrialContext, resources: TrialResources):
    return tune.with_resources(tune.with_parameters(function, context=context), resources.as_ray())


def run_pretrain_stage(plan: LaunchPlan, context: TrialContext, resources: TrialResources,
                       folder: LaunchFolder) -> StageSummary:
    """Train the missing source-tile trainings (in parallel, one trial each)."""
    todo = [t for t in plan.pretrain_tasks if not source_model_path(plan.cache_dir, t.key).is_file()]
    summary = StageSummary("source models", planned=len(plan.pretrain_tasks))
    summary.skipped = [t.id for t in plan.pretrain_tasks if t not in todo]
    if not todo:
        return summary
    labels = {t.key: f"pretrain {t.id}" for t in todo}
    tags = {t.key: {"stage": "pretrain", "source": short_name(t.source), "fold": str(t.fold),
                    "method": run_names.training_method_tag(t.method), "trains": t.method,
                    "pretrain_key": t.key} for t in todo}
    callbacks = [
        ProgressPrinter("pretrain", labels, len(todo), "source_val_f1"),
        RunStatusCallback(context.tracking_uri, context.experiment_id, context.launch_id,
                          context.parent_run_id, "pretrain_key", tags),
    ]
    tuner = tune.Tuner(
        _trainable(pretrain_trial, context, resources),
        param_space={"task": tune.grid_search([t.key for t in todo])},  # a TrainingConfig each
        tune_config=tune.TuneConfig(reuse_actors=False),
        # A fresh directory per attempt: an interrupted training continues from its own state
        # beside the cached model (trial_run), which another launch may continue too.
        run_config=_run_config(f"pretrain-{time.strftime('%Y%m%d-%H%M%S')}", folder.tune, plan, callbacks),
    )
    grid = tuner.fit()
    _raise_if_interrupted(grid, len(todo))
    for result in grid:
        label = labels.get(config_key(result.config), "?")
        if result.error is not None:
            summary.failed.append((label, _first_line(result.error)))
        else:
            summary.done.append(label)
    return summary


def without_failed_sources(plan: LaunchPlan) -> tuple[LaunchPlan, list[tuple[str, str]]]:
    """The plan less the trial groups whose source model is missing after stage 1 (its training
    failed), and those groups with the reason: they are not started."""
    missing = {t.key: t.id for t in plan.pretrain_tasks if not source_model_path(plan.cache_dir, t.key).is_file()}
    skipped = [(g.id, f"not started: its source model {missing[g.pretrain_key]} failed to train")
               for g in plan.groups if g.pretrain_key in missing]
    if not skipped:
        return plan, []
    return dataclasses.replace(plan, groups=[g for g in plan.groups if g.pretrain_key not in missing]), skipped


def link_source_runs(plan: LaunchPlan, context: TrialContext) -> None:
    """Tag the launch's run with the pretraining run of each source model it uses
    (``source_run <source>/fold<k>``), trained by this launch or reused from an earlier one."""
    client = tracking.client(context.tracking_uri)
    for task in plan.pretrain_tasks:
        run = runs.find_source_run(client, task.key)
        if run is not None:
            waiting.retry(lambda r=run, t=task: client.set_tag(
                context.parent_run_id, f"source_run {t.id}", r.info.run_id))


def run_adapt_stage(plan: LaunchPlan, context: TrialContext, resources: TrialResources, folder: LaunchFolder,
                    resume: bool) -> StageSummary:
    """Every adaptation trial of the plan in one Tuner (restored when resuming)."""
    trainable = _trainable(adaptation_trial, context, resources)
    path = folder.tune / ADAPT_DIR
    if resume and tune.Tuner.can_restore(str(path)):
        tuner = tune.Tuner.restore(str(path), trainable=trainable, resume_errored=True)
    else:
        labels = {g.id: g.id for g in plan.groups}
        tags = {g.id: adapt_run_tags(plan, g) for g in plan.groups}
        callbacks = [
            ProgressPrinter("adapt", labels, plan.tune_trials, plan.objective),
            RunStatusCallback(context.tracking_uri, context.experiment_id, context.launch_id,
                              context.parent_run_id, "trial_key", tags),
        ]
        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(
                search_alg=GroupedSearch(plan, resources.max_concurrent_per_group, seed=plan.seed,
                                         optuna_db=folder.experiment.optuna_db,
                                         launch_id=context.launch_id),
                scheduler=GroupedASHA(plan, plan.scheduler.grace_period, plan.scheduler.reduction_factor),
                # a worker process serves several trials in turn: it saves each trial the start of a
                # process that imports torch, Ray and MLflow (~6 s on 2 cores; trials are seconds to minutes)
                num_samples=plan.tune_trials, reuse_actors=True,
            ),
            run_config=_run_config(ADAPT_DIR, folder.tune, plan, callbacks),
        )
    grid = tuner.fit()
    _raise_if_interrupted(grid, plan.tune_trials)
    closed = close_interrupted_runs(context)
    summary = StageSummary("adaptation", planned=plan.n_trials)
    summary.interrupted = closed
    for result in grid:
        label = f"{config_key(result.config) or '?'} [{_trial_id(result)}]"
        metrics = result.metrics or {}
        if result.error is not None:
            summary.failed.append((label, _first_line(result.error)))
            continue  # its state stays: --resume continues it
        if "members" in metrics:  # an array: its members' runs hold their ends
            summary.done += [f"{label} member"] * int(metrics.get("members_done", 0))
            summary.stopped += [f"{label} member"] * int(metrics.get("members_stopped", 0))
            summary.failed += [(f"{label} member", "see its run")] * int(metrics.get("members_failed", 0))
        elif "test_macro_f1" in metrics:
            summary.done.append(label)
        else:
            summary.stopped.append(label)  # ASHA's choice: nothing left to resume
        folder.trial_state(_trial_id(result)).unlink(missing_ok=True)
    return summary


def _raise_if_interrupted(grid, planned: int) -> None:
    """Tune answers Ctrl-C by saving its state and returning early: pass the interruption on."""
    if len(grid) < planned or grid.num_terminated + grid.num_errors < len(grid):
        raise KeyboardInterrupt


def close_interrupted_runs(context: TrialContext) -> int:
    """Once every trial of the launch has ended, a trial run still RUNNING belongs to a trial
    that an interrupted launch started after Tune last saved its state: close it."""
    return runs.kill_interrupted(tracking.client(context.tracking_uri), context.experiment_id, context.launch_id,
                                 stage="adapt")


def _trial_id(result) -> str:
    return str((result.metrics or {}).get("trial_id", "?"))


def _first_line(error: BaseException) -> str:
    return short_cause(str(error)) if str(error).strip() else type(error).__name__

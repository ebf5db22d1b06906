"""An array of trials as one Tune trial: up to ``--array K`` trials of one group trained in
lockstep as one fused model (:mod:`timematch.arrays`), each member still a trial of its own.

A member is:

- **its own Optuna trial** in its group's study (``<launch id> <group>`` in the launch's
  ``optuna.db``, as a single trial's is): asked when the array starts (TPE, the group's
  defaults first), told its final objective when it ends;
- **its own MLflow run**, opened and ended as a single trial's (params, every epoch's metrics,
  its resumable state, artifacts, models, ``final_*`` metrics), tagged ``array`` (the Tune trial
  it ran in), ``array_member`` and ``optuna_trial``; the report, winner tags, importance and
  the registry read it as any trial's run;
- **stopped at a rung on its own**: after each epoch it reports its objective to its study,
  whose pruner is successive halving with the profile's grace period and reduction factor,
  asynchronous as Tune's ASHA is (Li et al., MLSys 2020); a stopped member's run ends as an
  ASHA-stopped trial's does (``stopped_early=asha``).

A member that is stopped, goes NaN or fails leaves the array; the others go on
(:func:`timematch.arrays.fit_array`). Members whose sampled values must be equal inside one
array (:func:`timematch.arrays.invariant_keys`: RAINCOAT's ``fourier_modes`` sets a shape) train
as arrays in turn, in the same Tune trial. A retried or resumed array finds each member's run, study
trial and state again (the member's file beside its state) and continues every member from its
last epoch; a member that had ended is not trained again.
"""

from __future__ import annotations

import json
import logging
import math
import traceback
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ray import tune

from timematch.arrays import array_signature, fit_array
from timematch.experiment import Trial, build_trials
from timematch.runner import runs
from timematch.runner.plan import LaunchPlan, TrialGroup
from timematch.runner.search import member_study_name, optuna_storage
from timematch.runner.search_space import to_optuna
from timematch.runner.trainables import (
    TrialContext, adapt_trial, finish_adapt_run, load_source_model, open_adapt_run, start_worker,
)
from timematch.runner.trial_config import AdaptConfig
from timematch.runner.trial_run import TrialRun, trial_run
from timematch.training import injected_nan

logger = logging.getLogger(__name__)


class Pruned(Exception):
    """The member's study stopped it at a rung (successive halving)."""

    def __init__(self, epoch: int) -> None:
        super().__init__(f"stopped by its group's successive halving after epoch {epoch}")
        self.epoch = epoch


@dataclass
class Member:
    """One trial of an array: its id (``<Tune trial id>-m<k>``), its study trial, its run."""

    index: int
    trial_id: str
    study_trial: Any
    number: int
    run: TrialRun
    last_epoch: int
    spec: Any


def member_study(plan: LaunchPlan, group: TrialGroup, context: TrialContext, seed: int):
    """The group's study (created by the driver, :func:`timematch.runner.search.create_member_study`),
    with TPE seeded by ``seed`` and successive halving on epochs as its pruner."""
    import optuna

    return optuna.load_study(
        study_name=member_study_name(context.launch_id, group),
        storage=optuna_storage(context.folder.experiment.optuna_db),
        sampler=optuna.samplers.TPESampler(seed=seed),
        pruner=optuna.pruners.SuccessiveHalvingPruner(
            min_resource=plan.scheduler.grace_period, reduction_factor=max(2, round(plan.scheduler.reduction_factor))),
    )


def _record(state: Path) -> Path:
    """The file beside a member's state naming its study trial and params; kept until its array
    ends, so that a retried array asks nothing again for a member that had ended."""
    return state.with_name(state.name + ".member.json")


def _asked(study: Any, group: TrialGroup, state: Path) -> tuple[Any, int, dict[str, Any]]:
    """The member's study trial and params: asked now, or (a retried array) found again from
    the file beside its state."""
    import optuna

    record = _record(state)
    if record.is_file():
        saved = json.loads(record.read_text())
        return optuna.trial.Trial(study, int(saved["trial_id"])), int(saved["number"]), dict(saved["params"])
    trial = study.ask(to_optuna(group.space))
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps({"trial_id": trial._trial_id, "number": trial.number, "params": trial.params}))
    return trial, trial.number, dict(trial.params)


def _reporter(study_trial: Any, objective: str):
    """A member's ``TrialRun.report``: each epoch's objective to its study, which may stop it."""

    def report(metrics: dict[str, Any]) -> None:
        value = metrics.get(objective)
        if metrics.get("final") or value is None or not math.isfinite(float(value)):
            return
        epoch = int(metrics["epoch"])
        study_trial.report(float(value), epoch)
        if study_trial.should_prune():
            raise Pruned(epoch)

    return report


def _tell_ended(study: Any, member: Member, objective: str) -> None:
    """Tell the study how a member whose run had ended went (an interruption between the two)."""
    import optuna

    if study.trials[member.number].state != optuna.trial.TrialState.RUNNING:
        return
    run = member.run.client.get_run(member.run.run_id)
    if run.data.tags.get("stopped_early"):
        _tell(study, member, state=optuna.trial.TrialState.PRUNED)
    elif run.info.status == "FINISHED" and f"final_{objective}" in run.data.metrics:
        _tell(study, member, run.data.metrics[f"final_{objective}"])
    else:
        _tell(study, member, state=optuna.trial.TrialState.FAIL)


def _tell(study: Any, member: Member, value: float | None = None, state: Any = None) -> None:
    try:
        study.tell(member.study_trial, value, state=state)
    except (RuntimeError, ValueError) as error:  # told already (an array retried after telling)
        logger.info("study trial %d of member %s: %s", member.number, member.trial_id, error)


def adaptation_trial(config: dict[str, Any], context: TrialContext) -> None:
    """Stage 2's Tune trainable: an array of trials (``members`` > 0) or one trial
    (:func:`timematch.runner.trainables.adapt_trial`)."""
    trial = AdaptConfig.of(config)
    if not trial.members:
        adapt_trial(config, context)
        return
    start_worker(context)
    array_trial(trial, context)


def array_trial(config: AdaptConfig, context: TrialContext) -> None:
    """Train ``config.members`` trials of ``config.group`` as one array (see the module docstring)."""
    plan = context.plan
    group = plan.group(config.group)
    tune_id = tune.get_context().get_trial_id()
    seed = plan.seed * 1000 + plan.groups.index(group) * 100 + config.number
    study = member_study(plan, group, context, seed)
    counts = {"members_done": 0, "members_stopped": 0, "members_failed": 0}
    best: dict[str, float] = {}
    with ExitStack() as stack:
        members: list[Member] = []
        for k in range(config.members):
            trial_id = f"{tune_id}-m{k}"
            study_trial, number, params = _asked(study, group, context.folder.trial_state(trial_id))
            opened = open_adapt_run(context, group, params, trial_id, number, array=tune_id, array_member=str(k),
                                    optuna_trial=str(number))
            try:
                run = stack.enter_context(trial_run(opened.client, context.tracking_uri, opened.opened, opened.state,
                                                    opened.data, report_until=opened.last_epoch))
            except Exception as error:  # noqa: BLE001 - its run is FAILED (a diverged one refused): the others go on
                logger.warning("member %s not trained: %s", trial_id, error)
                counts["members_failed"] += 1
                continue
            if run.finished:  # ended before an interruption: nothing to train; its study told, if it was not
                _tell_ended(study, Member(k, trial_id, study_trial, number, run, opened.last_epoch, opened.spec),
                            plan.objective)
                counts["members_done"] += 1
                continue
            run.report = _reporter(study_trial, plan.objective)
            members.append(Member(k, trial_id, study_trial, number, run, opened.last_epoch, opened.spec))
        pretrained = load_source_model(plan, group)
        trials = build_trials([m.spec for m in members], pretrained) if members else []
        built = {m.index: trial for m, trial in zip(members, trials)}
        # members that cannot share one array train as arrays in turn: sampled values that set a
        # shape or a branch (timematch.arrays.invariant_keys), or resumed from different epochs
        # (an interruption between their saves)
        parts: dict[tuple, list[Member]] = {}
        for member in members:
            parts.setdefault((_resumed_epoch(member), array_signature(built[member.index].config)), []).append(member)
        for (epoch, _), batch in sorted(parts.items(), key=lambda item: item[0][0]):
            trials = [built[m.index] for m in batch]
            steps = trials[0].method.steps_per_epoch()
            poisoned = [injected_nan(group.method, m.number) for m in batch]  # fault injection (RELIABILITY.md)
            with batch[0].run.measured():
                outcomes = fit_array([t.method for t in trials], trials[0].seed,
                                     on_epoch=[m.run.on_epoch for m in batch], log=logger.info,
                                     execution=trials[0].spec.execution(), measure=[t.measure for t in trials],
                                     resume_states=None if epoch == 0 else [m.run.resume_state for m in batch],
                                     poison=None if not any(poisoned) else
                                     [-1 if p is None else (p[0] - 1) * steps + p[1] - 1 for p in poisoned])
            for member, trial, outcome in zip(batch, trials, outcomes):
                _end(member, trial, outcome, study, context, group, counts, best)
    for k in range(config.members):  # the array has ended: nothing left to find again
        _record(context.folder.trial_state(f"{tune_id}-m{k}")).unlink(missing_ok=True)
    tune.report({**counts, **best, "members": config.members, "final": 1.0})


def _resumed_epoch(member: Member) -> int:
    return 0 if member.run.resume_state is None else member.run.resume_state.epoch


def _end(member: Member, trial: Trial, outcome: Any, study: Any, context: TrialContext, group: TrialGroup,
         counts: dict[str, int], best: dict[str, float]) -> None:
    """End a member's run and tell its study how it ended."""
    import optuna

    run, objective = member.run, context.plan.objective
    if isinstance(outcome.error, Pruned):
        runs.stopped_early(run.client, run.run_id, outcome.error.epoch)
        run.finished = True
        run.state_path.unlink(missing_ok=True)
        _tell(study, member, state=optuna.trial.TrialState.PRUNED)
        counts["members_stopped"] += 1
    elif outcome.error is not None:
        text = "".join(traceback.format_exception(outcome.error))
        runs.fail(run.client, run.run_id, outcome.error, text)
        run.finished = True
        _tell(study, member, state=optuna.trial.TrialState.FAIL)
        counts["members_failed"] += 1
        return  # its state stays: a retry refuses a diverged run (runs.refuse_if_diverged)
    else:
        final = finish_adapt_run(run, trial.evaluate(outcome.result), member.trial_id, context, group,
                                 member.last_epoch)
        value = final.get(f"final_{objective}")
        _tell(study, member, value, state=None if value is not None else optuna.trial.TrialState.FAIL)
        counts["members_done"] += 1
        if value is not None and value > best.get(objective, -math.inf):
            best.update({objective: value, "test_macro_f1": final["test_macro_f1"], "best_member": member.index})

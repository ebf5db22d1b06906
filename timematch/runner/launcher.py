"""One launch, end to end: data, Ray, the MLflow parent run, the two stages, the report."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any

from timematch.data.embedded import ensure_embedded_dataset
from timematch.data.packed import PackedTile
from timematch.runner import runs, tracking, waiting
from timematch.runner.launch_state import EXIT_OK, EXIT_TRIALS_FAILED, Launch, LaunchFolder
from timematch.runner.describe import budget_at_scale, describe
from timematch.runner.plan import LaunchPlan, check_embedded_root, get_objective, resolve_array, source_model_path
from timematch.runner.resources import Cluster, connect, disconnect, trial_resources


def _say(text: str) -> None:
    print(text, flush=True)


def pack_tiles(plan: LaunchPlan) -> None:
    """Pack (and so read and check) every tile the launch needs, here, before any trial starts:
    a bad parcel or metadata file is one error naming the file (exit 2), not a failure inside
    every trial; the trials then memory-map the packed caches."""
    parcels = {}
    for tile in plan.tiles:
        packed = PackedTile.open(plan.data_root, tile, Path(plan.cache_dir), progress=_say)
        parcels[tile] = len(packed)
        plan.tile_fingerprints.update(packed.checked())
    _say("\n".join(budget_at_scale(plan, parcels)))


def _parent_params(plan: LaunchPlan) -> dict[str, Any]:
    return {
        "scenarios": ",".join(s.name for s in plan.scenarios), "methods": ",".join(plan.methods),
        "folds": ",".join(map(str, plan.folds)), "profile": plan.profile, "objective": plan.objective,
        "seed": plan.seed, "data_root": plan.data_root,
        "trials_per_group": max((g.trials for g in plan.groups), default=0),
        "trials_total": plan.n_trials, "search": plan.search, "baseline": plan.baseline,
        "data": json.dumps(plan.data), "pretrain": json.dumps(plan.pretrain), "scheduler": json.dumps(dataclasses.asdict(plan.scheduler)),
        "retries": plan.retries,
    }


def _open_parent(launch: Launch, experiment_id: str, cluster: Cluster, resources) -> str:
    client = tracking.client(launch.tracking_uri)
    if launch.parent_run_id:
        runs.resume_launch(client, launch.parent_run_id)
        return launch.parent_run_id
    plan = launch.plan
    objective = get_objective(plan.objective)
    tags = {"stage": "launch", "launch_id": launch.launch_id, "profile": plan.profile, "objective": objective.name,
            "selection_uses_target_labels": "true" if objective.uses_target_labels else "false",
            "cluster": cluster.address, "cpus_per_trial": str(resources.cpus), "gpus_per_trial": str(resources.gpus)}
    run_id, _ = runs.open_run(client, experiment_id, {"stage": "launch", "launch_id": launch.launch_id}, tags,
                              _parent_params(plan), f"launch {launch.launch_id}", None)
    waiting.retry(lambda: client.log_text(run_id, plan.to_json(), "launch/plan.json"))
    return run_id


def _run_stages(plan: LaunchPlan, context, resources, folder: LaunchFolder, resumed: bool) -> list:
    from timematch.runner.stages import (
        StageSummary, link_source_runs, run_adapt_stage, run_pretrain_stage, without_failed_sources,
    )

    summaries = [run_pretrain_stage(plan, context, resources, folder)]
    link_source_runs(plan, context)
    adapt_plan, not_started = without_failed_sources(plan)
    if adapt_plan.groups:
        adapt = run_adapt_stage(adapt_plan, dataclasses.replace(context, plan=adapt_plan), resources, folder,
                                resume=resumed)
    else:
        adapt = StageSummary("adaptation")
    adapt.planned = plan.n_trials
    adapt.not_started = not_started
    summaries.append(adapt)
    return summaries


def run_launch(launch: Launch, args: argparse.Namespace, requested: tuple[Any, Any, Any]) -> int:
    from timematch.runner.registry import register_best_models
    from timematch.runner.reporting import NoFinishedTrial, build_report
    from timematch.runner.trainables import TrialContext

    plan = launch.plan
    tracking.configure_client(launch.tracking_uri)
    if not launch.resumed:
        launch.save(None)
    if plan.synthetic_data:
        check_embedded_root(plan)
        ensure_embedded_dataset(progress=_say)
    if not str(launch.address or "").startswith("ray://"):  # through Ray Client the data is the cluster's
        pack_tiles(plan)
    if launch.address:  # Ray itself retries for up to ~30 s before it gives up on an address
        _say(f"connecting to the Ray cluster at {launch.address} ...")
    cluster = connect(launch.address, verbose=args.verbose)
    try:
        resources = trial_resources(cluster, *requested)
        if not launch.resumed:  # auto decides on the cluster's devices (--dry-run's plan knew none)
            plan.array, plan.array_reason = resolve_array(getattr(args, "array", "auto"), resources.gpus)
        if cluster.nodes > 1 and tracking.sqlite_path(launch.tracking_uri) is not None:
            _say(f"warning: {cluster.nodes} nodes log to SQLite {launch.tracking_uri}: that works only when every "
                 "node sees the file (nodes on one machine); otherwise use an MLflow server (--tracking-uri http://...)"
                 ", and keep --results-dir and $TIMEMATCH_CACHE on storage every node shares")
        experiment_id = tracking.ensure_experiment(launch.tracking_uri, plan.experiment)
        launch.parent_run_id = _open_parent(launch, experiment_id, cluster, resources)
        launch.save(experiment_id)
        cached = {t.key for t in plan.pretrain_tasks if source_model_path(plan.cache_dir, t.key).is_file()}
        size = f"{cluster.nodes} node(s), {cluster.cpus:g} CPUs, {cluster.gpus:g} GPUs"
        shown = {"cluster": f"{cluster.address} ({size})",
                 "cpus per trial": resources.cpus, "gpus per trial": resources.describe_gpus(),
                 "trials at once": resources.slots, "in flight per group": resources.max_concurrent_per_group,
                 "tracking": f"{launch.tracking_uri} (experiment {plan.experiment!r})",
                 "results": str(launch.folder.path)}
        _say(("resuming launch " if launch.resumed else "launch ") + launch.launch_id)
        _say(describe(plan, shown, cached) + "\n")
        context = TrialContext(plan, launch.tracking_uri, experiment_id, launch.parent_run_id, launch.launch_id,
                               resources.cpus, resources.gpus, tracking.credentials(), str(launch.folder.events),
                               waiting.patience(), folder=launch.folder)
        with waiting.EventTail(launch.folder.events, _say):
            summaries = _run_stages(plan, context, resources, launch.folder, launch.resumed)
        failed = sum(len(s.failed) for s in summaries)
        _say("\n" + "\n".join(line for s in summaries for line in s.lines()))
        client = tracking.client(launch.tracking_uri)
        try:
            report = build_report(launch.tracking_uri, launch.folder.experiment, plan.objective,
                                  launch_id=launch.launch_id)
            _say(f"\n{report.markdown}\nwritten: {', '.join(str(p) for p in report.files)}\n{report.tagged}")
            if report.degenerate:
                _say(report.degenerate_line())
            registered = register_best_models(launch.tracking_uri, plan.experiment, report, plan.objective,
                                              launch.launch_id)
            if registered:
                _say(f"registered by {plan.objective} (models:/<name>@<alias>): {', '.join(registered)}")
        except NoFinishedTrial as err:  # only this case has no table; any other error surfaces
            _say(f"\nno report: {err}")
        counts = {"trials_done": sum(len(s.done) for s in summaries[1:]),
                  "trials_stopped_early": sum(len(s.stopped) for s in summaries),
                  "trials_failed": failed}
        for key, value in counts.items():
            waiting.retry(lambda k=key, v=value: client.set_tag(launch.parent_run_id, k, str(v)))
        runs.log_metrics(client, launch.parent_run_id, counts, step=runs.FINAL_STEP)
        runs.finish(client, launch.parent_run_id)
        _say(f"MLflow: {launch.tracking_uri}, experiment {plan.experiment!r}, launch run {launch.parent_run_id}")
        _say(f"in the UI: {tracking.ui_address(launch.tracking_uri, experiment_id, launch.parent_run_id)}")
        return EXIT_TRIALS_FAILED if failed else EXIT_OK
    except KeyboardInterrupt:
        if launch.parent_run_id:
            runs.kill_interrupted(tracking.client(launch.tracking_uri), experiment_id, launch.launch_id,
                                  also=(launch.parent_run_id,))
        raise KeyboardInterrupt(f"continue with: python launch.py --resume --experiment {plan.experiment}") from None
    finally:
        disconnect(cluster)




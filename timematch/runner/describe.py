"""A plan as the user reads it (``--dry-run`` prints it, a launch prints it before it starts):
the data, the objective, stage 1's trainings (cached or to train) and stage 2's groups."""

from __future__ import annotations

from typing import Any

from timematch.data.splits import TRAIN_FRACTION, VAL_FRACTION
from timematch.data.tiles import short_name
from timematch.methods import build_config, get_method, source_model_method
from timematch.runner.plan import LaunchPlan, get_objective


def describe(plan: LaunchPlan, resources: dict[str, Any] | None = None, cached: set[str] | None = None) -> str:
    """A readable summary of the plan (``--dry-run`` prints it)."""
    objective = get_objective(plan.objective)
    cached = cached or set()
    lines = [
        f"experiment {plan.experiment!r}, profile {plan.profile!r}, seed {plan.seed}"
        + (f", {plan.seeds} seeds ({plan.seed}..{plan.seed + plan.seeds - 1})" if plan.seeds > 1 else ""),
        *([f"profile {plan.profile!r}: {plan.profile_description}"] if plan.profile_description else []),
        f"data: {plan.data_root}" + (" (embedded synthetic dataset)" if plan.synthetic_data else "")
        + f"; data overrides {plan.data or '{}'}",
        f"objective: {objective.name} ({objective.description})",
        f"training steps: {plan.precision}, "
        + ("on a GPU one CUDA graph per trial, replayed" if plan.cuda_graph else "eager (--no-cuda-graph)"),
        f"scenarios: {', '.join(s.name for s in plan.scenarios)}; methods: {', '.join(plan.methods)}; "
        f"folds: {', '.join(map(str, plan.folds))}",
        "",
        f"stage 1, source models: {len(plan.pretrain_tasks)} "
        f"({sum(t.key in cached for t in plan.pretrain_tasks)} cached, reused); each trained once on its "
        "source tile for every scenario listed",
    ]
    width = max([14, *(len(t.id) for t in plan.pretrain_tasks)])
    for task in plan.pretrain_tasks:
        state = "cached" if task.key in cached else "to train"
        lines.append(f"  {task.id:<{width}} {state:<9} key {task.key}  (for {', '.join(task.scenarios)})")
    lines.append(f"  training overrides: {plan.pretrain or '{}'}")
    for method in dict.fromkeys(t.method for t in plan.pretrain_tasks if not t.is_source_model):
        overrides = next(t.config for t in plan.pretrain_tasks if t.method == method)
        lines.append(f"  {method}: its training reads the source tile alone; its trials evaluate it on each "
                     f"target (overrides {overrides or '{}'})")
    lines += ["", f"stage 2, adaptation: {len(plan.groups)} groups, {plan.n_trials} trials "
                  f"(Optuna TPE per group, ASHA over epochs: {plan.scheduler}; retries {plan.retries})",
              f"trials per array: {plan.array}" + (f" ({plan.array_reason})" if plan.array_reason else "")
              + ("" if plan.array <= 1 else ": a searched group's trials of a method that can share one train as "
                 "one fused model, each still its own Optuna trial, MLflow run and ASHA decision")]
    group_width = max([28, *(len(g.id) for g in plan.groups)])
    for group in plan.groups:
        how = "baseline, default config" if group.baseline else (
            f"{group.trials} trials over {', '.join(group.space)}" if group.searched else "1 trial, default config")
        shared = next((t for t in plan.pretrain_tasks if t.key == group.pretrain_key and t.method == group.method
                       and not t.is_source_model), None)
        if shared is not None:
            how += f" (the defaults: evaluates {shared.id} of stage 1)"
        sizes = plan.array_sizes(group)
        if sizes:
            how += f", in {len(sizes)} array(s) of {'+'.join(map(str, sizes))} trained as one model"
        lines.append(f"  {group.id:<{group_width}} {how}; {group.epochs} epochs; overrides {group.overrides or '{}'}")
    if resources:
        lines += ["", "resources: " + ", ".join(f"{k} {v}" for k, v in resources.items())]
    return "\n".join(lines)


def budget_at_scale(plan: LaunchPlan, parcels: dict[str, int]) -> list[str]:
    """What the profile's budgets mean on these tiles (``parcels``: tile -> its parcels): the
    source models' and each adaptation method's steps as passes over the training parcels they
    draw from, and what each epoch evaluates. A budget of fixed steps covers less of a larger
    tile; an epoch of ``steps_per_epoch: null`` is one pass, so its steps grow with the tile."""
    def train(tile: str) -> int:
        return round(TRAIN_FRACTION * parcels[tile])

    def covered(config, tile: str) -> str:
        per_epoch = config.steps_per_epoch or max(1, train(tile) // config.batch_size)
        steps = config.epochs * per_epoch
        passes = steps * config.batch_size / max(1, train(tile))
        shown = f"{passes:,.0f}" if passes >= 10 else f"{passes:.1f}" if passes >= 1 else f"{passes:.2f}"
        return f"{steps:,} steps x {config.batch_size} = {shown} passes over {short_name(tile)}'s ~{train(tile):,} training parcels"

    named = ", ".join(f"{short_name(t)} {n:,}" for t, n in sorted(parcels.items()))
    lines = [f"budgets on these tiles (parcels: {named}):"]
    source_config = build_config(source_model_method().name, plan.pretrain)
    for source in sorted({t.source for t in plan.pretrain_tasks if t.is_source_model}):
        lines.append(f"  source model on {short_name(source)}: {covered(source_config, source)}")
    seen = set()
    for group in plan.groups:
        # the tile whose training parcels its steps draw: the source for a training on the source alone
        tile = group.scenario.source if get_method(group.method).trains_on == "source" else group.scenario.target
        if group.baseline or (group.method, tile) in seen:
            continue
        seen.add((group.method, tile))
        lines.append(f"  {group.method} ({group.scenario.name}): "
                     f"{covered(build_config(group.method, group.overrides), tile)}")
    size = plan.data_config().eval_parcels
    parts = ", ".join(f"{short_name(t)} ~{round(VAL_FRACTION * n):,}" for t, n in sorted(parcels.items()))
    lines.append("  each epoch evaluates " + (f"a fixed sample of at most {size:,} parcels per split part"
                                               if size else "the whole split parts")
                 + f" (validation parts: {parts}); a result, the whole test split")
    return lines

"""The plan of a launch: scenarios x methods x folds, expanded from config, checked before any work.

A plan has two stages:

1. *pretrain*: one :class:`PretrainTask` per (source tile, fold, settings) that some trial
   starts from; each is trained once and cached under ``<cache>/source_models/<key>.pt``
   (the key is :func:`timematch.experiment.pretrain_key`), so later launches reuse it.
2. *adapt*: one :class:`TrialGroup` per (scenario, method, fold); a group runs ``trials``
   trials, Optuna sampling the method's search space (the first trial is the profile's
   defaults), or one trial with the defaults when it is not searched. The ``source_only``
   baseline (the pretrained source model evaluated on the target) is a group of one
   default trial per scenario x fold.

Nothing here imports Ray or MLflow: the plan is built and printed (``--dry-run``) in a
second or two, and every error surfaces before a Ray cluster is touched.

Longer than 400 lines: the plan's parts (objectives, methods, folds, tasks, groups), its
expansion and its printed description are one concept; split, each would import the others.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from timematch.data.dataset import DataConfig
from timematch.data.tiles import short_name
from timematch.errors import ConfigError, named_option
from timematch.experiment import EPOCH_METRICS, ExperimentSpec, pretrain_key, source_training_spec
from timematch.selection import CRITERIA, ORACLE
from timematch.methods import build_config, get_method, methods_in_table_order, source_model_method
from timematch.runner.profiles import Profile, Resources, Scheduler
from timematch.runner.scenarios import Scenario
from timematch.runner.search_space import contains, load_space


def baseline_method() -> str:
    """The method whose default trial is the source-only baseline (the pretrained source model
    evaluated on the target) and whose training makes the source models: the registered
    method with ``evaluates_source_model``."""
    return source_model_method().name


@dataclass(frozen=True)
class Objective:
    """A model-selection criterion: an epoch metric, maximised."""

    name: str
    uses_target_labels: bool
    description: str
    mode: str = "max"


#: The oracle (target validation labels), then every criterion of :mod:`timematch.selection`.
OBJECTIVES: dict[str, Objective] = {
    ORACLE: Objective(ORACLE, True, "macro F1 on the target validation split (uses target labels)"),
    **{c.name: Objective(c.name, c.uses_target_labels, c.description) for c in CRITERIA.values()},
}
assert all(name in EPOCH_METRICS for name in OBJECTIVES)


def get_objective(name: str) -> Objective:
    try:
        return OBJECTIVES[name]
    except KeyError:
        valid = "; ".join(f"{o.name}: {o.description}" for o in OBJECTIVES.values())
        raise ConfigError(f"unknown objective {name!r}; valid: {valid}") from None


@dataclass(frozen=True)
class MethodChoice:
    """The methods of a launch; ``searched`` are those whose hyper-parameters are searched."""

    methods: tuple[str, ...]
    searched: frozenset[str]


def parse_methods(text: str) -> MethodChoice:
    """``all`` (every registered method; ``source_only`` then runs as the default-config
    baseline), ``paper`` (the methods of the TimeMatch paper's table, likewise), one name, or a
    comma list. Unknown names raise, listing the valid ones."""
    valid = methods_in_table_order()
    groups = {"all": valid, "paper": [m for m in valid if get_method(m).in_paper_table]}
    baseline = baseline_method()
    tokens = [t.strip() for t in text.split(",") if t.strip()]
    if not tokens:
        raise ConfigError(f"--method is empty; valid: all, paper, {', '.join(valid)}")
    methods: list[str] = []
    searched: set[str] = set()
    for token in tokens:
        if token in groups:
            chosen = groups[token]
            searched.update(m for m in chosen if m != baseline)
        elif token in valid:
            chosen = [token]
            searched.add(token)
        else:
            raise ConfigError(f"unknown method {token!r}; valid: all, paper, {', '.join(valid)} (or a comma list)")
        methods.extend(m for m in chosen if m not in methods)
    return MethodChoice(tuple(methods), frozenset(searched))


def parse_folds(text: str | None, profile: Profile, n_folds: int) -> list[int]:
    """``N`` (the first N folds) or a comma list of fold indices; default: the profile's count."""
    if text is None:
        return list(range(profile.folds))
    text = str(text).strip()
    try:
        if "," in text:
            folds = sorted({int(t) for t in text.split(",") if t.strip()})
        else:
            count = int(text)
            if count < 1:
                raise ValueError
            folds = list(range(count))
    except ValueError:
        raise ConfigError(f"--folds {text!r}: expected a count N >= 1 or a comma list of fold indices") from None
    bad = [f for f in folds if not 0 <= f < n_folds]
    if bad or not folds:
        raise ConfigError(f"--folds {text!r}: folds must lie in [0, {n_folds - 1}] (the data has n_folds={n_folds})")
    return folds


@dataclass(frozen=True)
class PretrainTask:
    """One training on a source tile alone, trained once and shared by every scenario of the
    tile that needs it: a source model (``method`` None: the source-model method with the
    profile's ``pretrain`` settings), which adaptation methods start from and the source-only
    baseline evaluates; or the training of a method trained from scratch on the source alone
    (``method``, e.g. ``shift_aug``, with the profile's ``config`` for it), which each of its
    scenarios' trials evaluates on its target."""

    key: str
    source: str
    fold: int
    scenarios: tuple[str, ...]
    seed: int | None = None  # set when the launch repeats over seeds (--seeds N)
    method: str | None = None
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def id(self) -> str:
        return (f"{short_name(self.source)}/fold{self.fold}" + (f"/{self.method}" if self.method else "")
                + (f"/seed{self.seed}" if self.seed is not None else ""))

    @property
    def method_name(self) -> str:
        """The method whose training this is (the source-model method for a source model)."""
        return self.method or baseline_method()


@dataclass(frozen=True)
class TrialGroup:
    """The trials of one (scenario, method, fold); Optuna and ASHA work within a group."""

    scenario: Scenario
    method: str
    fold: int
    trials: int
    space: dict[str, dict[str, Any]]
    overrides: dict[str, Any]
    epochs: int
    pretrain_key: str | None
    baseline: bool = False
    seed: int | None = None  # set when the launch repeats over seeds (--seeds N); else the launch's seed

    @property
    def id(self) -> str:
        return f"{self.scenario.name}/{self.method}/fold{self.fold}" + (
            f"/seed{self.seed}" if self.seed is not None else "")

    @property
    def searched(self) -> bool:
        return bool(self.space) and self.trials > 0


@dataclass
class LaunchPlan:
    """Everything a launch runs; saved as JSON next to the Tune results so ``--resume`` replays it."""

    experiment: str
    profile: str
    objective: str
    seed: int
    data_root: str
    cache_dir: str
    data: dict[str, Any]
    pretrain: dict[str, Any]
    folds: list[int]
    scenarios: list[Scenario]
    methods: list[str]
    pretrain_tasks: list[PretrainTask]
    groups: list[TrialGroup]
    scheduler: Scheduler
    retries: int
    resources: Resources
    search: bool
    baseline: bool
    synthetic_data: bool = False
    extra: dict[str, Any] = field(default_factory=dict)
    seeds: int = 1  # each (scenario, method, fold) repeated over seeds seed .. seed + seeds - 1
    precision: str = "fp32"  # the training steps' precision (timematch.training.Execution)
    cuda_graph: bool = True  # on a GPU, the training step captured once and replayed

    @property
    def n_trials(self) -> int:
        return sum(g.trials for g in self.groups)

    @property
    def tiles(self) -> list[str]:
        """Every tile a scenario of the launch reads (source or target), sorted."""
        return sorted({tile for scenario in self.scenarios for tile in (scenario.source, scenario.target)})

    def group(self, group_id: str) -> TrialGroup:
        for group in self.groups:
            if group.id == group_id:
                return group
        raise KeyError(group_id)

    def task(self, key: str) -> PretrainTask:
        for task in self.pretrain_tasks:
            if task.key == key:
                return task
        raise KeyError(key)

    def data_config(self) -> DataConfig:
        return DataConfig.from_dict(self.data)

    def spec(self, group: TrialGroup, params: dict[str, Any] | None = None) -> ExperimentSpec:
        """The experiment of one trial: profile overrides, then the sampled ``params``."""
        return base_spec(self, group.scenario.source, group.scenario.target, group.fold, group.seed).replace(
            method=group.method, method_config={**group.overrides, **(params or {})},
        )

    def pretrain_spec(self, task: PretrainTask) -> ExperimentSpec:
        """The spec whose :func:`~timematch.experiment.pretrain_source` training is ``task``."""
        spec = base_spec(self, task.source, task.source, task.fold, task.seed)
        return spec if task.method is None else spec.replace(method=task.method, method_config=dict(task.config))

    def resolved_config(self, group: TrialGroup, params: dict[str, Any] | None = None) -> dict[str, Any]:
        """The full method config of a trial (source_only: the source model's training config)."""
        spec = self.spec(group, params)
        overrides = dict(spec.method_config)
        if get_method(group.method).evaluates_source_model:
            overrides = {**spec.pretrain_config, **overrides}
        return dataclasses.asdict(build_config(group.method, overrides))

    def resolved_pretrain_config(self, task: PretrainTask) -> dict[str, Any]:
        """The full config of ``task``'s training."""
        training = source_training_spec(self.pretrain_spec(task))
        return dataclasses.asdict(build_config(training.method, training.method_config))

    def default_point(self, group: TrialGroup) -> dict[str, Any] | None:
        """The defaults (published, then profile) of a group's searched keys, when its space holds them."""
        if not group.space:
            return None
        resolved = self.resolved_config(group)
        point = {key: resolved[key] for key in group.space}
        return point if contains(group.space, point) else None

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1, default=str)

    @classmethod
    def from_json(cls, text: str) -> "LaunchPlan":
        raw = json.loads(text)
        raw["scenarios"] = [Scenario(**s) for s in raw["scenarios"]]
        raw["pretrain_tasks"] = [PretrainTask(**{**t, "scenarios": tuple(t["scenarios"])})
                                 for t in raw["pretrain_tasks"]]
        raw["groups"] = [TrialGroup(**{**g, "scenario": Scenario(**g["scenario"])}) for g in raw["groups"]]
        raw["scheduler"] = Scheduler(**raw["scheduler"])
        raw["resources"] = Resources(**raw["resources"])
        return cls(**raw)


def check_embedded_root(plan: LaunchPlan) -> None:
    """A launch on the embedded dataset must find it where its plan says (``--resume`` after a
    change of ``$TIMEMATCH_CACHE`` or of the generator version would train on other data)."""
    from timematch.data.embedded import embedded_root

    current = str(embedded_root().resolve())
    if current != plan.data_root:
        raise ConfigError(
            f"--resume: launch of experiment {plan.experiment!r} ran on the embedded dataset at {plan.data_root}, "
            f"but here it is {current} ($TIMEMATCH_CACHE or the generator version changed); set TIMEMATCH_CACHE "
            "back to the launch's cache, or start a new launch without --resume"
        )


def source_model_path(cache_dir: str | Path, key: str) -> Path:
    """Where the source model with :func:`~timematch.experiment.pretrain_key` ``key`` is cached."""
    return Path(cache_dir) / "source_models" / f"{key}.pt"


def base_spec(plan: LaunchPlan, source: str, target: str, fold: int, seed: int | None = None) -> ExperimentSpec:
    return ExperimentSpec(
        data_root=Path(plan.data_root), source=source, target=target, method=baseline_method(), fold=fold,
        pretrain_config=dict(plan.pretrain), data=plan.data_config(), seed=plan.seed if seed is None else seed,
        cache_dir=Path(plan.cache_dir), precision=plan.precision, cuda_graph=plan.cuda_graph,
    )


@dataclass(frozen=True)
class PlanRequest:
    """What the command line asked for, already parsed."""

    experiment: str
    scenarios: list[Scenario]
    methods: MethodChoice
    profile: Profile
    folds: list[int]
    trials: int
    objective: str
    seed: int
    data_root: Path
    cache_dir: Path
    spaces_dir: Path
    baseline: bool = True
    synthetic_data: bool = False
    seeds: int = 1
    precision: str = "fp32"
    cuda_graph: bool = True


@dataclass(frozen=True)
class PlanChoices:
    """What the command line chose, as the user wrote it (``--scenario all``, ``--folds 0,2``...)."""

    experiment: str
    scenario: str = "all"
    method: str = "all"
    profile: str = "quick"
    sets: tuple[str, ...] = ()
    folds: str | None = None
    trials: int | None = None  # None: the profile's; 0: the defaults only
    objective: str = "target_val_f1"
    seed: int = 0
    seeds: int = 1
    baseline: bool = True
    precision: str = "fp32"
    cuda_graph: bool = True


def plan_from_choices(choices: PlanChoices, project_root: Path, data_root: Path, synthetic_data: bool,
                      cache_dir: Path) -> LaunchPlan:
    """The plan of a launch from the command line's choices, in one call: scenarios
    (``experiments/scenarios.yaml``), methods, profile (``experiments/profiles/``) and folds
    resolved and checked (errors name the option), then :func:`build_plan`."""
    from timematch.runner.profiles import load_profile
    from timematch.runner.scenarios import load_scenarios, parse_scenarios

    root = Path(project_root)
    known = load_scenarios(root / "experiments" / "scenarios.yaml")
    with named_option("--scenario"):
        scenarios = parse_scenarios(choices.scenario, known)
    with named_option("--method"):
        methods = parse_methods(choices.method)
    profile = load_profile(root / "experiments" / "profiles", choices.profile, list(choices.sets))
    trials = choices.trials if choices.trials is not None else profile.trials
    folds = parse_folds(choices.folds, profile, profile.data_config().n_folds)
    return build_plan(PlanRequest(
        experiment=choices.experiment, scenarios=scenarios, methods=methods, profile=profile, folds=folds,
        trials=trials, objective=choices.objective, seed=choices.seed, seeds=choices.seeds, data_root=data_root,
        cache_dir=cache_dir, spaces_dir=root / "search_spaces", baseline=choices.baseline,
        synthetic_data=synthetic_data, precision=choices.precision, cuda_graph=choices.cuda_graph,
    ))


def build_plan(request: PlanRequest) -> LaunchPlan:
    """Expand scenarios x methods x folds into pretrain tasks and trial groups; validate all."""
    profile = request.profile
    with named_option("--objective"):
        get_objective(request.objective)
    search = request.trials > 0
    plan = LaunchPlan(
        experiment=request.experiment, profile=profile.name, objective=request.objective, seed=request.seed,
        data_root=str(Path(request.data_root).expanduser().resolve()),
        cache_dir=str(Path(request.cache_dir).expanduser().resolve()), data=dict(profile.data),
        pretrain=dict(profile.pretrain), folds=list(request.folds), scenarios=list(request.scenarios),
        methods=[], pretrain_tasks=[], groups=[], scheduler=profile.scheduler, retries=profile.retries,
        resources=profile.resources, search=search, baseline=request.baseline,
        synthetic_data=request.synthetic_data, seeds=request.seeds, precision=request.precision,
        cuda_graph=request.cuda_graph,
    )
    if request.seeds < 1:
        raise ConfigError(f"--seeds {request.seeds}: at least 1 (each scenario x method x fold runs once per seed)")
    spaces = {}
    for method in request.methods.methods:
        if search and method in request.methods.searched:
            spaces[method] = load_space(request.spaces_dir, method)
    baseline_name = baseline_method()
    methods = [m for m in request.methods.methods if m != baseline_name or m in request.methods.searched]
    if request.baseline and baseline_name not in methods:
        methods.insert(0, baseline_name)
    if not methods:
        raise ConfigError("nothing to run: --no-baseline removed the only method; name a method with --method")
    plan.methods = methods
    groups: list[TrialGroup] = []
    tasks: dict[str, PretrainTask] = {}
    seeds = [None] if request.seeds == 1 else [request.seed + i for i in range(request.seeds)]
    for seed, fold, scenario, method in itertools.product(seeds, request.folds, request.scenarios, methods):
        searched = method in spaces
        is_baseline_method = method == baseline_name
        baseline = is_baseline_method and not searched
        overrides = profile.method_overrides(method)
        config = build_config(method, {**profile.pretrain, **overrides} if is_baseline_method else overrides)
        space = spaces.get(method, {})
        epochs = int(space.get("epochs", {}).get("high", config.epochs)) if "epochs" in space else config.epochs
        training = _source_training(method, overrides, config, space)
        key = None
        if training is not None:
            training_method, training_config = training
            spec = base_spec(plan, scenario.source, scenario.source, fold, seed)
            if training_method is not None:
                spec = spec.replace(method=training_method, method_config=dict(training_config))
            key = pretrain_key(spec)
            task = tasks.get(key)
            names = (task.scenarios if task else ()) + (scenario.name,)
            tasks[key] = PretrainTask(key, scenario.source, fold, tuple(dict.fromkeys(names)), seed,
                                      training_method, dict(training_config))
        groups.append(TrialGroup(
            scenario=scenario, method=method, fold=fold, trials=request.trials if searched else 1,
            space=space, overrides=overrides, epochs=max(1, epochs), pretrain_key=key, baseline=baseline,
            seed=seed,
        ))
    # Baselines first (cheap, and the table's reference), then the searches in plan order.
    plan.groups = [g for g in groups if g.baseline] + [g for g in groups if not g.baseline]
    plan.pretrain_tasks = list(tasks.values())
    return plan


def _source_training(method: str, overrides: dict[str, Any], config: Any, space: dict[str, Any]
                     ) -> tuple[str | None, dict[str, Any]] | None:
    """The training on the source tile alone that a group's default trial uses, as
    ``(method, config)`` of a :class:`PretrainTask` (method None: the source model), or None.

    Adaptation methods start from the source model and the source-only baseline evaluates it.
    A method trained from scratch on the source alone (shift augmentation) is trained once per
    source tile with its default config and evaluated in each of the tile's scenarios; a
    searched group's sampled configs (trials after the first) train in their own trials.
    """
    cls = get_method(method)
    if cls.evaluates_source_model or cls.starts_from_source:
        return None, {}
    if not cls.trained_on_source_alone():
        return None
    if space and not contains(space, {key: getattr(config, key) for key in space}):
        return None  # the first trial is sampled, not the defaults: nothing to share
    return method, dict(overrides)


def describe(plan: LaunchPlan, resources: dict[str, Any] | None = None, cached: set[str] | None = None) -> str:
    """A readable summary of the plan (``--dry-run`` prints it)."""
    objective = get_objective(plan.objective)
    cached = cached or set()
    lines = [
        f"experiment {plan.experiment!r}, profile {plan.profile!r}, seed {plan.seed}"
        + (f", {plan.seeds} seeds ({plan.seed}..{plan.seed + plan.seeds - 1})" if plan.seeds > 1 else ""),
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
    for method in dict.fromkeys(t.method for t in plan.pretrain_tasks if t.method):
        overrides = next(t.config for t in plan.pretrain_tasks if t.method == method)
        lines.append(f"  {method}: its training reads the source tile alone; its trials evaluate it on each "
                     f"target (overrides {overrides or '{}'})")
    lines += ["", f"stage 2, adaptation: {len(plan.groups)} groups, {plan.n_trials} trials "
                  f"(Optuna TPE per group, ASHA over epochs: {plan.scheduler}; retries {plan.retries})"]
    group_width = max([28, *(len(g.id) for g in plan.groups)])
    for group in plan.groups:
        how = "baseline, default config" if group.baseline else (
            f"{group.trials} trials over {', '.join(group.space)}" if group.searched else "1 trial, default config")
        shared = next((t for t in plan.pretrain_tasks if t.key == group.pretrain_key and t.method == group.method), None)
        if shared is not None:
            how += f" (the defaults: evaluates {shared.id} of stage 1)"
        lines.append(f"  {group.id:<{group_width}} {how}; {group.epochs} epochs; overrides {group.overrides or '{}'}")
    if resources:
        lines += ["", "resources: " + ", ".join(f"{k} {v}" for k, v in resources.items())]
    return "\n".join(lines)

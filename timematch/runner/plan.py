"""The plan of a launch: scenarios x methods x folds, expanded from config, checked before any work.

A plan has two stages:

1. *pretrain*: one :class:`PretrainTask` per (source tile, fold, settings) that some trial
   starts from; each is trained once and cached under ``<cache>/source_models/<key>.pt``
   (the key is :attr:`timematch.experiment.SourceTraining.key`), so later launches reuse it.
2. *adapt*: one :class:`TrialGroup` per (scenario, method, fold); a group runs ``trials``
   trials, Optuna sampling the method's search space (the first trial is the profile's
   defaults), or one trial with the defaults when it is not searched. The ``source_only``
   baseline (the pretrained source model evaluated on the target) is a group of one
   default trial per scenario x fold.

Nothing here imports Ray or MLflow: the plan is built and printed (``--dry-run``) in a
second or two, and every error surfaces before a Ray cluster is touched.

The command line's choices become a plan in :mod:`.choices`; :mod:`.describe` prints one.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from timematch.arrays import array_reason
from timematch.data.dataset import DataConfig
from timematch.data.embedded import embedded_root
from timematch.data.tiles import short_name
from timematch.errors import ConfigError, named_option
from timematch.experiment import EPOCH_METRICS, ExperimentSpec, source_training
from timematch.selection import CRITERIA, ORACLE
from timematch.methods import build_config, get_method, source_model_method
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


@dataclass(frozen=True)
class PretrainTask:
    """One training on a source tile alone (:class:`~timematch.experiment.SourceTraining`),
    trained once and shared by every scenario of the tile that needs it: the source model
    (``method`` the source-model method, with the profile's ``pretrain`` settings), which
    adaptation methods start from and the source-only baseline evaluates; or the training of a
    method trained from scratch on the source alone (``method``, e.g. ``shift_aug``, with the
    profile's ``config`` for it), which each of its scenarios' trials evaluates on its target."""

    key: str
    source: str
    fold: int
    scenarios: tuple[str, ...]
    method: str
    seed: int | None = None  # set when the launch repeats over seeds (--seeds N)
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def is_source_model(self) -> bool:
        return self.method == baseline_method()

    @property
    def id(self) -> str:
        return (f"{short_name(self.source)}/fold{self.fold}" + ("" if self.is_source_model else f"/{self.method}")
                + (f"/seed{self.seed}" if self.seed is not None else ""))


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
    profile_description: str = ""  # what the profile is for and what its budgets can show
    array: int = 1  # trials of one group trained as one fused model (--array; timematch.arrays)
    array_reason: str = ""  # how --array auto chose
    #: {tile folder: fingerprint} of the tiles the driver packed and checked before the trials
    #: started (timematch.data.packed.trust_fingerprints): trials load those caches unchecked
    tile_fingerprints: dict[str, str] = field(default_factory=dict)

    @property
    def n_trials(self) -> int:
        return sum(g.trials for g in self.groups)

    def array_sizes(self, group: TrialGroup) -> list[int]:
        """The sizes of the arrays ``group``'s trials run in; empty: they run one by one (arrays
        of one, today's path), as for a group that is not searched or whose method cannot share
        an array (:func:`timematch.arrays.array_reason`)."""
        method = get_method(group.method)
        if self.array <= 1 or not group.searched or group.trials < 2 or array_reason(method) \
                or not method.starts_from_source:
            return []
        count = -(-group.trials // self.array)  # as few arrays as --array allows, as even as can be
        small, extra = divmod(group.trials, count)
        return [small + 1] * extra + [small] * (count - extra)

    @property
    def tune_trials(self) -> int:
        """Ray Tune's trials: one per array, one per trial outside arrays."""
        return sum(len(self.array_sizes(g)) or g.trials for g in self.groups)

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
        return base_spec(self, task.source, task.source, task.fold, task.seed).replace(
            method=task.method, method_config=dict(task.config))

    def resolved_config(self, group: TrialGroup, params: dict[str, Any] | None = None) -> dict[str, Any]:
        """The full method config of a trial (source_only: the source model's training config)."""
        spec = self.spec(group, params)
        overrides = dict(spec.method_config)
        if get_method(group.method).evaluates_source_model:
            overrides = {**spec.pretrain_config, **overrides}
        return dataclasses.asdict(build_config(group.method, overrides))

    def resolved_pretrain_config(self, task: PretrainTask) -> dict[str, Any]:
        """The full config of ``task``'s training."""
        training = source_training(self.pretrain_spec(task)).spec
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
        raw["pretrain_tasks"] = [PretrainTask(**{**t, "scenarios": tuple(t["scenarios"]),
                                                 "method": t["method"] or baseline_method()})  # None: before 2026-12
                                 for t in raw["pretrain_tasks"]]
        raw["groups"] = [TrialGroup(**{**g, "scenario": Scenario(**g["scenario"])}) for g in raw["groups"]]
        raw["scheduler"] = Scheduler(**raw["scheduler"])
        raw["resources"] = Resources(**raw["resources"])
        return cls(**raw)


def resolve_array(requested: int | str, gpus: float = 0.0) -> tuple[int, str]:
    """``--array``: (trials per array, how it was chosen)."""
    if requested != "auto":
        return int(requested), "--array"
    where = "a GPU, whose array curve is not measured yet (benchmarks/gpu_session.sh)" if gpus > 0 else "a CPU"
    return 1, f"auto: 1 on {where}"


def check_embedded_root(plan: LaunchPlan) -> None:
    """A launch on the embedded dataset must find it where its plan says (``--resume`` after a
    change of ``$TIMEMATCH_CACHE`` or of the generator version would train on other data)."""
    current = str(embedded_root().resolve())
    if current != plan.data_root:
        raise ConfigError(
            f"--resume: launch of experiment {plan.experiment!r} ran on the embedded dataset at {plan.data_root}, "
            f"but here it is {current} ($TIMEMATCH_CACHE or the generator version changed); set TIMEMATCH_CACHE "
            "back to the launch's cache, or start a new launch without --resume"
        )


def source_model_path(cache_dir: str | Path, key: str) -> Path:
    """Where the training on a source tile with key ``key`` (:class:`~timematch.experiment.SourceTraining`)
    keeps its model."""
    return Path(cache_dir) / "source_models" / f"{key}.pt"


def source_model_state_path(cache_dir: str | Path, key: str) -> Path:
    """Where that training keeps its resumable state until its model is stored: beside it, in
    the cache, so that another launch that needs the same model may be the one to finish it."""
    return Path(cache_dir) / "source_models" / f"{key}.partial.pt"


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


def build_plan(request: PlanRequest) -> LaunchPlan:
    """Expand scenarios x methods x folds into pretrain tasks and trial groups; validate all."""
    profile = request.profile
    with named_option("--objective"):
        get_objective(request.objective)
    search = request.trials > 0
    plan = LaunchPlan(
        experiment=request.experiment, profile=profile.name, profile_description=profile.description,
        objective=request.objective, seed=request.seed,
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
        group = TrialGroup(
            scenario=scenario, method=method, fold=fold, trials=request.trials if searched else 1,
            space=space, overrides=overrides, epochs=max(1, epochs), pretrain_key=None, baseline=baseline,
            seed=seed,
        )
        task = _shared_training(plan, group, config)
        if task is not None:
            known = tasks.get(task.key)
            names = (known.scenarios if known else ()) + (scenario.name,)
            tasks[task.key] = dataclasses.replace(task, scenarios=tuple(dict.fromkeys(names)))
            group = dataclasses.replace(group, pretrain_key=task.key)
        groups.append(group)
    # Baselines first (cheap, and the table's reference), then the searches in plan order.
    plan.groups = [g for g in groups if g.baseline] + [g for g in groups if not g.baseline]
    plan.pretrain_tasks = list(tasks.values())
    return plan


def _shared_training(plan: LaunchPlan, group: TrialGroup, config: Any) -> PretrainTask | None:
    """The stage-1 task of the training on the source tile alone that ``group``'s default trial
    (``config``) uses (:func:`~timematch.experiment.source_training`), or None.

    Adaptation methods start from the source model and the source-only baseline evaluates it.
    A method trained from scratch on the source alone (shift augmentation) is trained once per
    source tile with its default config and evaluated in each of the tile's scenarios; a
    searched group's sampled configs (trials after the first) train in their own trials, and
    when its first trial is sampled too (the defaults lie outside the space) nothing is shared.
    """
    spec = plan.spec(group)
    training = source_training(spec)
    if training is None:
        return None
    space = group.space
    if not training.is_source_model and space and not contains(space, {k: getattr(config, k) for k in space}):
        return None
    overrides = {} if training.is_source_model else dict(spec.method_config)
    return PretrainTask(training.key, group.scenario.source, group.fold, (), training.method, group.seed, overrides)

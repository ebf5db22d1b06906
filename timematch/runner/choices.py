"""The command line's choices, as the user wrote them, made into a plan: ``--scenario all``,
``--method paper,mad``, ``--folds 0,2``, the profile and its ``--set`` overrides, each
resolved and checked with errors that name the option (:func:`plan_from_choices`), then
expanded by :func:`~timematch.runner.plan.build_plan`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from timematch.errors import ConfigError, named_option
from timematch.methods import get_method, methods_in_table_order
from timematch.runner.plan import LaunchPlan, MethodChoice, PlanRequest, baseline_method, build_plan
from timematch.runner.profiles import Profile, load_profile
from timematch.runner.scenarios import load_scenarios, parse_scenarios


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

"""The runner's plan: scenarios, methods, profiles, search spaces and the expanded grid (no Ray)."""

from __future__ import annotations

from pathlib import Path

import optuna.distributions as od
import pytest
import yaml

from timematch.errors import ConfigError
from timematch.experiment import source_training
from timematch.methods import config_fields, method_names, methods_in_table_order
from timematch.runner.choices import parse_folds, parse_methods
from timematch.runner.plan import (
    LaunchPlan, PlanRequest, build_plan, get_objective, source_model_path,
)
from timematch.runner.profiles import apply_sets, load_profile
from timematch.runner.scenarios import all_pairs, load_scenarios, make_scenario, parse_scenarios
from timematch.runner.search_space import contains, load_space, to_optuna, validate_space

REPO = Path(__file__).resolve().parents[1]
PROFILES = REPO / "experiments" / "profiles"
SPACES = REPO / "search_spaces"
PAPER_SCENARIOS = ["DK-FR1", "DK-FR2", "DK-AT1", "FR1-DK", "FR1-FR2"]


@pytest.fixture(scope="module")
def named():
    return load_scenarios(REPO / "experiments" / "scenarios.yaml")


# -- scenarios --------------------------------------------------------------------------


def test_all_is_the_five_paper_scenarios_in_order(named):
    scenarios = parse_scenarios("all", named)
    assert [s.name for s in scenarios] == PAPER_SCENARIOS
    assert scenarios[0].source == "denmark/32VNH/2017" and scenarios[0].target == "france/30TXT/2017"


def test_pairs_is_every_ordered_pair_of_the_four_tiles(named):
    pairs = parse_scenarios("pairs", named)
    assert len(pairs) == 12 == len({(s.source, s.target) for s in pairs})
    assert all(s.source != s.target for s in pairs)


@pytest.mark.parametrize("text, expected", [
    ("DK-FR1", [("DK", "FR1")]),
    ("dk-fr1", [("DK", "FR1")]),
    ("AT1:DK", [("AT1", "DK")]),
    ("AT1-DK", [("AT1", "DK")]),
    ("DK->FR2", [("DK", "FR2")]),
    ("denmark/32VNH/2017:austria/33UVP/2017", [("DK", "AT1")]),
    ("DK-FR1, DK:FR1, FR1-FR2", [("DK", "FR1"), ("FR1", "FR2")]),  # duplicates dropped, order kept
])
def test_scenario_forms(named, text, expected):
    assert [(s.source_short, s.target_short) for s in parse_scenarios(text, named)] == expected


def test_a_named_pair_keeps_its_name_and_a_new_pair_gets_one(named):
    assert parse_scenarios("DK:FR1", named)[0].name == "DK-FR1"
    assert parse_scenarios("FR2:AT1", named)[0].name == "FR2-AT1"


@pytest.mark.parametrize("text, fragment", [
    ("DK-XX", "unknown scenario 'DK-XX'"),
    ("nowhere", "unknown scenario"),
    ("DK:XX", "unknown tile 'XX'"),
    ("DK:DK", "adapts a tile to itself"),
    ("", "--scenario is empty"),
])
def test_bad_scenarios_list_the_choices(named, text, fragment):
    with pytest.raises(ConfigError) as info:
        parse_scenarios(text, named)
    message = str(info.value)
    assert fragment in message
    assert "DK" in message and ("FR1" in message)


def test_scenario_file_errors(tmp_path):
    path = tmp_path / "scenarios.yaml"
    path.write_text("scenarios:\n  A: {source: DK, target: XX}\n")
    with pytest.raises(ConfigError, match="scenario 'A'.*unknown tile 'XX'"):
        load_scenarios(path)
    path.write_text("scenarios:\n  A: {source: DK}\n")
    with pytest.raises(ConfigError, match="exactly the keys"):
        load_scenarios(path)


def test_all_pairs_have_short_names():
    assert {s.name for s in all_pairs()} >= {"DK-FR1", "AT1-FR2"}
    assert make_scenario("FR1", "DK").to_dict() == {"name": "FR1-DK", "source": "france/30TXT/2017",
                                                    "target": "denmark/32VNH/2017"}


# -- methods, objectives, folds ---------------------------------------------------------


def test_method_all_searches_everything_but_the_baseline():
    choice = parse_methods("all")
    # every registered method, in the paper's table order (each class's table_order)
    assert list(choice.methods) == methods_in_table_order() and sorted(choice.methods) == method_names()
    assert choice.methods[0] == "source_only" and choice.methods[-1] == "raincoat"
    assert "source_only" not in choice.searched
    assert set(choice.searched) == set(method_names()) - {"source_only"}


def test_method_paper_is_the_papers_table_and_the_later_methods_follow_it():
    paper = parse_methods("paper")
    assert paper.methods == ("source_only", "shift_aug", "mmd", "dann", "cdan", "cdan_e", "jumbot", "alda",
                             "fixmatch", "timematch", "upper_bound")
    assert "source_only" not in paper.searched
    assert parse_methods("all").methods[len(paper.methods):] == ("mad", "cmad", "raincoat")
    assert parse_methods("paper,mad").methods == (*paper.methods, "mad")


def test_method_lists_and_explicit_source_only():
    choice = parse_methods("timematch, fixmatch,timematch")
    assert choice.methods == ("timematch", "fixmatch")
    assert parse_methods("source_only").searched == {"source_only"}


def test_unknown_method_lists_the_valid_ones():
    with pytest.raises(ConfigError) as info:
        parse_methods("timematch,dan")
    assert "unknown method 'dan'" in str(info.value)
    for name in method_names():
        assert name in str(info.value)


def test_objectives():
    assert get_objective("target_val_f1").uses_target_labels
    assert not get_objective("source_val_f1").uses_target_labels
    assert not get_objective("target_im_score").uses_target_labels
    with pytest.raises(ConfigError, match="valid: target_val_f1.*source_val_f1.*target_im_score"):
        get_objective("test_macro_f1")  # the test split is never a selection criterion


def test_folds():
    profile = load_profile(PROFILES, "paper")
    assert parse_folds(None, profile, 3) == [0, 1, 2]
    assert parse_folds("2", profile, 3) == [0, 1]
    assert parse_folds("2,0", profile, 3) == [0, 2]
    for bad in ("3,0", "0", "x", "4"):
        with pytest.raises(ConfigError, match="--folds"):
            parse_folds(bad, profile, 3)


# -- profiles ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["quick", "paper", "smoke"])
def test_shipped_profiles_are_valid(name):
    profile = load_profile(PROFILES, name)
    assert profile.folds >= 1 and profile.trials >= 0
    assert profile.data["min_parcels"] == (200 if name == "paper" else 50)


def test_paper_profile_has_the_published_budgets():
    profile = load_profile(PROFILES, "paper")
    assert profile.folds == 3
    assert profile.method_overrides("timematch") == {"epochs": 20, "steps_per_epoch": 500}
    assert profile.pretrain == {"epochs": 100}


def test_unknown_profile_lists_the_profiles():
    with pytest.raises(ConfigError, match="unknown profile 'fast'; valid profiles: paper, quick, smoke"):
        load_profile(PROFILES, "fast")


def test_set_overrides_and_their_errors():
    profile = load_profile(PROFILES, "smoke", ["methods.timematch.epochs=3", "data.min_parcels=20", "trials=4"])
    assert profile.methods["timematch"]["epochs"] == 3 and profile.data["min_parcels"] == 20 and profile.trials == 4
    assert apply_sets({"a": 1}, []) == {"a": 1}
    with pytest.raises(ConfigError, match="unknown profile section 'method'"):
        load_profile(PROFILES, "smoke", ["method.timematch.epochs=3"])
    with pytest.raises(ConfigError, match="SECTION.KEY=VALUE"):
        load_profile(PROFILES, "smoke", ["methods.timematch.epochs"])
    with pytest.raises(ConfigError, match="unknown config key.*'epoch'"):
        load_profile(PROFILES, "smoke", ["methods.timematch.epoch=3"])
    with pytest.raises(ConfigError, match="unknown data config key"):
        load_profile(PROFILES, "smoke", ["data.min_parcel=3"])
    with pytest.raises(ConfigError, match="methods: unknown method 'timmatch'"):
        load_profile(PROFILES, "smoke", ["methods.timmatch.epochs=3"])
    with pytest.raises(ConfigError, match="lr=-1.*out of range"):
        load_profile(PROFILES, "smoke", ["pretrain.lr=-1"])
    with pytest.raises(ConfigError, match="reduction_factor"):
        load_profile(PROFILES, "smoke", ["scheduler.reduction_factor=1"])


# -- search spaces ----------------------------------------------------------------------


@pytest.mark.parametrize("method", method_names())  # the registry: a new method is tested as it registers
def test_every_method_has_a_valid_search_space_that_holds_its_defaults(method):
    space = load_space(SPACES, method)
    assert space and set(space) <= set(config_fields(method))
    assert all(isinstance(d, od.BaseDistribution) for d in to_optuna(space).values())
    defaults = config_fields(method)
    # the first trial of a search is the published defaults: the space must contain them
    assert contains(space, {key: defaults[key] for key in space}), f"{method}'s defaults are outside its space"


def test_the_methods_package_finds_its_modules_and_each_registers_its_method():
    import timematch.methods as methods

    # one module per method, named as it registers; a module may register a variant as well
    # (mad.py: MAD and C-MAD)
    assert set(methods.METHOD_MODULES) <= set(method_names())
    homes = {name: methods.get_method(name).__module__ for name in method_names()}
    assert set(homes.values()) == {f"timematch.methods.{m}" for m in methods.METHOD_MODULES}
    assert {name for name, home in homes.items() if home != f"timematch.methods.{name}"} == {"cmad"}


def test_shipped_spaces_cover_the_required_keys():
    required = {"pseudo_threshold", "trade_off", "ema_decay", "lr"}
    assert set(load_space(SPACES, "timematch")) >= required | {"max_temporal_shift"}
    assert set(load_space(SPACES, "fixmatch")) >= required
    assert "max_temporal_shift" not in load_space(SPACES, "fixmatch")
    for method in ("source_only", "upper_bound"):
        assert set(load_space(SPACES, method)) == {"lr", "weight_decay"}


def test_space_to_optuna():
    space = validate_space({
        "lr": {"type": "float", "low": 1e-5, "high": 1e-3, "log": True},
        "max_temporal_shift": {"type": "int", "low": 30, "high": 90, "step": 10},
        "ema_decay": {"type": "categorical", "choices": [0.99, 0.9999]},
    }, "timematch")
    dists = to_optuna(space)
    assert dists["lr"] == od.FloatDistribution(1e-5, 1e-3, log=True)
    assert dists["max_temporal_shift"] == od.IntDistribution(30, 90, step=10)
    assert dists["ema_decay"] == od.CategoricalDistribution([0.99, 0.9999])
    assert contains(space, {"lr": 1e-4, "max_temporal_shift": 60, "ema_decay": 0.9999})
    assert not contains(space, {"lr": 1e-4, "max_temporal_shift": 65, "ema_decay": 0.9999})
    assert not contains(space, {"lr": 1e-2, "max_temporal_shift": 60, "ema_decay": 0.9999})


@pytest.mark.parametrize("document, fragment", [
    ({"max_temporal_shift": {"type": "int", "low": 0, "high": 60}}, "not a config key of method 'fixmatch'"),
    ({"lr": {"type": "float", "low": 1e-3, "high": 1e-5}}, "low=0.001 > high=1e-05"),
    ({"lr": {"type": "float", "low": 0.0, "high": 1e-3, "log": True}}, "log scale needs low > 0"),
    ({"lr": {"type": "float", "low": -1.0, "high": 1e-3, "log": True}}, "log scale needs low > 0"),
    ({"lr": {"type": "uniform", "low": 0.1, "high": 0.2}}, "expected {type: float | int | categorical"),
    ({"lr": {"type": "float", "low": 0.1}}, "missing ['high']"),
    ({"lr": {"type": "float", "low": 0.1, "high": 0.2, "q": 2}}, "unknown field(s) ['q']"),
    ({"pseudo_threshold": {"type": "float", "low": 0.0, "high": 0.9}}, "rejected by the method's config"),
    ({"ema_decay": {"type": "categorical", "choices": []}}, "non-empty list"),
    ({"ema_decay": {"type": "categorical", "choices": [0.9, 1.5]}}, "value 1.5 is rejected"),
    ({"epochs": {"type": "float", "low": 1, "high": 5}}, "is an integer"),
    ({"domain_specific_bn": {"type": "float", "low": 0, "high": 1}}, "not numeric"),
    ({"epochs": {"type": "int", "low": 1, "high": 5, "step": 0}}, "step=0"),
    ([], "expected a mapping"),
])
def test_bad_search_spaces(document, fragment):
    with pytest.raises(ConfigError) as info:
        validate_space(document, "fixmatch", "spaces/fixmatch.yaml")
    assert fragment in str(info.value)


def test_missing_search_space_file(tmp_path):
    (tmp_path / "timematch.yaml").write_text(yaml.safe_dump({"lr": {"type": "float", "low": 1e-4, "high": 1e-3}}))
    with pytest.raises(ConfigError, match="no search space for method 'fixmatch' .*timematch.*--no-search"):
        load_space(tmp_path, "fixmatch")


# -- the expanded plan ------------------------------------------------------------------


def _request(tmp_path, named, scenarios="DK-FR1,FR1-FR2", methods="timematch,fixmatch", profile="smoke",
             folds=(0,), trials=2, baseline=True, sets=(), spaces=SPACES, seed=0, seeds=1):
    return PlanRequest(
        experiment="t", scenarios=parse_scenarios(scenarios, named), methods=parse_methods(methods),
        profile=load_profile(PROFILES, profile, list(sets)), folds=list(folds), trials=trials,
        objective="target_val_f1", seed=seed, data_root=tmp_path / "data", cache_dir=tmp_path / "cache",
        spaces_dir=spaces, baseline=baseline, seeds=seeds,
    )


def test_seeds_repeat_every_group_and_source_model_with_their_own_seed(tmp_path, named):
    one = build_plan(_request(tmp_path, named, seed=7))
    two = build_plan(_request(tmp_path, named, seed=7, seeds=2))
    assert len(two.groups) == 2 * len(one.groups) and len(two.pretrain_tasks) == 2 * len(one.pretrain_tasks)
    assert {g.seed for g in two.groups} == {7, 8} and all(g.seed is None for g in one.groups)
    assert "DK-FR1/timematch/fold0/seed8" in {g.id for g in two.groups}
    assert len({g.id for g in two.groups}) == len(two.groups)
    for group in two.groups:  # each seed its own source model, its training seeded so
        assert plan_seed(two, group) == group.seed and group.pretrain_key == source_training(two.spec(group)).key
    assert len({t.key for t in two.pretrain_tasks}) == len(two.pretrain_tasks)
    assert LaunchPlan.from_json(two.to_json()).groups == two.groups  # --resume replays it
    with pytest.raises(ConfigError, match="--seeds 0: at least 1"):
        build_plan(_request(tmp_path, named, seeds=0))


def plan_seed(plan, group) -> int:
    return plan.spec(group).seed


def test_plan_expands_scenarios_methods_folds(tmp_path, named):
    plan = build_plan(_request(tmp_path, named, folds=(0, 1)))
    searched = [g for g in plan.groups if not g.baseline]
    assert len(searched) == 2 * 2 * 2 and all(g.trials == 2 and g.searched for g in searched)
    baselines = [g for g in plan.groups if g.baseline]
    assert {(g.scenario.name, g.fold) for g in baselines} == {(s, f) for s in ("DK-FR1", "FR1-FR2") for f in (0, 1)}
    assert all(g.method == "source_only" and g.trials == 1 and not g.space for g in baselines)
    assert plan.groups[: len(baselines)] == baselines  # the cheap reference runs first
    assert plan.n_trials == 8 * 2 + 4
    assert len({g.id for g in plan.groups}) == len(plan.groups)
    # one source model per (source tile, fold), shared by its scenarios and methods
    assert {(t.source, t.fold) for t in plan.pretrain_tasks} == {
        ("denmark/32VNH/2017", 0), ("denmark/32VNH/2017", 1), ("france/30TXT/2017", 0), ("france/30TXT/2017", 1)}
    for group in plan.groups:
        assert group.pretrain_key == source_training(plan.spec(group)).key


def test_source_models_are_shared_across_scenarios_and_keyed_by_settings(tmp_path, named):
    plan = build_plan(_request(tmp_path, named, scenarios="DK-FR1,DK-FR2,DK-AT1"))
    assert len(plan.pretrain_tasks) == 1 and plan.pretrain_tasks[0].scenarios == ("DK-FR1", "DK-FR2", "DK-AT1")
    other = build_plan(_request(tmp_path, named, scenarios="DK-FR1", sets=["pretrain.epochs=3"]))
    assert other.pretrain_tasks[0].key != plan.pretrain_tasks[0].key
    assert source_model_path(plan.cache_dir, "k") == Path(plan.cache_dir) / "source_models" / "k.pt"


def test_shift_augmentation_is_trained_once_per_source_tile_and_evaluated_in_each_scenario(tmp_path, named):
    plan = build_plan(_request(tmp_path, named, scenarios="all", methods="shift_aug,upper_bound", trials=1))
    shared = [t for t in plan.pretrain_tasks if t.method == "shift_aug"]
    assert [(t.id, t.scenarios) for t in shared] == [
        ("DK/fold0/shift_aug", ("DK-FR1", "DK-FR2", "DK-AT1")), ("FR1/fold0/shift_aug", ("FR1-DK", "FR1-FR2"))]
    models = [t for t in plan.pretrain_tasks if t.is_source_model]
    assert {t.method for t in models} == {"source_only"} and not any(t.is_source_model for t in shared)
    assert len(models) == 2 and not {t.key for t in models} & {t.key for t in shared}
    for group in plan.groups:
        if group.method == "shift_aug":  # its first trial (the defaults) evaluates the shared training
            task = plan.task(group.pretrain_key)
            assert task.method == "shift_aug" and group.scenario.name in task.scenarios
            assert group.pretrain_key == source_training(plan.spec(group, plan.default_point(group))).key
            assert plan.resolved_pretrain_config(task) == {**plan.resolved_config(group), "shift_aug": True}
        if group.method == "upper_bound":  # the source's classes and statistics: nothing to share
            assert group.pretrain_key is None
    pairs = build_plan(_request(tmp_path, named, scenarios="pairs", methods="shift_aug,upper_bound", trials=1))
    assert len([t for t in pairs.pretrain_tasks if t.method == "shift_aug"]) == 4
    assert len([g for g in pairs.groups if g.method == "upper_bound"]) == 12
    assert LaunchPlan.from_json(pairs.to_json()).pretrain_tasks == pairs.pretrain_tasks  # --resume replays it
    # defaults outside the searched space: the first trial is sampled, so nothing is shared
    outside = build_plan(_request(tmp_path, named, scenarios="all", methods="shift_aug", trials=2,
                                  sets=["methods.shift_aug.shift_aug_max=5"]))
    assert all(t.is_source_model for t in outside.pretrain_tasks) and all(
        g.pretrain_key is None for g in outside.groups if g.method == "shift_aug")


def test_no_search_and_no_baseline(tmp_path, named):
    plan = build_plan(_request(tmp_path, named, trials=0, baseline=False))
    assert [g.trials for g in plan.groups] == [1] * 4 and not any(g.space or g.baseline for g in plan.groups)
    assert plan.methods == ["timematch", "fixmatch"]


def test_upper_bound_needs_no_source_model(tmp_path, named):
    plan = build_plan(_request(tmp_path, named, methods="upper_bound", baseline=False))
    assert plan.pretrain_tasks == [] and all(g.pretrain_key is None for g in plan.groups)


def test_method_all_runs_source_only_as_the_baseline_only(tmp_path, named):
    plan = build_plan(_request(tmp_path, named, scenarios="DK-FR1", methods="all"))
    so = [g for g in plan.groups if g.method == "source_only"]
    assert len(so) == 1 and so[0].baseline and so[0].trials == 1
    explicit = build_plan(_request(tmp_path, named, scenarios="DK-FR1", methods="source_only"))
    assert [(g.baseline, g.trials, sorted(g.space)) for g in explicit.groups] == [(False, 2, ["lr", "weight_decay"])]


def test_resolved_config_layers_defaults_profile_and_samples(tmp_path, named):
    plan = build_plan(_request(tmp_path, named, scenarios="DK-FR1", methods="timematch"))
    group = next(g for g in plan.groups if g.method == "timematch")
    config = plan.resolved_config(group, {"lr": 3e-4})
    assert set(config) == set(config_fields("timematch"))
    assert config["lr"] == 3e-4 and config["epochs"] == 2 and config["pseudo_threshold"] == 0.9
    baseline = next(g for g in plan.groups if g.baseline)
    assert plan.resolved_config(baseline)["epochs"] == 2 and plan.resolved_config(baseline)["batch_size"] == 16
    # the first trial of a search is the defaults, when the space holds them
    assert plan.default_point(group) == {"pseudo_threshold": 0.9, "max_temporal_shift": 60, "trade_off": 2.0,
                                         "ema_decay": 0.9999, "lr": 1e-4}


def test_plan_survives_json(tmp_path, named):
    plan = build_plan(_request(tmp_path, named))
    again = LaunchPlan.from_json(plan.to_json())
    assert again == plan
    assert again.spec(again.groups[-1], {"lr": 1e-4}) == plan.spec(plan.groups[-1], {"lr": 1e-4})


def test_trial_configs_are_typed_and_strict():
    from timematch.runner.trial_config import AdaptConfig, TrainingConfig, config_key

    config = AdaptConfig("DK-FR1/timematch/fold0", 2, {"lr": 1e-3}).to_tune()
    assert AdaptConfig.of(config) == AdaptConfig("DK-FR1/timematch/fold0", 2, {"lr": 1e-3})
    assert config_key(config) == "DK-FR1/timematch/fold0" and config_key({"task": "k"}) == "k"
    assert TrainingConfig.of({"task": "k"}).task == "k"
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['gruop'\]"):
        AdaptConfig.of({"gruop": "x"})


def test_a_profile_budget_reaches_every_method_and_is_checked(tmp_path):
    quick = load_profile(PROFILES, "quick")
    for method in method_names():
        overrides = quick.method_overrides(method)
        if method == "source_only":
            assert overrides == {}  # its training is the profile's pretrain section
        else:
            assert {"epochs", "steps_per_epoch", "batch_size"} <= set(overrides)
    assert quick.method_overrides("timematch") == {"epochs": 4, "steps_per_epoch": 25, "batch_size": 64,
                                                   "sample_size": 16}
    assert quick.method_overrides("upper_bound")["epochs"] == 40
    with pytest.raises(ConfigError, match=r"budget: unknown key\(s\) \['lr'\]"):
        load_profile(PROFILES, "smoke", ["budget.lr=0.1"])
    with pytest.raises(ConfigError, match=r"budget \(for alda\): .*batch_size"):
        load_profile(PROFILES, "smoke", ["budget.batch_size=0"])


def test_a_launch_says_what_its_budgets_mean_on_its_tiles(tmp_path, named):
    from timematch.runner.describe import budget_at_scale

    plan = build_plan(_request(tmp_path, named, scenarios="DK-FR1", methods="timematch", profile="quick"))
    small = budget_at_scale(plan, {"denmark/32VNH/2017": 1400, "france/30TXT/2017": 1400})
    large = budget_at_scale(plan, {"denmark/32VNH/2017": 30000, "france/30TXT/2017": 30000})
    assert small[0] == "budgets on these tiles (parcels: DK 1,400, FR1 1,400):"
    # the quick profile's fixed steps: 1,000 x 128 source samples, 100 x 64 target samples
    assert "  source model on DK: 1,000 steps x 128 = 131 passes over DK's ~980 training parcels" in small
    assert "  source model on DK: 1,000 steps x 128 = 6.1 passes over DK's ~21,000 training parcels" in large
    assert "  timematch (DK-FR1): 100 steps x 64 = 0.30 passes over FR1's ~21,000 training parcels" in large
    assert large[-1] == ("  each epoch evaluates a fixed sample of at most 1,000 parcels per split part (validation "
                         "parts: DK ~3,000, FR1 ~3,000); a result, the whole test split")
    # the paper profile's source epochs are passes: their steps grow with the tile
    paper = build_plan(_request(tmp_path, named, scenarios="DK-FR1", methods="timematch", profile="paper", trials=0))
    assert "  source model on DK: 16,400 steps x 128 = 100 passes over DK's ~21,000 training parcels" in \
        budget_at_scale(paper, {"denmark/32VNH/2017": 30000, "france/30TXT/2017": 30000})

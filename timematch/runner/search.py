"""One Tune searcher and one scheduler over many independent searches.

The adaptation stage is a single Tuner whose trials belong to groups (scenario, method,
fold). Hyper-parameters must be searched *within* a group: TPE learns from the group's
own results, and ASHA compares a trial only with trials of its own group (F1 on DK -> FR1
says nothing about FR1 -> DK). So:

- :class:`GroupedSearch` holds one ``ConcurrencyLimiter(OptunaSearch(TPE))`` per searched
  group and a fixed default config for the others, and hands out trials group by group
  in plan order: a group gets new trials up to its concurrency limit, the free slots go to
  the next groups, so the cluster stays full while each TPE still sees finished trials.
- :class:`GroupedASHA` keeps one ``ASHAScheduler`` (on epochs, ``training_iteration``)
  per searched group.

Why one Tuner rather than one per group run in sequence: a group has a handful of trials,
fewer than a cluster has slots, so sequential Tuners would leave most of the cluster idle
(and idle between groups while a straggler finishes); one Tuner also gives one experiment
directory to resume and one stream of progress.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler
from ray.tune.search import ConcurrencyLimiter, Searcher
from ray.tune.search.optuna import OptunaSearch

from timematch.locks import cache_lock
from timematch.runner.plan import LaunchPlan, TrialGroup
from timematch.runner.search_space import to_optuna
from timematch.runner.trial_config import AdaptConfig, config_key


def optuna_storage(path: Path):
    """The persistent Optuna storage of an experiment's searches (SQLite at ``path``): one study
    per (launch, group), named ``<launch id> <group>``, which ``optuna-dashboard sqlite:///PATH``
    opens. Created under a lock: two launches may start at once on one results folder."""
    import optuna  # 0.5 s to import: the command line's start-up skips it (tests/test_architecture.py)

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with cache_lock(path):
        return optuna.storages.RDBStorage(f"sqlite:///{path.resolve()}")


class _FixedConfig(Searcher):
    """Hands out the group's default config (no sampled parameters)."""

    def suggest(self, trial_id: str) -> dict[str, Any]:
        return {}

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        pass


class GroupedSearch(Searcher):
    """Trials of every group of a plan; each config an :class:`~timematch.runner.trial_config.AdaptConfig`
    (its number in its group: 0, the first, is the defaults where the group has them)."""

    def __init__(self, plan: LaunchPlan, max_concurrent_per_group: int, seed: int = 0,
                 optuna_db: Path | None = None, launch_id: str = "") -> None:
        super().__init__(metric=plan.objective, mode="max")
        self._order = [g.id for g in plan.groups]
        self._arrays = {g.id: plan.array_sizes(g) for g in plan.groups}
        self._trials = {g.id: len(self._arrays[g.id]) or g.trials for g in plan.groups}
        self._remaining = dict(self._trials)
        self._searchers: dict[str, Searcher] = {}
        storage = optuna_storage(optuna_db) if optuna_db is not None else None
        for index, group in enumerate(plan.groups):
            study = member_study_name(launch_id, group)
            if self._arrays[group.id]:
                if storage is None:
                    raise ValueError("arrays of trials ask their group's study in a storage: pass optuna_db")
                create_member_study(plan, group, storage, study)
                self._searchers[group.id] = _FixedConfig()
            else:
                self._searchers[group.id] = self._make(plan, group, index, seed, max_concurrent_per_group, storage,
                                                       study)
        self._owner: dict[str, str] = {}

    @staticmethod
    def _make(plan: LaunchPlan, group: TrialGroup, index: int, seed: int, max_concurrent: int,
              storage: Any = None, study: str | None = None) -> Searcher:
        if not group.searched:
            return _FixedConfig()
        import optuna

        default = plan.default_point(group)
        searcher = OptunaSearch(
            space=to_optuna(group.space), metric=plan.objective, mode="max",
            sampler=optuna.samplers.TPESampler(seed=seed * 1000 + index),
            points_to_evaluate=[default] if default else None,
            storage=storage, study_name=study if storage is not None else None,
        )
        return ConcurrencyLimiter(searcher, max_concurrent=max(1, min(max_concurrent, group.trials)))

    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        return True  # every group has its own metric and mode, set at construction

    def group_of(self, trial_id: str) -> str | None:
        return self._owner.get(trial_id)

    def suggest(self, trial_id: str):
        if not any(self._remaining.values()):
            return Searcher.FINISHED
        for group_id in self._order:
            if self._remaining[group_id] <= 0:
                continue
            params = self._searchers[group_id].suggest(trial_id)
            if params is None or params == Searcher.FINISHED:
                continue  # at its concurrency limit: offer the slot to the next group
            number = self._trials[group_id] - self._remaining[group_id]  # in its group: 0 is the defaults
            self._remaining[group_id] -= 1
            self._owner[trial_id] = group_id
            sizes = self._arrays[group_id]
            if sizes:  # an array: its members ask the group's study themselves
                return AdaptConfig(group_id, number, members=sizes[number]).to_tune()
            return AdaptConfig(group_id, number, dict(params)).to_tune()
        return None

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        group_id = self._owner.get(trial_id)
        if group_id and self._arrays.get(group_id):
            return  # an array's members tell their study themselves
        if group_id and self.metric in result:
            self._searchers[group_id].on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        group_id = self._owner.get(trial_id)
        if group_id is None or self._arrays.get(group_id):
            return
        if result is not None and self.metric not in result:
            result, error = None, True  # stopped before its first report: Optuna records a failure
        self._searchers[group_id].on_trial_complete(trial_id, result=result, error=error)

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as file:
            pickle.dump(self.__dict__, file)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as file:
            self.__dict__.update(SearcherStateUnpickler(file).load())


def member_study_name(launch_id: str, group: TrialGroup) -> str:
    """The Optuna study of a group's trials in the launch's storage: ``<launch id> <group>``."""
    return f"{launch_id} {group.id}".strip()


def create_member_study(plan: LaunchPlan, group: TrialGroup, storage: Any, name: str) -> None:
    """Create (or find again, on ``--resume``) the study whose trials an array's members are,
    with the group's defaults as its first trial (as :class:`GroupedSearch` does for single trials)."""
    import optuna

    study = optuna.create_study(storage=storage, study_name=name, direction="maximize", load_if_exists=True)
    default = plan.default_point(group)
    if default and not study.trials:
        study.enqueue_trial(default)


class SearcherStateUnpickler(pickle.Unpickler):
    """Reads back :meth:`GroupedSearch.save`'s file admitting only the classes such a state is
    made of (Optuna's studies and samplers, Ray Tune's searchers, this project's plan, numpy and
    standard containers). A crafted file can then reach only those packages' own callables, never
    ``os``, ``subprocess`` or ``eval``: a narrowing of what a results folder can do, not a sandbox
    (Ray Tune's own experiment state in the same folder is cloudpickle)."""

    ALLOWED = ("builtins", "collections", "copyreg", "_codecs", "datetime", "enum", "functools", "numpy",
               "optuna", "ray.tune", "timematch")
    REFUSED = frozenset({("builtins", name) for name in ("eval", "exec", "compile", "open", "__import__",
                                                         "getattr", "setattr", "delattr", "globals", "input")})

    def find_class(self, module: str, name: str) -> Any:
        allowed = any(module == prefix or module.startswith(prefix + ".") for prefix in self.ALLOWED)
        if allowed and (module, name) not in self.REFUSED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load global '{module}.{name}' from a searcher checkpoint")


class GroupedASHA(FIFOScheduler):
    """ASHA within each searched group (time unit: the epoch a report names); FIFO elsewhere."""

    def __init__(self, plan: LaunchPlan, grace_period: int = 1, reduction_factor: float = 2) -> None:
        super().__init__()
        self._schedulers: dict[str, ASHAScheduler] = {}
        for group in plan.groups:  # an array's members are stopped by their study's pruner (trial_arrays)
            if group.searched and group.trials > 1 and group.epochs > grace_period and not plan.array_sizes(group):
                self._schedulers[group.id] = ASHAScheduler(
                    # the epoch each report names, not Tune's count of reports: a trial retried or
                    # resumed from its state (timematch.runner.trial_run) goes on at its own epoch
                    time_attr="epoch", metric=plan.objective, mode="max", max_t=group.epochs,
                    grace_period=grace_period, reduction_factor=reduction_factor,
                )
        self._registered: set[str] = set()  # trials the group schedulers know (restored ones re-register)

    def set_search_properties(self, metric, mode, **spec) -> bool:
        return True

    def _for(self, trial) -> ASHAScheduler | None:
        return self._schedulers.get(config_key(trial.config))

    def on_trial_add(self, tune_controller, trial) -> None:
        scheduler = self._for(trial)
        if scheduler is not None and trial.trial_id not in self._registered:
            scheduler.on_trial_add(tune_controller, trial)
            self._registered.add(trial.trial_id)

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        scheduler = self._for(trial)
        if scheduler is None:
            return TrialScheduler.CONTINUE
        self.on_trial_add(tune_controller, trial)  # a trial restored by --resume
        return scheduler.on_trial_result(tune_controller, trial, result)

    def on_trial_complete(self, tune_controller, trial, result: dict) -> None:
        scheduler = self._for(trial)
        if scheduler is not None and trial.trial_id in self._registered:
            scheduler.on_trial_complete(tune_controller, trial, result)
            self._registered.discard(trial.trial_id)

    def on_trial_remove(self, tune_controller, trial) -> None:
        scheduler = self._for(trial)
        if scheduler is not None and trial.trial_id in self._registered:
            scheduler.on_trial_remove(tune_controller, trial)
            self._registered.discard(trial.trial_id)

    def debug_string(self) -> str:
        return f"ASHA per group ({len(self._schedulers)} searched groups)"

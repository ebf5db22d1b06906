"""A launch's runs written straight into a real MLflow SQLite store, without Ray or training:
the parent run with its logged plan, finished adaptation trials with their tags, metrics,
sampled values and a logged model each, as the trials of a launch leave them. What the report
reads back (``timematch.runner.reporting``) can then be checked in seconds."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
LAUNCH_ID = "20261206-120000-abcd"


@dataclass
class StoredLaunch:
    uri: str
    experiment: str
    experiment_id: str
    results: Path
    launch_run_id: str
    #: run name -> run id, for every trial run
    runs: dict[str, str] = field(default_factory=dict)

    @property
    def client(self):
        from mlflow import MlflowClient

        return MlflowClient(self.uri)


def store_launch(tmp_path: Path, experiment: str = "store", trials: int = 5, seeds: int = 1) -> StoredLaunch:
    """One launch of ``DK-FR1`` with the source-only baseline and ``trials`` searched TimeMatch
    trials per seed (``seeds`` seeds), finished, in ``tmp_path/mlflow.db``.

    TimeMatch trial ``i`` (seed ``s``) has target validation F1 ``0.5 + 0.05 i`` and test F1
    ``0.4 + 0.04 i + 0.01 s``: the last trial is each seed's winner. The baseline scores 0.9 by
    both, higher than any TimeMatch trial, and is still a reference row."""
    from timematch.runner import runs, tracking
    from timematch.runner.cli import launch_parser, plan_launch
    from timematch.runner.search_space import to_optuna

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = ["--scenario", "DK-FR1", "--method", "timematch", "--profile", "smoke", "--trials", str(trials),
            "--experiment", experiment, "--seeds", str(seeds)]
    plan = plan_launch(launch_parser().parse_args(args), REPO)
    exp_id = tracking.ensure_experiment(uri, experiment)
    client = tracking.client(uri)
    launch_run, _ = runs.open_run(
        client, exp_id, {"stage": "launch", "launch_id": LAUNCH_ID},
        {"objective": "target_val_f1", "profile": "smoke", "selection_uses_target_labels": "true"},
        {"scenarios": "DK-FR1", "methods": "source_only,timematch"}, f"launch {LAUNCH_ID}", None)
    client.log_text(launch_run, plan.to_json(), "launch/plan.json")
    stored = StoredLaunch(uri, experiment, exp_id, tmp_path / "results", launch_run)
    space = next(to_optuna(g.space) for g in plan.groups if g.method == "timematch")
    for seed in range(seeds):
        suffix = f"s{seed}" if seeds > 1 else ""
        _trial(stored, "source_only", f"DK-FR1 SO{' ' + suffix if suffix else ''}", f"b{seed}", seed,
               {"final_target_val_f1": 0.9, "test_macro_f1": 0.9}, None)
        for i in range(trials):
            sampled = {key: _value(distribution, (i + 0.5) / trials) for key, distribution in space.items()}
            metrics = {"final_target_val_f1": 0.5 + 0.05 * i, "test_macro_f1": 0.4 + 0.04 * i + 0.01 * seed,
                       "final_source_val_f1": 0.9 - 0.01 * i}
            _trial(stored, "timematch", f"DK-FR1 TM {suffix}#{i}", f"t{seed}{i}", seed, metrics, sampled)
    return stored


def _value(distribution, fraction: float):
    from optuna.distributions import CategoricalDistribution, IntDistribution

    if isinstance(distribution, CategoricalDistribution):
        return distribution.choices[int(fraction * len(distribution.choices))]
    low, high = distribution.low, distribution.high
    if getattr(distribution, "log", False):
        value = low * (high / low) ** fraction
    else:
        value = low + (high - low) * fraction
    if isinstance(distribution, IntDistribution):
        return low + distribution.step * round((value - low) / distribution.step)
    return float(value)


def _trial(stored: StoredLaunch, method: str, name: str, trial: str, seed: int, metrics: dict[str, float],
           sampled: dict | None) -> None:
    from mlflow.entities import Metric

    from timematch.runner import runs

    client = stored.client
    tags = {"stage": "adapt", "scenario": "DK-FR1", "source": "DK", "target": "FR1", "method": method, "fold": "0",
            "seed": str(seed), "objective": "target_val_f1", "launch_id": LAUNCH_ID,
            "group": f"DK-FR1/{method}/fold0"}
    tags.update({"sampled": json.dumps(sampled)} if sampled is not None else {"baseline": "true"})
    run_id, _ = runs.open_run(client, stored.experiment_id, {"trial_key": f"{LAUNCH_ID}/{trial}"}, tags, {}, name,
                              stored.launch_run_id)
    client.log_batch(run_id, metrics=[Metric(k, v, 0, runs.FINAL_STEP) for k, v in metrics.items()])
    model = client.create_logged_model(stored.experiment_id, name=f"{method}-DK-FR1-parcel_classifier",
                                       source_run_id=run_id)
    client.finalize_logged_model(model.model_id, "READY")
    client.set_tag(run_id, "classifier_uri", f"models:/{model.model_id}")
    runs.finish(client, run_id)
    stored.runs[name] = run_id

"""Launches in tests (tests/test_runner_sweep.py, tests/test_runner_arrays.py): the smoke
profile's arguments with a private MLflow store and results folder, and reading the runs back."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from mlflow import MlflowClient

REPO = Path(__file__).resolve().parents[2]


def common_args(data_root: Path, tmp_path: Path, experiment: str) -> list[str]:
    return ["--profile", "smoke", "--set", "data.min_parcels=20", "--data-root", str(data_root),
            "--results-dir", str(tmp_path / "results"), "--tracking-uri", tracking_uri(tmp_path),
            "--experiment", experiment, "--folds", "1"]


def tracking_uri(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}"


def runs_of(uri: str, experiment: str, stage: str | None = None) -> list:
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    return [r for r in runs if stage is None or r.data.tags.get("stage") == stage]


def metric_log(client: MlflowClient, run) -> set[tuple[str, int, float]]:
    entries = set()
    for key in run.data.metrics:
        for m in client.get_metric_history(run.info.run_id, key):
            entries.add((key, m.step, m.value if not np.isnan(m.value) else -1.0))
    return entries

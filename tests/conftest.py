import os

import pytest

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    """A private cache directory, so tests never touch the user's cache."""
    path = tmp_path / "cache"
    monkeypatch.setenv("TIMEMATCH_CACHE", str(path))
    return path

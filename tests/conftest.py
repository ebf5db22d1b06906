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


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory):
    """Two small synthetic tiles (DK, FR1; 240 parcels each), for short method runs."""
    from timematch.data.synthetic import generate_dataset

    root = tmp_path_factory.mktemp("synthetic")
    generate_dataset(root, parcels_per_tile=240, seed=3, tiles=["DK", "FR1"])
    return root

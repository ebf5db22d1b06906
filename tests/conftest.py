import os

import pytest
from hypothesis import settings

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

# Property-based tests (tests/test_fuzz.py): repeatable in CI, no example database in the
# checkout; HYPOTHESIS_PROFILE=explore draws ten times as many examples, at random.
settings.register_profile("ci", derandomize=True, database=None, deadline=None, print_blob=True)
settings.register_profile("explore", max_examples=1000, database=None, deadline=None, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


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


@pytest.fixture(scope="session")
def ray_address():
    """One local Ray instance for the whole session (the sweeps of test_runner_sweep.py and
    test_reliability.py join it; launch.py subprocesses get its address)."""
    from timematch.runner.resources import set_environment

    set_environment()
    import ray

    # address="local": a new instance even if another one runs on this machine. One logical
    # GPU: trials are placed by GPU share as on a GPU cluster (Ray only counts it; a trial
    # computes on CUDA when torch sees a device, else on the CPU).
    ray.init(address="local", num_cpus=2, num_gpus=1, include_dashboard=False, object_store_memory=256 * 1024**2,
             log_to_driver=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="session")
def data_root(tmp_path_factory):
    """Three small synthetic tiles (200 parcels each: 3-4 classes with >= 20 parcels)."""
    from timematch.data.synthetic import generate_dataset

    root = tmp_path_factory.mktemp("synthetic")
    generate_dataset(root, parcels_per_tile=200, tiles=["DK", "FR1", "FR2"])
    return root

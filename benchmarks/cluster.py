"""The multi-node path on this machine: the sweep of tests/test_cluster.py (2 scenarios x 2
methods, smoke profile, 1 fold, 1 trial each: 2 source models + 4 adaptation trials) on a Ray
cluster of one node with 3 CPUs, then of a head and 2 workers with 1 CPU each, both started
with ``ray start`` (token auth on) and logging to the project's MLflow server (basic auth;
PostgreSQL store when its binaries are here, else SQLite). Prints each sweep's wall time and
the trials (pretraining and adaptation runs) per node, read back from the runs' ``ray_node_id``
tags on the server. Same total CPUs: the point is that it works and where trials land, not a
speed-up (on one 2-core machine, three nodes only add Ray's per-node overhead).

    python benchmarks/cluster.py [--layouts 3 1,1,1]
"""

from __future__ import annotations

import argparse
import collections
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.support.cluster_harness import (  # noqa: E402
    RUNNER, Services, postgres_bin, runner_env, start_mlflow, start_postgres, start_ray,
)


def sweep(layout: tuple[int, ...], data_root: Path, work: Path) -> tuple[float, collections.Counter, str]:
    import subprocess

    import mlflow

    services = Services(work / "services")
    services.root.mkdir(parents=True)
    try:
        if postgres_bin():
            store = start_postgres(services)
            url, backend = start_mlflow(services, store, auth_db=store), "PostgreSQL"
        else:
            url, backend = start_mlflow(services, f"sqlite:///{services.root / 'mlflow.db'}"), "SQLite"
        ray = start_ray(services, layout)
        env = runner_env(**ray.env, TIMEMATCH_CACHE=str(work / "cache"))
        argv = [sys.executable, "launch.py", "--address", ray.address, "--tracking-uri", url,
                "--results-dir", str(work / "results"), "--profile", "smoke", "--set", "data.min_parcels=20",
                "--data-root", str(data_root), "--folds", "1", "--experiment", "cluster-bench",
                "--scenario", "DK-FR1,FR1-FR2", "--method", "timematch,fixmatch", "--trials", "1", "--no-baseline"]
        started = time.monotonic()
        done = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=3600)
        wall = time.monotonic() - started
        if done.returncode != 0:
            raise SystemExit(f"the sweep failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
        import os

        os.environ.update(MLFLOW_TRACKING_USERNAME=RUNNER[0], MLFLOW_TRACKING_PASSWORD=RUNNER[1])
        client = mlflow.MlflowClient(url)
        experiment = client.get_experiment_by_name("cluster-bench")
        runs = client.search_runs([experiment.experiment_id], max_results=100)
        per_node = collections.Counter(
            f"{r.data.tags['ray_node_id'][:8]}" for r in runs if r.data.tags.get("stage") in ("pretrain", "adapt"))
        return wall, per_node, backend
    finally:
        services.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layouts", nargs="+", default=["3", "1,1,1"],
                        help="CPUs per node of each cluster, head first (default: 3 and 1,1,1)")
    args = parser.parse_args()
    from timematch.data.synthetic import generate_dataset

    with tempfile.TemporaryDirectory(prefix="timematch-cluster-bench-") as tmp:
        data_root = Path(tmp) / "data"
        generate_dataset(data_root, parcels_per_tile=200, tiles=["DK", "FR1", "FR2"])
        print(f"{'nodes (CPUs each)':20s} {'store':10s} {'wall s':>7s}  trials per node")
        for layout_text in args.layouts:
            layout = tuple(int(c) for c in layout_text.split(","))
            wall, per_node, backend = sweep(layout, data_root, Path(tmp) / layout_text.replace(",", "-"))
            counts = ", ".join(f"{node}: {count}" for node, count in per_node.most_common())
            print(f"{len(layout)} ({layout_text}){'':{max(0, 16 - len(layout_text))}s} {backend:10s} {wall:7.0f}  {counts}",
                  flush=True)


if __name__ == "__main__":
    main()

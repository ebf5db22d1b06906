"""The fixed cost of a trial: the time it spends outside its training steps, alone and in arrays.

Runs the same launch once per ``--arrays`` value (``python launch.py --array K``: the quick
profile by default, one scenario, searched groups of ``--trials`` trials) into a private MLflow
store and results folder, then reads back from MLflow, per adaptation trial: its run's wall
time, the seconds in its steps (``step_seconds``, logged by every trial), and the rest: opening
its run, data, building the model, per-epoch evaluation and checkpoints, test evaluation, the
logging of its metrics, artifacts and models. For the members of an array the run times overlap:
an array's cost is its members' span (first start to last end) less its steps, shared by its
members. Also the adaptation stage's wall time from the launch's own progress lines, which
includes what no run sees (Ray placing the trial, a worker's start and imports).

    python benchmarks/trial_overhead.py [--arrays 1,4] [--methods dann,timematch] [--trials 8]
        [--profile quick] [--scenario DK-FR1] [--keep DIR]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def launch(folder: Path, array: int, args: argparse.Namespace) -> tuple[float, str]:
    command = [sys.executable, str(REPO / "launch.py"), "--profile", args.profile, "--scenario", args.scenario,
               "--method", args.methods, "--trials", str(args.trials), "--array", str(array), "--no-baseline",
               "--tracking-uri", f"sqlite:///{folder / 'mlflow.db'}", "--results-dir", str(folder / "results"),
               "--experiment", f"overhead-{array}"]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=os.environ.copy())
    if done.returncode != 0:
        raise SystemExit(f"launch --array {array} failed ({done.returncode}):\n{done.stdout[-3000:]}{done.stderr[-3000:]}")
    return time.perf_counter() - started, done.stdout


def adapt_seconds(stdout: str) -> float:
    """The adaptation stage's wall time: its last progress line's clock ([adapt M:SS])."""
    stamps = re.findall(r"\[adapt\s+(\d+):(\d\d)\]", stdout)
    return float(int(stamps[-1][0]) * 60 + int(stamps[-1][1])) if stamps else float("nan")


def costs(folder: Path, array: int) -> dict:
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{folder / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(f"overhead-{array}")
    runs = client.search_runs([experiment.experiment_id], "tags.stage = 'adapt'", max_results=1000)
    groups: dict[str, list] = defaultdict(list)
    for run in runs:
        groups[run.data.tags.get("array") or run.info.run_id].append(run)
    outside, steps, trained = [], [], 0
    for members in groups.values():
        span = (max(r.info.end_time for r in members) - min(r.info.start_time for r in members)) / 1000
        step_seconds = max(r.data.metrics.get("step_seconds", 0.0) for r in members)
        outside.append((span - step_seconds) / len(members))
        steps.append(step_seconds / len(members))
        trained += len(members)
    return {"trials": trained, "outside": sum(outside) / len(outside), "steps": sum(steps) / len(steps),
            "stopped": sum(r.data.tags.get("stopped_early") == "asha" for r in runs)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arrays", default="1,4")
    parser.add_argument("--methods", default="dann,timematch")
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--profile", default="quick")
    parser.add_argument("--scenario", default="DK-FR1")
    parser.add_argument("--keep", type=Path, default=None, help="keep the stores here (default: a temporary folder)")
    args = parser.parse_args()
    root = args.keep or Path(tempfile.mkdtemp(prefix="trial-overhead-"))
    print(f"{args.profile} profile, {args.scenario}, {args.methods}, {args.trials} trials per group, "
          f"{os.cpu_count()} CPUs; stores in {root}", flush=True)
    print(f"{'--array':>7s} {'trials':>6s} {'stopped':>7s} {'launch s':>9s} {'adapt stage s':>14s} "
          f"{'s/trial outside steps':>22s} {'s/trial in steps':>17s}", flush=True)
    for array in (int(k) for k in args.arrays.split(",")):
        folder = root / f"array-{array}"
        folder.mkdir(parents=True, exist_ok=True)
        wall, stdout = launch(folder, array, args)
        found = costs(folder, array)
        print(f"{array:7d} {found['trials']:6d} {found['stopped']:7d} {wall:9.1f} {adapt_seconds(stdout):14.0f} "
              f"{found['outside']:22.2f} {found['steps']:17.2f}", flush=True)


if __name__ == "__main__":
    main()

"""How many trials should share one GPU? Aggregate training throughput of K concurrent trials.

The runner gives each trial a fraction of a GPU (``--gpus-per-trial``, auto 0.25: four
trials per GPU). The model is small (about 130k parameters), so one trial leaves most of a
GPU idle while its CPU side builds batches. This script starts K worker processes on one
GPU (as Ray does with fractional GPUs), each running TimeMatch training steps (batch 128,
the published training views) through the real training loop, and prints per K the
aggregate samples per second and the ratio to one trial, measured in one run.

    python benchmarks/gpu_sharing.py [--trials 1,2,4,8] [--steps 60] [--method timematch]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import time
from pathlib import Path


def worker(root: str, method_name: str, steps: int, threads: int, barrier, results) -> None:
    import torch

    from timematch.data.dataset import DataConfig, open_domains
    from timematch.evaluation import pick_device
    from training_step import run_steps  # benchmarks/ is on the path of this script and its workers

    torch.set_num_threads(threads)
    source, target = open_domains(Path(root), "DK", "FR1", fold=0, config=DataConfig(min_parcels=50))
    extra = {"sample_size": 1} if method_name == "timematch" else {}
    timed = run_steps(method_name, source, target, pick_device(), steps, before_timed=barrier.wait, **extra)
    step_seconds = timed["step_s"] * steps
    results.put((steps * 128, step_seconds, timed["wait_fraction"] * step_seconds))


def measure(root: str, method: str, trials: int, steps: int, threads: int) -> tuple[float, float, float]:
    context = mp.get_context("spawn")
    barrier, results = context.Barrier(trials + 1), context.Queue()
    workers = [context.Process(target=worker, args=(root, method, steps, threads, barrier, results))
               for _ in range(trials)]
    for process in workers:
        process.start()
    barrier.wait()
    started = time.perf_counter()
    outcomes = [results.get() for _ in workers]
    wall = time.perf_counter() - started
    for process in workers:
        process.join()
    samples = sum(o[0] for o in outcomes)
    step_s = sum(o[1] for o in outcomes) / len(outcomes) / steps
    wait = sum(o[2] for o in outcomes) / sum(o[1] for o in outcomes)
    return samples / wall, step_s, wait


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", type=Path, default=None)
    parser.add_argument("--trials", default="1,2,4,8", help="numbers of concurrent trials to measure")
    parser.add_argument("--steps", type=int, default=60, help="timed steps per trial")
    parser.add_argument("--method", default="timematch", choices=["timematch", "fixmatch", "source_only"])
    parser.add_argument("--threads", type=int, default=2, help="torch threads per trial (the runner's auto cpus)")
    args = parser.parse_args()
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("gpu_sharing.py measures a CUDA device; none is visible here")
    from timematch.data.embedded import ensure_embedded_dataset

    root = str(args.data_root or os.environ.get("TIMEMATCH_DATA") or ensure_embedded_dataset(progress=print))
    print(f"{torch.cuda.get_device_name(0)}, {os.cpu_count()} CPUs; {args.method} steps, batch 128, "
          f"{args.threads} torch threads per trial, {args.steps} timed steps per trial")
    print(f"{'trials':>6s} {'GPU share':>9s} {'samples/s (all)':>16s} {'vs 1 trial':>10s} {'s/step (each)':>14s} "
          f"{'data wait':>9s}")
    base = None
    for count in (int(t) for t in args.trials.split(",")):
        rate, step_s, wait = measure(root, args.method, count, args.steps, args.threads)
        base = base or rate
        print(f"{count:6d} {1 / count:9.3g} {rate:16.0f} {rate / base:9.2f}x {step_s:14.4f} {100 * wait:8.1f}%",
              flush=True)


if __name__ == "__main__":
    main()

"""Arrays of trials (timematch/arrays.py): member-steps per second for K members trained as one
fused model, next to K trials as the runner runs them today (one process each).

For K = 1, 2, 4, 8, 16, 32 members of TimeMatch and of DANN (batch 128, the published views,
tiles on the device, members differing in their learning rate and one method value): an array
is built through the real code (:class:`timematch.arrays.TrialArray`: the members' tensors
stacked, the step vmapped, on a GPU captured once as a CUDA graph), warmed up, then timed over
``--steps`` steps; member-steps/s = K x steps / seconds. On a GPU also the memory it holds per
member (peak allocated over the window, divided by K) and, as today's baseline, K processes
(``benchmarks/gpu_sharing.py``'s pool, the same trials, fast path) in the same run. On a CPU
(``--device cpu``) the array runs on ``--threads`` threads against one trial alone on as many
(the step of ``benchmarks/training_step.py``): a CPU computes the members one after another,
so the question there is only what the fusion costs or saves.

    python benchmarks/trial_arrays.py [--device cuda] [--arrays 1,2,4,8,16,32]
        [--methods timematch,dann] [--precisions fp32,bf16] [--steps 40] [--processes]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

BATCH = 128
WARMUP = 5


def members(root: str, method_name: str, count: int, device: str, steps: int) -> list:
    """``count`` members of one array: the same seed and shapes, their own lr and one method value."""
    import torch

    from timematch.data.dataset import DataConfig, open_domains
    from timematch.methods import build_config, get_method
    from timematch.models import build_model

    source, target = open_domains(Path(root), "DK", "FR1", fold=0, config=DataConfig(min_parcels=50))
    own = "pseudo_threshold" if method_name == "timematch" else "trade_off"
    built = []
    for k in range(count):
        values = {"epochs": 1000, "steps_per_epoch": steps, "batch_size": BATCH, "lr": 1e-4 * (1 + k % 4),
                  own: 0.5 + 0.4 * (k % 2)}
        if method_name == "timematch":
            values["sample_size"] = 1
        torch.manual_seed(0)
        model = build_model(num_classes=len(source.classes)).to(device)
        built.append(get_method(method_name)(build_config(method_name, values), model, source, target,
                                             torch.device(device)))
    return built


def measure_array(root: str, method_name: str, count: int, device: str, precision: str, steps: int) -> dict:
    import numpy as np
    import torch

    from timematch.arrays import TrialArray
    from timematch.training import Execution

    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    methods = members(root, method_name, count, device, steps)
    array = TrialArray(methods, seed=0, execution=Execution(precision=precision))
    for method in methods:
        method.start_epoch(1, np.random.default_rng(0), [])
        method.set_train_mode()
    array.run_epoch(WARMUP)  # the warm-up steps and, on a GPU, the capture
    started = time.perf_counter()
    array.run_epoch(steps)  # ends with the epoch's one read back: the device is done
    seconds = time.perf_counter() - started
    memory = (torch.cuda.max_memory_allocated() - before) / count / 2**20 if device == "cuda" else None
    result = {"method": method_name, "precision": precision, "members": count, "steps": steps,
              "member_steps": count * steps / seconds, "memory_mib": memory, "path": array.path}
    del array, methods
    return result


def measure_alone(root: str, method_name: str, device: str, steps: int) -> float:
    """One trial's steps/s on today's path (the same trial, alone)."""
    import numpy as np

    from timematch.training import Execution, prepare

    (method,) = members(root, method_name, 1, device, steps)
    engine = prepare(method, 0, Execution())
    method.start_epoch(1, np.random.default_rng(0), [])
    method.set_train_mode()
    engine.run_epoch(WARMUP)
    started = time.perf_counter()
    engine.run_epoch(steps)
    return steps / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--data-root", type=Path, default=None)
    parser.add_argument("--arrays", default=None, help="members per array (default 1,2,4,8,16,32; CPU 1,2,4,8)")
    parser.add_argument("--methods", default="timematch,dann")
    parser.add_argument("--precisions", default=None, help="default fp32,bf16 on a GPU, fp32 on a CPU")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per array (default 40 GPU, 4 CPU)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (--device cpu)")
    parser.add_argument("--processes", action="store_true", help="also K trials in K processes (GPU, graph path)")
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import torch

    from timematch.data.embedded import ensure_embedded_dataset

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("trial_arrays.py --device cuda needs a CUDA device; none is visible here (--device cpu)")
    torch.set_num_threads(args.threads)
    gpu = args.device == "cuda"
    counts = [int(k) for k in (args.arrays or ("1,2,4,8,16,32" if gpu else "1,2,4,8")).split(",")]
    precisions = (args.precisions or ("fp32,bf16" if gpu else "fp32")).split(",")
    steps = args.steps or (40 if gpu else 4)
    root = str(args.data_root or os.environ.get("TIMEMATCH_DATA") or ensure_embedded_dataset(progress=print))
    where = torch.cuda.get_device_name(0) if gpu else f"CPU, {args.threads} thread(s) of {os.cpu_count()}"
    print(f"{where}, torch {torch.__version__}; batch {BATCH}; {steps} timed steps per array after {WARMUP} "
          "warm-up steps", flush=True)
    pool = None
    if args.processes and gpu:
        from gpu_sharing import Busy, Pool  # noqa: E402 - the sibling benchmark's process pool

        pool, busy = Pool(root, max(counts)), Busy()
    header = (f"{'method':10s} {'precision':9s} {'K':>3s} {'member-steps/s':>15s} {'vs alone':>9s} "
              f"{'MiB/member':>11s} {'K processes':>12s}  path")
    print(header, flush=True)
    try:
        for method in args.methods.split(","):
            alone = measure_alone(root, method, args.device, steps)
            print(f"{method:10s} {'fp32':9s} {'-':>3s} {alone:15.2f} {'1.00x':>9s} {'':>11s} {'':>12s}  "
                  "one trial alone (today's path)", flush=True)
            for precision in precisions:
                for count in counts:
                    try:
                        result = measure_array(root, method, count, args.device, precision, steps)
                    except torch.OutOfMemoryError:
                        print(f"{method:10s} {precision:9s} {count:3d} out of memory", flush=True)
                        break
                    processes = ""
                    if pool is not None and precision == "fp32":
                        processes = f"{pool.measure(method, 'graph', count, busy)['aggregate']:12.1f}"
                    memory = "" if result["memory_mib"] is None else f"{result['memory_mib']:11.1f}"
                    print(f"{method:10s} {precision:9s} {count:3d} {result['member_steps']:15.2f} "
                          f"{result['member_steps'] / alone:8.2f}x {memory:>11s} {processes:>12s}  {result['path']}",
                          flush=True)
    finally:
        if pool is not None:
            pool.close()


if __name__ == "__main__":
    main()

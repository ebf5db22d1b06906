"""How many trials should share one GPU, and where does the time go?

For K = 1, 2, 4, 8, 16 concurrent trials of TimeMatch and of an adversarial method (DANN),
on the eager path and on the fast path (the training step captured once as a CUDA graph and
replayed), in one run: steps per second per trial and in aggregate, and the share of wall
time the GPU spends running kernels (NVML's utilisation: the fraction of time one or more
kernels was executing, sampled through the timed window).

Trials run as the runner runs them: one process each (Ray's fractional GPUs), batch 128,
the published training views (64 pixels, 30 dates), tiles on the GPU, one CPU thread each.
Every worker prepares its trial through the real loop (:func:`timematch.training.prepare`),
runs a warm-up epoch (which holds the capture on the fast path), waits at a barrier, then
runs one timed epoch; the aggregate is all trials' steps over the wall time from the barrier
to the last trial's end. Per-trial steps shrink with K so every window lasts a few seconds.

Two more ways of sharing, measured rather than assumed:

- ``--streams``: K trials in **one** process, each replaying its graph on its own CUDA
  stream, launches interleaved (kernels of one process's streams run concurrently; the
  processes of the default set-up time-slice);
- ``--mps``: the K processes under NVIDIA's Multi-Process Service, when the node offers it
  (this script starts a private MPS daemon and stops it afterwards; skipped when there is none).

``--save FILE`` merges the measured curve of this GPU model into FILE (JSON), e.g.
``timematch/runner/gpu_curves.json``, which ``--gpus-per-trial auto`` reads
(:mod:`timematch.runner.gpu_share`). ``--from-log LOG --save FILE`` does the same from the
tables this script printed into LOG (for a run that ended before it could save).

    python benchmarks/gpu_sharing.py [--trials 1,2,4,8,16] [--methods timematch,dann]
        [--paths eager,graph] [--streams] [--mps] [--save FILE]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

BATCH = 128
#: Steps of all trials together in one timed window (per trial: this / K, at least MIN_STEPS).
TOTAL_STEPS = {"graph": 480, "eager": 120}
MIN_STEPS = 20
WARMUP_STEPS = 10


def _trial(root: str, method_name: str, steps: int, cuda_graph: bool, seed: int, device: str = "cuda"):
    """A prepared trial: (method, engine), warm: a first epoch has run (and captured)."""
    import numpy as np
    import torch

    from timematch.data.dataset import DataConfig, open_domains
    from timematch.methods import build_config, get_method
    from timematch.models import build_model
    from timematch.training import Execution, prepare

    source, target = open_domains(Path(root), "DK", "FR1", fold=0, config=DataConfig(min_parcels=50))
    extra = {"sample_size": 1} if method_name == "timematch" else {}
    config = build_config(method_name, {"epochs": 1000, "steps_per_epoch": steps, "batch_size": BATCH, **extra})
    torch.manual_seed(seed)
    device = torch.device(device)
    method = get_method(method_name)(config, build_model(num_classes=len(source.classes)).to(device),
                                     source, target, device)
    engine = prepare(method, seed, Execution(cuda_graph=cuda_graph))
    method.start_epoch(1, np.random.default_rng(seed), [])
    method.set_train_mode()
    engine.run_epoch(WARMUP_STEPS)
    return method, engine


def worker(root: str, device: str, tasks, results) -> None:
    """Runs the parent's tasks: (method, path, steps, barrier) -> (seconds, path, reason)."""
    import torch

    torch.set_num_threads(1)
    while True:
        task = tasks.get()
        if task is None:
            return
        method_name, path, steps, barrier = task
        try:
            _, engine = _trial(root, method_name, steps, path == "graph", os.getpid() % 1000, device)
            barrier.wait()
            started = time.perf_counter()
            engine.run_epoch(steps)  # ends with the epoch's one read: the GPU is done
            results.put((time.perf_counter() - started, engine.path, engine.reason))
            del engine
            if device == "cuda":
                torch.cuda.empty_cache()
        except Exception as err:  # noqa: BLE001 - reported by the parent
            try:
                barrier.abort()
            except Exception:  # noqa: BLE001
                pass
            results.put((None, "error", f"{type(err).__name__}: {err}"))


class Busy:
    """NVML's GPU utilisation, polled every 20 ms in a thread between start() and stop()."""

    def __init__(self) -> None:
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml = pynvml
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(int(os.environ.get("CUDA_VISIBLE_DEVICES", "0")
                                                                 .split(",")[0] or 0))
        except Exception:  # noqa: BLE001 - no NVML: the column says n/a
            self._nvml = None
        self._samples: list[int] = []
        self._stop = threading.Event()

    def start(self) -> None:
        self._samples, self._stop = [], threading.Event()
        if self._nvml:
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()

    def _poll(self) -> None:
        while not self._stop.is_set():
            self._samples.append(self._nvml.nvmlDeviceGetUtilizationRates(self._handle).gpu)
            time.sleep(0.02)

    def stop(self) -> float | None:
        self._stop.set()
        if not self._nvml:
            return None
        self._thread.join()
        # the first samples still average the period before the window
        kept = self._samples[len(self._samples) // 5:] or self._samples
        return sum(kept) / max(1, len(kept))


class Pool:
    """``size`` worker processes, each with the tiles opened once."""

    def __init__(self, root: str, size: int, env: dict | None = None, device: str = "cuda") -> None:
        context = mp.get_context("spawn")
        self.manager = context.Manager()  # its barriers travel through queues (plain ones cannot)
        self.tasks, self.results = context.Queue(), context.Queue()
        saved = {k: os.environ.get(k) for k in (env or {})}
        os.environ.update(env or {})
        try:
            self.workers = [context.Process(target=worker, args=(root, device, self.tasks, self.results), daemon=True)
                            for _ in range(size)]
            for process in self.workers:
                process.start()
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value

    def measure(self, method: str, path: str, count: int, busy: Busy) -> dict:
        steps = max(MIN_STEPS, TOTAL_STEPS[path] // count)
        barrier = self.manager.Barrier(count + 1)
        for _ in range(count):
            self.tasks.put((method, path, steps, barrier))
        barrier.wait()
        busy.start()
        started = time.perf_counter()
        outcomes = [self.results.get() for _ in range(count)]
        wall = time.perf_counter() - started
        share = busy.stop()
        errors = [o[2] for o in outcomes if o[0] is None]
        if errors:
            raise RuntimeError(f"{method} {path} K={count}: {errors[0]}")
        per_trial = sum(steps / o[0] for o in outcomes) / count
        return {"method": method, "path": outcomes[0][1], "asked": path, "trials": count, "steps": steps,
                "per_trial": per_trial, "aggregate": count * steps / wall, "busy": share,
                "reason": outcomes[0][2]}

    def close(self) -> None:
        for _ in self.workers:
            self.tasks.put(None)
        for process in self.workers:
            process.join(timeout=30)
        self.manager.shutdown()


def streams(root: str, method: str, count: int, busy: Busy) -> dict:
    """K trials in this process, each replaying its graph on its own stream, interleaved."""
    import torch

    steps = max(MIN_STEPS, TOTAL_STEPS["graph"] // count)
    trials = [_trial(root, method, steps, True, seed) for seed in range(count)]
    lanes = [torch.cuda.Stream() for _ in trials]
    torch.cuda.synchronize()
    busy.start()
    started = time.perf_counter()
    for _ in range(steps):
        for (_, engine), lane in zip(trials, lanes):
            with torch.cuda.stream(lane):
                engine.step()
    torch.cuda.synchronize()
    wall = time.perf_counter() - started
    share = busy.stop()
    paths = {engine.path for _, engine in trials}
    del trials
    torch.cuda.empty_cache()
    return {"method": method, "path": "/".join(sorted(paths)), "trials": count, "steps": steps,
            "per_trial": steps / wall, "aggregate": count * steps / wall, "busy": share}


def start_mps() -> tuple[dict, str] | None:
    """A private MPS control daemon (pipe and log folders of its own), or None when absent."""
    control = shutil.which("nvidia-cuda-mps-control")
    if not control:
        return None
    folder = tempfile.mkdtemp(prefix="mps-")
    env = {"CUDA_MPS_PIPE_DIRECTORY": f"{folder}/pipe", "CUDA_MPS_LOG_DIRECTORY": f"{folder}/log"}
    for path in env.values():
        os.makedirs(path)
    done = subprocess.run([control, "-d"], env={**os.environ, **env}, capture_output=True, text=True, timeout=20)
    if done.returncode != 0:
        print(f"MPS: the daemon did not start ({done.stderr.strip() or done.returncode})")
        return None
    return env, control


def stop_mps(env: dict, control: str) -> None:
    subprocess.run([control], input="quit\n", env={**os.environ, **env}, text=True, timeout=30)


def parse_log(text: str) -> tuple[str, list[dict]]:
    """(GPU name, measured points) from the tables this script printed."""
    import re

    gpu, sharing, points = None, "processes", []
    pattern = re.compile(r"^(\w+)\s+(eager|cuda_graph)\s+(\d+)\s+([\d.]+)\s+([\d.]+)\s+[\d.]+x\s+(\S+)")
    for line in text.splitlines():
        if gpu is None and ", torch " in line and " CPUs" in line:
            gpu = line.split(",")[0].strip()
        elif line.startswith("K trials in one process"):
            sharing = "streams"
        elif line.startswith("K processes under MPS"):
            sharing = "mps"
        elif (match := pattern.match(line)):
            method, path, trials, per_trial, aggregate, busy = match.groups()
            points.append({"method": method, "path": path, "trials": int(trials), "per_trial": float(per_trial),
                           "aggregate": float(aggregate), "busy": None if busy == "n/a" else float(busy),
                           "sharing": sharing})
    if gpu is None or not points:
        raise SystemExit("--from-log: no table of benchmarks/gpu_sharing.py in that log")
    return gpu, points


def row(result: dict, base: float | None) -> str:
    busy = "n/a" if result["busy"] is None else f"{result['busy']:.0f} %"
    gain = f"{result['aggregate'] / base:6.2f}x" if base else ""
    return (f"{result['method']:10s} {result['path']:10s} {result['trials']:6d} {result['per_trial']:16.1f} "
            f"{result['aggregate']:17.1f} {gain:>9s} {busy:>9s}")


HEADER = (f"{'method':10s} {'path':10s} {'trials':>6s} {'steps/s (trial)':>16s} {'steps/s (all)':>17s} "
          f"{'vs K=1':>9s} {'GPU busy':>9s}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", type=Path, default=None)
    parser.add_argument("--trials", default="1,2,4,8,16", help="numbers of concurrent trials")
    parser.add_argument("--methods", default="timematch,dann")
    parser.add_argument("--paths", default="eager,graph")
    parser.add_argument("--streams", action="store_true", help="also K trials in one process on K streams")
    parser.add_argument("--mps", action="store_true", help="also the K processes under MPS (graph path)")
    parser.add_argument("--save", type=Path, default=None, help="write the measured curves here (JSON)")
    parser.add_argument("--total-steps", type=int, default=None, help="steps per window, all trials (default 800 "
                        "on the fast path, 240 eager)")
    parser.add_argument("--check-on-cpu", action="store_true", help="run the plumbing on the CPU (meaningless figures)")
    parser.add_argument("--from-log", type=Path, default=None, help="with --save: the curve from a log of this script")
    args = parser.parse_args()
    if args.from_log:
        if not args.save:
            raise SystemExit("--from-log needs --save FILE")
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
        from timematch.runner.gpu_share import save_curve

        gpu, points = parse_log(args.from_log.read_text())
        save_curve(gpu, [{**point, "log": args.from_log.name} for point in points], args.save)
        print(f"merged {len(points)} points of {gpu} from {args.from_log} into {args.save}")
        return
    import torch

    if args.total_steps:
        TOTAL_STEPS.update(graph=args.total_steps, eager=args.total_steps)
    device = "cpu" if args.check_on_cpu else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_sharing.py measures a CUDA device; none is visible here")
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from timematch.data.embedded import ensure_embedded_dataset

    root = str(args.data_root or os.environ.get("TIMEMATCH_DATA") or ensure_embedded_dataset(progress=print))
    counts = [int(t) for t in args.trials.split(",")]
    methods, paths = args.methods.split(","), args.paths.split(",")
    gpu = torch.cuda.get_device_name(0) if device == "cuda" else "CPU (plumbing check)"
    print(f"{gpu}, {os.cpu_count()} CPUs, torch {torch.__version__}; batch {BATCH}, one process and one CPU "
          f"thread per trial, tiles on the GPU; timed window: {TOTAL_STEPS} steps of all trials together "
          f"(at least {MIN_STEPS} each)", flush=True)
    busy = Busy()
    measured: list[dict] = []
    pool = Pool(root, max(counts), device=device)
    try:
        print(HEADER, flush=True)
        for method in methods:
            for path in paths:
                base = None
                for count in counts:
                    result = pool.measure(method, path, count, busy)
                    base = base or result["aggregate"]
                    measured.append({**result, "sharing": "processes"})
                    print(row(result, base), flush=True)
                    if result["path"] != ("cuda_graph" if path == "graph" else "eager"):
                        print(f"  (asked for {path}: {result['reason']})", flush=True)
    finally:
        pool.close()
    if args.streams:
        print("\nK trials in one process, one CUDA stream each (graph replays interleaved):")
        print(HEADER, flush=True)
        base = None
        for count in counts:
            result = streams(root, methods[0], count, busy)
            base = base or result["aggregate"]
            measured.append({**result, "sharing": "streams"})
            print(row(result, base), flush=True)
    if args.mps:
        daemon = start_mps()
        if daemon is None:
            print("\nMPS: not offered on this node (no nvidia-cuda-mps-control); skipped")
        else:
            env, control = daemon
            print("\nK processes under MPS (graph path):")
            print(HEADER, flush=True)
            pool = Pool(root, max(counts), env)
            try:
                base = None
                for count in counts:
                    result = pool.measure(methods[0], "graph", count, busy)
                    base = base or result["aggregate"]
                    measured.append({**result, "sharing": "mps"})
                    print(row(result, base), flush=True)
            finally:
                pool.close()
                stop_mps(env, control)
    if args.save:
        from timematch.runner.gpu_share import save_curve

        args.save.parent.mkdir(parents=True, exist_ok=True)
        save_curve(gpu, [{**m, "torch": torch.__version__, "batch": BATCH} for m in measured], args.save)
        print(f"\nmerged the curve of {gpu} into {args.save}")


if __name__ == "__main__":
    main()

"""Training throughput on this machine: source-only and TimeMatch steps, and shift estimation.

Batch 128, 64 pixels, 30 dates (the published training view), PSE+LTAE, on the embedded
synthetic data (or --data-root). Steps run through the real training loop, with batches
built in its background data thread; the fraction of step time spent waiting for data is
printed. Reference (original public implementation, 2-core machine, same data format):
source-only step 1.0 s (128 samples/s), TimeMatch step 2.0 s, shift estimation 1.4 s per
batch of 128 over 121 shifts, data loading alone 600 samples/s.

    python benchmarks/training_step.py [--steps 30] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import torch

from timematch.data.dataset import DataConfig, open_domains
from timematch.data.embedded import ensure_embedded_dataset
from timematch.methods import build_config, get_method
from timematch.models import build_model
from timematch.shift import estimate_shift, estimate_shift_loop
from timematch.training import fit, pick_device, to_torch

REFERENCE = {"source_only": 1.0, "timematch": 2.0, "shift_per_batch": 1.4}


def run_steps(method_name: str, source, target, device, steps: int, before_timed=None, **overrides) -> dict:
    """Seconds per training step of ``method_name`` (batch 128) after a short warm-up;
    ``before_timed()``, when given, is called between the two (e.g. to start trials together)."""
    config = build_config(method_name, {"epochs": 1, "steps_per_epoch": steps, "batch_size": 128, **overrides})
    model = build_model(num_classes=len(source.classes)).to(device)
    method = get_method(method_name)(config, model, source, target, device)
    # warm-up (allocator, first-call overheads) outside the timed loop
    warm = build_config(method_name, {"epochs": 1, "steps_per_epoch": 2, "batch_size": 128, **overrides})
    method.config = warm
    fit(method, seed=1)
    method.config = config
    if before_timed:
        before_timed()
    timings = fit(method, seed=0)["timings"]
    per_step = timings["step_seconds"] / timings["steps"]
    return {"step_s": per_step, "samples_per_s": 128 / per_step,
            "wait_fraction": timings["data_wait_seconds"] / timings["step_seconds"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", type=Path, default=None)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--shift-batches", type=int, default=3)
    parser.add_argument("--device", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    root = args.data_root or Path(os.environ.get("TIMEMATCH_DATA") or ensure_embedded_dataset(progress=print))
    device = pick_device(args.device)
    source, target = open_domains(root, "DK", "FR1", fold=0, config=DataConfig(min_parcels=50))
    print(f"device {device}, torch threads {torch.get_num_threads()}, {len(source.classes)} classes, "
          f"batch 128 x 64 pixels x 30 dates")

    # data loading alone: the training loop's batches (source strong view + target weak and strong views)
    rng = np.random.default_rng(0)
    started = time.perf_counter()
    for _ in range(args.steps):
        source.strong_batch(rng.choice(source.split.train, 128), rng)
    data_rate = 128 * args.steps / (time.perf_counter() - started)

    so = run_steps("source_only", source, target, device, args.steps)
    tm = run_steps("timematch", source, target, device, args.steps, sample_size=1)

    model = build_model(num_classes=len(source.classes)).to(device).eval()
    batches = [to_torch(target.weak_batch(rng.choice(target.split.train, 128), rng), device)
               for _ in range(args.shift_batches)]
    for b in batches:
        b.pop("label")
    estimate_shift(model, batches[:1], range(-60, 61), "is")  # warm-up
    started = time.perf_counter()
    estimate_shift(model, batches, range(-60, 61), "is")
    shift_s = (time.perf_counter() - started) / len(batches)

    rows = [
        ("data loading (source strong view)", f"{data_rate:8.0f} samples/s", f"{data_rate / 600:5.1f}x"),
        ("source-only step", f"{so['step_s']:8.3f} s ({so['samples_per_s']:.0f} samples/s)",
         f"{REFERENCE['source_only'] / so['step_s']:5.1f}x"),
        ("TimeMatch step", f"{tm['step_s']:8.3f} s ({tm['samples_per_s']:.0f} samples/s)",
         f"{REFERENCE['timematch'] / tm['step_s']:5.1f}x"),
        ("shift estimation, 121 shifts", f"{shift_s:8.3f} s per batch of 128",
         f"{REFERENCE['shift_per_batch'] / shift_s:5.1f}x"),
    ]
    print(f"{'':36s} {'measured':32s} vs original")
    for name, value, ratio in rows:
        print(f"{name:36s} {value:32s} {ratio}")
    print(f"waiting for data: source-only {100 * so['wait_fraction']:.1f} % of step time, "
          f"TimeMatch {100 * tm['wait_fraction']:.1f} %")


if __name__ == "__main__":
    main()

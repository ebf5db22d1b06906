"""Training throughput on this machine: source-only, TimeMatch and the competitors' steps,
and shift estimation.

Batch 128 (source; the adaptation methods add a target batch of 128), 64 pixels, 30 dates
(the published training view), PSE+LTAE, on the embedded synthetic data (or --data-root).
Steps run through the real training loop, with batches built in its background data
thread; the fraction of step time spent waiting for data is printed. A competitor
(MMD, DANN, CDAN, CDAN+E, JUMBOT, ALDA) forwards source and target in one pass; TimeMatch
forwards the teacher on the weak view and the student on source and target separately.

Shift estimation is measured both ways in this run: batched over shifts (this project) and
as the published code does it (the pixel-set encoder once per batch, then one temporal
encoder and decoder pass per shift, :func:`timematch.shift.estimate_shift_loop`).

The "original code" column is **quoted, not measured here**: the public TimeMatch code
(jnyborg/timematch) measured side by side on this project's 2-core machine on 2026-12-02,
as reported in issue #8: source-only step 0.82 s, TimeMatch step 1.16 s, shift estimation
0.92 s per batch of 128 over 121 shifts.

    python benchmarks/training_step.py [--steps 30] [--threads 2] [--methods all|name,...]
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
from timematch.methods import build_config, get_method, method_names
from timematch.models import build_model
from timematch.shift import estimate_shift, estimate_shift_loop
from timematch.evaluation import pick_device, to_torch
from timematch.training import fit

#: Quoted figures (see the docstring): the original code on this machine, issue #8, 2026-12-02.
QUOTED_ORIGINAL = {"source_only": 0.82, "timematch": 1.16, "shift_per_batch": 0.92}
COMPETITORS = ("mmd", "dann", "cdan", "cdan_e", "jumbot", "alda")


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
    parser.add_argument("--competitors", default=",".join(COMPETITORS),
                        help="comma list of competitor methods to time (default: all six; 'none' to skip)")
    parser.add_argument("--device", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    root = args.data_root or Path(os.environ.get("TIMEMATCH_DATA") or ensure_embedded_dataset(progress=print))
    device = pick_device(args.device)
    source, target = open_domains(root, "DK", "FR1", fold=0, config=DataConfig(min_parcels=50))
    print(f"device {device}, torch threads {torch.get_num_threads()}, {len(source.classes)} classes, "
          f"batch 128 x 64 pixels x 30 dates")

    # data loading alone: the source strong view the source-only step consumes
    rng = np.random.default_rng(0)
    started = time.perf_counter()
    for _ in range(args.steps):
        source.strong_batch(rng.choice(source.split.train, 128), rng)
    data_rate = 128 * args.steps / (time.perf_counter() - started)

    timed = {"source_only": run_steps("source_only", source, target, device, args.steps),
             "timematch": run_steps("timematch", source, target, device, args.steps, sample_size=1)}
    competitors = [] if args.competitors == "none" else [m for m in args.competitors.split(",") if m]
    unknown = sorted(set(competitors) - set(method_names()))
    if unknown:
        raise SystemExit(f"--competitors: unknown method(s) {unknown}; valid: {', '.join(method_names())}")
    for name in competitors:
        timed[name] = run_steps(name, source, target, device, args.steps)

    model = build_model(num_classes=len(source.classes)).to(device).eval()
    batches = [to_torch(target.weak_batch(rng.choice(target.split.train, 128), rng), device)
               for _ in range(args.shift_batches)]
    for b in batches:
        b.pop("label")
    estimate_shift(model, batches[:1], range(-60, 61), "is")  # warm-up
    started = time.perf_counter()
    estimate_shift(model, batches, range(-60, 61), "is")
    shift_s = (time.perf_counter() - started) / len(batches)
    started = time.perf_counter()
    estimate_shift_loop(model, batches, range(-60, 61), "is")
    loop_s = (time.perf_counter() - started) / len(batches)

    tm = timed["timematch"]["step_s"]
    print(f"\n{'':34s} {'measured':30s} {'vs TimeMatch step':>18s} {'vs original (quoted)':>21s}")
    print(f"{'data loading (source strong view)':34s} {f'{data_rate:8.0f} samples/s':30s}")
    for name, result in timed.items():
        quoted = QUOTED_ORIGINAL.get(name)
        ratio = f"{quoted / result['step_s']:5.1f}x" if quoted else ""
        value = f"{result['step_s']:8.3f} s ({result['samples_per_s']:.0f} samples/s)"
        print(f"{name + ' step':34s} {value:30s} {result['step_s'] / tm:17.2f}x {ratio:>21s}")
    print(f"{'shift estimation, 121 shifts':34s} {f'{shift_s:8.3f} s per batch of 128':30s} {'':18s} "
          f"{QUOTED_ORIGINAL['shift_per_batch'] / shift_s:20.1f}x")
    print(f"{'  as the published code does it':34s} {f'{loop_s:8.3f} s per batch of 128':30s} "
          f"(batched: {loop_s / shift_s:.1f}x faster, same run)")
    waits = ", ".join(f"{name} {100 * r['wait_fraction']:.1f} %" for name, r in timed.items())
    print(f"waiting for data (share of step time): {waits}")


if __name__ == "__main__":
    main()

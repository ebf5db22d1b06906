"""Training throughput on this machine: source-only, TimeMatch and the competitors' steps,
on the eager path and (on a GPU) the fast path, and shift estimation.

Batch 128 (source; the adaptation methods add a target batch of 128), 64 pixels, 30 dates
(the published training view), PSE+LTAE, on the embedded synthetic data (or --data-root).
Steps run through the real training loop's engine (:func:`timematch.training.prepare`, then
:meth:`~timematch.step_engine.StepEngine.run_epoch`): a warm-up epoch (on the fast path it
holds the capture of the CUDA graph), then ``--steps`` timed steps, ending with the epoch's
one read back (so the GPU has finished). The per-epoch evaluation is not timed. The
competitors come from the registry: every method that adapts the source model to the target,
TimeMatch aside (timed anyway), in table order. Most (MMD, DANN, JUMBOT, ...) forward source and
target in one pass; TimeMatch and FixMatch forward the teacher on the weak view and the student
on source and target separately. ``--batch-size 256`` times MAD and C-MAD at their published
batch (256 per domain).

Every step builds its own batches (:mod:`timematch.data.views`): on a GPU inside the
captured step from the tiles on the GPU, on a CPU in the step's thread; the times include it. ``--paths eager,graph`` (the default on a GPU) times both in one run;
``--precision bf16`` the bf16 autocast variant.

Shift estimation is measured both ways in this run: batched over shifts (this project) and
as the published code does it (the pixel-set encoder once per batch, then one temporal
encoder and decoder pass per shift, :func:`timematch.shift.estimate_shift_loop`).

The "original code" column is **quoted, not measured here**: the public TimeMatch code
(jnyborg/timematch) measured side by side on this project's 2-core machine on 2026-12-02,
as reported in issue #8: source-only step 0.82 s, TimeMatch step 1.16 s, shift estimation
0.92 s per batch of 128 over 121 shifts.

    python benchmarks/training_step.py [--steps 30] [--threads 2] [--competitors all|none|name,...]
        [--device cuda] [--paths eager,graph] [--precision fp32|bf16] [--batch-size 128]
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
from timematch.data.views import DomainViews
from timematch.methods import build_config, get_method, method_names, methods_in_table_order
from timematch.models import build_model
from timematch.shift import estimate_shift, estimate_shift_loop
from timematch.evaluation import pick_device
from timematch.training import Execution, prepare

#: Quoted figures (see the docstring): the original code on this machine, issue #8, 2026-12-02.
QUOTED_ORIGINAL = {"source_only": 0.82, "timematch": 1.16, "shift_per_batch": 0.92}
#: Every registered method that adapts the source model to the target (reads both tiles), TimeMatch aside.
COMPETITORS = tuple(m for m in methods_in_table_order()
                    if get_method(m).starts_from_source and get_method(m).trains_on == "both" and m != "timematch")
PATHS = {"eager": False, "graph": True}


WARMUP_STEPS = 10


def run_steps(method_name: str, source, target, device, steps: int, cuda_graph: bool = True,
              precision: str = "fp32", batch_size: int = 128, **overrides) -> dict:
    """Seconds per training step of ``method_name`` (``batch_size`` per domain) over ``steps``
    steps after a warm-up epoch, and the step path it ran on."""
    config = build_config(method_name, {"epochs": 1000, "steps_per_epoch": steps, "batch_size": batch_size,
                                        **overrides})
    torch.manual_seed(0)
    model = build_model(num_classes=len(source.classes)).to(device)
    method = get_method(method_name)(config, model, source, target, device)
    engine = prepare(method, 0, Execution(precision=precision, cuda_graph=cuda_graph))
    method.start_epoch(1, np.random.default_rng(0), [])  # TimeMatch's shift and class prior
    method.set_train_mode()
    engine.run_epoch(WARMUP_STEPS)
    started = time.perf_counter()
    engine.run_epoch(steps)  # ends with the epoch's one read back: the GPU has finished
    per_step = (time.perf_counter() - started) / steps
    return {"step_s": per_step, "samples_per_s": batch_size / per_step, "steps_per_s": 1 / per_step,
            "path": engine.path, "reason": engine.reason}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", type=Path, default=None)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--shift-batches", type=int, default=3)
    parser.add_argument("--competitors", default="all",
                        help=f"comma list of competitor methods to time, 'all' ({','.join(COMPETITORS)}; the default) "
                             "or 'none'")
    parser.add_argument("--batch-size", type=int, default=128, help="per domain (default 128)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--paths", default=None, help="eager,graph (default: both on a GPU, eager on a CPU)")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--no-shift", action="store_true", help="skip the shift-estimation timing")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    root = args.data_root or Path(os.environ.get("TIMEMATCH_DATA") or ensure_embedded_dataset(progress=print))
    device = pick_device(args.device)
    paths = (args.paths or ("eager,graph" if device.type == "cuda" else "eager")).split(",")
    unknown = sorted(set(paths) - set(PATHS))
    if unknown:
        raise SystemExit(f"--paths: unknown {unknown}; valid: {', '.join(PATHS)}")
    source, target = open_domains(root, "DK", "FR1", fold=0, config=DataConfig(min_parcels=50))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{os.cpu_count()} CPU cores"
    print(f"device {device} ({name}), torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{len(source.classes)} classes, batch {args.batch_size} x 64 pixels x 30 dates, {args.precision}, "
          f"{args.steps} timed steps")

    # building batches alone: the source strong view the source-only step consumes
    views = DomainViews.on(source, device, None if device.type == "cuda" else torch.Generator().manual_seed(0))
    views.strong(views.draw_labelled(128))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    for _ in range(args.steps):
        views.strong(views.draw_labelled(128))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    data_rate = 128 * args.steps / (time.perf_counter() - started)

    competitors = ([] if args.competitors == "none" else list(COMPETITORS) if args.competitors == "all"
                   else [m for m in args.competitors.split(",") if m])
    unknown = sorted(set(competitors) - set(method_names()))
    if unknown:
        raise SystemExit(f"--competitors: unknown method(s) {unknown}; valid: {', '.join(method_names())}")
    timed: dict[tuple[str, str], dict] = {}
    for method_name in ("source_only", "timematch", *competitors):
        extra = {"sample_size": 1} if method_name == "timematch" else {}
        for path in paths:
            timed[method_name, path] = run_steps(method_name, source, target, device, args.steps, PATHS[path],
                                                 args.precision, args.batch_size, **extra)

    if not args.no_shift:
        model = build_model(num_classes=len(source.classes)).to(device).eval()
        rng = np.random.default_rng(0)
        target_views = DomainViews.on(target, device, None if device.type == "cuda" else torch.Generator())
        batches = [target_views.weak(torch.as_tensor(rng.choice(target.split.train, 128), device=device))
                   for _ in range(args.shift_batches)]
        estimate_shift(model, batches[:1], range(-60, 61), "is")  # warm-up
        started = time.perf_counter()
        estimate_shift(model, batches, range(-60, 61), "is")
        shift_s = (time.perf_counter() - started) / len(batches)
        started = time.perf_counter()
        estimate_shift_loop(model, batches, range(-60, 61), "is")
        loop_s = (time.perf_counter() - started) / len(batches)

    reference = timed["timematch", paths[0]]["step_s"]
    print(f"\n{'':28s} {'path':10s} {'measured':36s} {'vs TimeMatch':>12s} {'vs original (quoted)':>21s}")
    print(f"{'building batches (strong)':28s} {'':10s} {f'{data_rate:8.0f} samples/s':36s}")
    for (method_name, path), result in timed.items():
        quoted = QUOTED_ORIGINAL.get(method_name)
        ratio = f"{quoted / result['step_s']:5.1f}x" if quoted else ""
        value = (f"{1000 * result['step_s']:8.2f} ms = {result['steps_per_s']:6.1f} steps/s "
                 f"({result['samples_per_s']:.0f} samples/s)")
        shown = result["path"] if result["path"] == "cuda_graph" or path == "eager" else "eager (!)"
        print(f"{method_name + ' step':28s} {shown:10s} {value:36s} {result['step_s'] / reference:11.2f}x {ratio:>21s}")
    for (method_name, path), result in timed.items():
        if path == "graph" and result["path"] != "cuda_graph":
            print(f"  {method_name}: ran eagerly on the fast path: {result['reason']}")
    if not args.no_shift:
        print(f"{'shift estimation, 121 shifts':28s} {'':10s} {f'{shift_s:8.3f} s per batch of 128':36s} {'':12s} "
              f"{QUOTED_ORIGINAL['shift_per_batch'] / shift_s:20.1f}x")
        print(f"{'  as the published code does':28s} {'':10s} {f'{loop_s:8.3f} s per batch of 128':36s} "
              f"(batched: {loop_s / shift_s:.1f}x faster, same run)")
    print("(every step builds its own batches from the tiles: on the GPU inside the captured step, on a CPU "
          "in the step's thread; the steps/s above include it)")


if __name__ == "__main__":
    main()

"""One shift-estimation pass: batched over shifts vs the published code's loop, same data, one run.

121 candidate shifts ([-60, 60]) over N batches of 128 target parcels (weak view, all
dates), PSE+LTAE in eval mode. Both forms run the pixel-set encoder once per batch. The
batched form then sends all shifts through the temporal encoder and decoder together (LTAE's
shift-independent work done once); the loop form, as the published code does, runs the
temporal encoder and decoder once per shift (:func:`timematch.shift.estimate_shift_loop`).

    python benchmarks/shift_estimation.py [--batches 100] [--loop-batches 2]
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
from timematch.models import build_model
from timematch.shift import estimate_shift, estimate_shift_loop
from timematch.data.views import DomainViews
from timematch.evaluation import pick_device


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", type=Path, default=None)
    parser.add_argument("--batches", type=int, default=100, help="batches of the batched pass (capped by the data)")
    parser.add_argument("--loop-batches", type=int, default=2, help="batches timed for the loop (it is slow)")
    parser.add_argument("--device", default=None)
    args = parser.parse_args()
    root = args.data_root or Path(os.environ.get("TIMEMATCH_DATA") or ensure_embedded_dataset(progress=print))
    device = pick_device(args.device)
    _, target = open_domains(root, "DK", "FR1", fold=0, config=DataConfig(min_parcels=50))
    rng = np.random.default_rng(0)
    parcels = rng.permutation(target.split.train)
    n_batches = min(args.batches, len(parcels) // 128)
    views = DomainViews.on(target, "cpu", torch.Generator().manual_seed(0))
    order = torch.as_tensor(parcels)
    batches = [views.weak(order[i * 128 : (i + 1) * 128]).to(device) for i in range(n_batches)]
    torch.manual_seed(0)
    model = build_model(num_classes=len(target.classes)).to(device).eval()
    shifts = range(-60, 61)
    estimate_shift(model, batches[:1], shifts, "is")  # warm-up
    started = time.perf_counter()
    estimate_shift(model, batches, shifts, "is")
    batched = (time.perf_counter() - started) / len(batches)
    loop_batches = batches[: max(1, min(args.loop_batches, len(batches)))]
    started = time.perf_counter()
    estimate_shift_loop(model, loop_batches, shifts, "is")
    loop = (time.perf_counter() - started) / len(loop_batches)
    print(f"device {device}, torch threads {torch.get_num_threads()}; 121 shifts, {len(batches)} batches of 128 "
          f"(the target's training split holds {len(parcels)} parcels)")
    print(f"batched       : {batched:7.3f} s per batch  -> {batched * len(batches):7.1f} s per pass of {len(batches)} batches")
    print(f"published loop: {loop:7.3f} s per batch  -> {loop * len(batches):7.1f} s per pass of {len(batches)} batches")
    print(f"speed-up      : {loop / batched:7.1f}x")


if __name__ == "__main__":
    main()

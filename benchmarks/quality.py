"""Does adaptation work? Source-only, FixMatch, TimeMatch and the upper bound on one scenario.

Prints target-test macro F1 and the estimated shift against the planted one (read from the
synthetic data's ground-truth file); then what temporal shift augmentation of the source
model does to shift estimation: a source model trained with and one trained without it,
each with its inception-score shift estimate over [-60, 60] on the target (TimeMatch's
initialisation), its own target F1, and TimeMatch's estimate and F1 when started from it;
then the normalisation comparison: source-only training with the published scaling
(x / 65535) against per-band source statistics (the default), epoch by epoch on the
source validation split.

``--sections precision`` compares ``--precision fp32`` with ``bf16`` (autocast in the
training steps, on a GPU): source model and TimeMatch trained from ``--seeds`` seeds in each
precision, TimeMatch's target F1 and shift estimate side by side, with the seed-to-seed
spread as the noise the difference is measured against.

    python benchmarks/quality.py [--scenario DK:FR1] [--fold 0] [--budget small|paper]
        [--sections adaptation,augmentation,normalisation,precision] [--seeds 3]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path

from timematch.data.dataset import DataConfig
from timematch.data.embedded import ensure_embedded_dataset
from timematch.data.synthetic import GROUND_TRUTH_FILE
from timematch.data.tiles import short_name, resolve_tile
from timematch.data.dataset import Normalizer, open_domains
import statistics

import torch

from timematch.data.views import DomainViews
from timematch.evaluation import evaluate, pick_device
from timematch.experiment import ExperimentSpec, PretrainedSource, pretrain_source, run_experiment
from timematch.models import build_model
from timematch.shift import estimate_shift

BUDGETS = {
    # a few minutes on 2 CPU cores
    "small": {
        "pretrain": {"epochs": 10, "steps_per_epoch": 25},
        "timematch": {"epochs": 5, "steps_per_epoch": 25, "sample_size": 8},
        "fixmatch": {"epochs": 5, "steps_per_epoch": 25},
        "upper_bound": {"epochs": 10, "steps_per_epoch": 25},
    },
    "paper": {"pretrain": {}, "timematch": {}, "fixmatch": {}, "upper_bound": {}},
}


def planted_shift(root: Path, source: str, target: str) -> int | None:
    path = root / GROUND_TRUTH_FILE
    if not path.is_file():
        return None
    truth = json.loads(path.read_text())
    return truth["expected_shifts"].get(f"{short_name(source)}->{short_name(target)}")


def initial_estimate(spec: ExperimentSpec, pretrained: PretrainedSource, batches: int = 8) -> tuple[int, float]:
    """The source model's IS shift estimate over [-60, 60] on target training parcels (as
    TimeMatch initialises), and its target test macro F1."""
    import numpy as np

    device = pick_device(spec.device)
    _, target = open_domains(spec.data_root, spec.source, spec.target, spec.fold, spec.data, spec.cache_dir)
    target.normalizer = Normalizer.from_dict(pretrained.normalizer)
    model = build_model(spec.model, num_classes=len(pretrained.classes))
    model.load_state_dict(pretrained.state_dict)
    model = model.to(device).eval()
    rng = np.random.default_rng(0)
    parcels = torch.as_tensor(rng.permutation(target.split.train)[: batches * 128])
    views = DomainViews.on(target, "cpu", torch.Generator().manual_seed(0))
    weak = [views.weak(parcels[start : start + 128]).to(device) for start in range(0, len(parcels), 128)]
    scores = estimate_shift(model, weak, range(-60, 61), "is")
    return scores.estimate, evaluate(model, target, "test", device)["macro_f1"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", type=Path, default=None)
    parser.add_argument("--scenario", default="DK:FR1")
    parser.add_argument("--fold", type=int, default=0)
    parser.add_argument("--budget", choices=sorted(BUDGETS), default="small")
    parser.add_argument("--min-parcels", type=int, default=50)
    parser.add_argument("--verbose", action="store_true")
    parser.add_argument("--sections", default="adaptation,augmentation,normalisation",
                        help="comma list of: adaptation, augmentation, normalisation, precision")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per precision (the precision section)")
    args = parser.parse_args()
    sections = set(args.sections.split(","))
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    root = args.data_root or Path(os.environ.get("TIMEMATCH_DATA") or ensure_embedded_dataset(progress=print))
    source, target = (resolve_tile(t) for t in args.scenario.split(":"))
    budget = BUDGETS[args.budget]
    spec = ExperimentSpec(data_root=root, source=source, target=target, method="source_only", fold=args.fold,
                          pretrain_config=budget["pretrain"], data=DataConfig(min_parcels=args.min_parcels))
    started = time.perf_counter()
    truth = planted_shift(root, source, target)
    if "precision" in sections:
        compare_precisions(spec, budget, args.seeds, truth)
    if not sections & {"adaptation", "augmentation", "normalisation"}:
        return
    pretrained = pretrain_source(spec)
    rows = []
    for method in ("source_only", "fixmatch", "timematch", "upper_bound"):
        result = run_experiment(spec.replace(method=method, method_config=budget.get(method, {})), pretrained)
        rows.append((method, result.metrics["test_macro_f1"], result.metrics.get("estimated_shift")))
    print(f"{short_name(source)} -> {short_name(target)}, fold {args.fold}, budget {args.budget!r}, "
          f"{len(pretrained.classes)} classes; planted target-to-source shift: {truth} days "
          f"({time.perf_counter() - started:.0f} s)")
    print(f"{'method':14s} {'test macro F1':>14s} {'estimated shift':>16s}")
    for method, f1, shift in rows:
        print(f"{method:14s} {100 * f1:14.1f} {'' if shift is None else f'{shift:+.0f}':>16s}")

    if "augmentation" not in sections:
        return
    print(f"\nshift augmentation of the source model (planted shift {truth}; IS over [-60, 60] on the target):")
    print(f"{'source model':26s} {'IS estimate':>12s} {'its target F1':>14s} {'TimeMatch estimate':>19s} "
          f"{'TimeMatch F1':>13s}")
    augmented = {**budget["pretrain"], "shift_aug": True}
    for label, source_model, pretrain_config in (
        ("without (the default)", pretrained, budget["pretrain"]),
        ("with shift_aug", pretrain_source(spec.replace(pretrain_config=augmented)), augmented),
    ):
        estimate, f1 = initial_estimate(spec, source_model)
        tm = run_experiment(spec.replace(method="timematch", method_config=budget["timematch"],
                                         pretrain_config=pretrain_config), source_model)
        print(f"{label:26s} {estimate:+12d} {100 * f1:14.1f} {tm.metrics['estimated_shift']:+19.0f} "
              f"{100 * tm.metrics['test_macro_f1']:13.1f}")

    if "normalisation" not in sections:
        return
    print("\nnormalisation (source-only training, source validation macro F1 per epoch):")
    published = pretrain_source(spec.replace(data=DataConfig(min_parcels=args.min_parcels, normalization="published")))
    for name, curve in (("published", published), ("source_stats", pretrained)):  # the default trained above
        values = " ".join(f"{100 * h.metrics['source_val_f1']:5.1f}" for h in curve.history)
        print(f"  {name:13s} {values}")


def compare_precisions(spec: ExperimentSpec, budget: dict, seeds: int, truth: int | None) -> None:
    """TimeMatch's target F1 and shift estimate in fp32 and bf16, each from ``seeds`` seeds
    (source model included), on this machine's device."""
    device = pick_device(spec.device)
    print(f"precision on {device}: source model + TimeMatch from {seeds} seeds each "
          f"(planted shift {truth} days)")
    print(f"{'precision':10s} {'TimeMatch F1 (mean +- std over seeds)':40s} {'estimated shifts':24s} {'seconds':>8s}")
    for precision in ("fp32", "bf16"):
        if precision == "bf16" and device.type != "cuda":
            print(f"{precision:10s} skipped: bf16 autocast is measured on a GPU")
            continue
        f1s, shifts, started = [], [], time.perf_counter()
        for seed in range(seeds):
            run = spec.replace(precision=precision, seed=seed)
            source_model = pretrain_source(run)
            result = run_experiment(run.replace(method="timematch", method_config=budget["timematch"]), source_model)
            f1s.append(100 * result.metrics["test_macro_f1"])
            shifts.append(int(result.metrics["estimated_shift"]))
        spread = statistics.stdev(f1s) if len(f1s) > 1 else 0.0
        values = ", ".join(f"{v:.1f}" for v in f1s)
        summary = f"{statistics.mean(f1s):.1f} +- {spread:.1f}  ({values})"
        estimates = ", ".join(f"{d:+d}" for d in shifts)
        print(f"{precision:10s} {summary:40s} {estimates:24s} {time.perf_counter() - started:8.0f}")


if __name__ == "__main__":
    main()

"""What choosing without target labels costs: every epoch's selection criteria against the
epoch's training, on the quick profile's budget, one run.

Every epoch of every trial computes all the criteria of :data:`timematch.selection.CRITERIA`
(:func:`timematch.selection.selection_criteria`): one forward pass over the target validation
split, the labelled source validation split and at most 1000 source training parcels, then
DEV's domain classifier (5-fold cross-validated logistic regression), SND's similarity
matrix and the few-shot F1. Before the criteria existed an epoch evaluated the target
validation split once (:func:`timematch.evaluation.evaluate`: the oracle and IM from one
pass); that pass is the baseline, measured here in the same run. Both are set against one
epoch of TimeMatch training at the quick profile's budget (25 steps, batch 64).

Target (benchmarks only, never a test): the criteria cost at most 25 % of a quick-profile
TimeMatch epoch on 2 CPU cores (the paper's 500-step epochs make it 20x smaller).

    python benchmarks/selection.py [--repeats 3] [--threads N]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from timematch.data.dataset import DataConfig, open_domains
from timematch.data.embedded import ensure_embedded_dataset
from timematch.evaluation import evaluate, pick_device
from timematch.methods import build_config, get_method
from timematch.models import build_model
from timematch.selection import (
    _logits_and_features, dev_score, few_shot_f1, few_shot_indices, selection_criteria, snd_score,
)
from timematch.training import fit

TARGET_FRACTION = 0.25
QUICK_EPOCH = {"epochs": 1, "steps_per_epoch": 25, "batch_size": 64, "sample_size": 16}


def timed(fn, repeats: int) -> float:
    """Median seconds of ``repeats`` calls of ``fn`` after one warm-up call."""
    fn()
    runs = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - started)
    return statistics.median(runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", type=Path, default=None)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--device", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    root = args.data_root or Path(os.environ.get("TIMEMATCH_DATA") or ensure_embedded_dataset(progress=print))
    device = pick_device(args.device)
    source, target = open_domains(root, "DK", "FR1", fold=0, config=DataConfig(min_parcels=50))
    torch.manual_seed(0)
    model = build_model(num_classes=len(source.classes)).to(device)

    baseline = timed(lambda: evaluate(model, target, "val", device), args.repeats)
    criteria = timed(lambda: selection_criteria(model, source, target, device), args.repeats)

    # the parts, on the same features
    target_parcels = np.asarray(target.split.val)
    source_parcels = source.labelled("val")
    train_parcels = source.labelled("train")
    if len(train_parcels) > 1000:  # as selection_criteria subsamples DEV's fitting set
        train_parcels = np.sort(np.random.default_rng(0).choice(train_parcels, 1000, replace=False))
    model.eval()
    forward = timed(lambda: [_logits_and_features(model, d, p, device) for d, p in
                             ((target, target_parcels), (source, source_parcels), (source, train_parcels))],
                    args.repeats)
    t_logits, t_feats = _logits_and_features(model, target, target_parcels, device)
    s_logits, s_feats = _logits_and_features(model, source, source_parcels, device)
    _, train_feats = _logits_and_features(model, source, train_parcels, device)
    losses = torch.nn.functional.cross_entropy(
        torch.from_numpy(s_logits), torch.from_numpy(source.labels[source_parcels]), reduction="none").numpy()
    probs = torch.from_numpy(t_logits).softmax(-1).numpy()
    dev = timed(lambda: dev_score(s_feats, losses, t_feats, train_feats), args.repeats)
    snd = timed(lambda: snd_score(probs), args.repeats)
    labels = target.labels[target_parcels]

    def few_shot() -> float:
        shots = few_shot_indices(labels, target_parcels, 5, 0, target.split.test)
        rows = np.isin(target_parcels, shots)
        return few_shot_f1(probs[rows], labels[rows], target.classes)

    shots = timed(few_shot, args.repeats)

    config = build_config("timematch", QUICK_EPOCH)
    method = get_method("timematch")(config, model.train(), source, target, device)
    started = time.perf_counter()
    fit(method, seed=0)  # one epoch, its shift estimation and its criteria included
    epoch = time.perf_counter() - started

    print(f"device {device}, torch threads {torch.get_num_threads()}; DK -> FR1 fold 0: target validation "
          f"{len(target_parcels)} parcels, source validation {len(source_parcels)}, source training subsample "
          f"{len(train_parcels)}")
    print(f"one evaluation of the target validation split (before the criteria): {baseline:6.2f} s")
    print(f"every criterion (selection_criteria)                             : {criteria:6.2f} s "
          f"({criteria / baseline:.1f}x)")
    print(f"  forward passes {forward:5.2f} s, DEV {dev:5.2f} s, SND {snd:5.2f} s, few-shot {shots:5.3f} s")
    print(f"one quick-profile TimeMatch epoch (25 steps, batch 64, with its criteria): {epoch:6.2f} s")
    fraction = criteria / epoch
    verdict = "meets" if fraction <= TARGET_FRACTION else "MISSES"
    print(f"criteria / epoch: {100 * fraction:.0f} % ({verdict} the target of {100 * TARGET_FRACTION:.0f} %)")


if __name__ == "__main__":
    main()

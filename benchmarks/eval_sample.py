"""The standard error that evaluating a sample of the validation split adds to each criterion.

Per-epoch evaluation uses a fixed, seeded, class-stratified sample of ``data.eval_parcels``
parcels per split part (:meth:`timematch.data.dataset.Domain.evaluation_sample`) instead of the
whole part. This measures what that costs in precision: a source model (DK, ``--pretrain-steps``
steps of the quick profile's source training) is scored on DK -> FR1 by every selection
criterion (:func:`timematch.selection.selection_criteria`: the oracle target F1, source
validation F1, IM, entropy, DEV, SND, few-shot F1) on the whole validation parts, then on
``--repeats`` samples of each size (sample seeds 1..R; the sample of a launch is one of them),
and reports per criterion and size the standard deviation over the samples (the standard error
of the sampled value) and the mean difference from the whole-split value (its bias), next to
the spread of the criterion itself across the trials of a search (what it has to tell apart)
where known.

    python benchmarks/eval_sample.py --root DIR_WITH_DK_AND_FR1 [--sizes 250,500,1000,2000]
        [--repeats 10] [--pretrain-steps 200]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", required=True, help="a dataset with DK and FR1 (e.g. benchmarks/scale.py --keep)")
    parser.add_argument("--cache", help="cache folder (default: $TIMEMATCH_CACHE)")
    parser.add_argument("--sizes", default="250,500,1000,2000")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--pretrain-steps", type=int, default=200)
    args = parser.parse_args()

    import torch

    from timematch.experiment import ExperimentSpec, _open, pretrain_source
    from timematch.models import build_model
    from timematch.runner.profiles import load_profile
    from timematch.selection import selection_criteria

    torch.set_num_threads(2)
    profile = load_profile(REPO / "experiments" / "profiles", "quick")
    pretrain = {**profile.pretrain, "epochs": max(1, args.pretrain_steps // 25), "steps_per_epoch": 25}
    spec = ExperimentSpec(data_root=Path(args.root), source="DK", target="FR1", method="timematch",
                          pretrain_config=pretrain, data=dataclasses.replace(profile.data_config(), eval_parcels=0),
                          cache_dir=Path(args.cache) if args.cache else None, device="cpu")
    pretrained = pretrain_source(spec)
    source, target = _open(spec, pretrained=pretrained)
    model = build_model(spec.model, num_classes=len(source.classes))
    model.load_state_dict(pretrained.state_dict)
    device = torch.device("cpu")
    print(f"DK -> FR1, {len(source.packed)} and {len(target.packed)} parcels; validation parts: source "
          f"{len(source.labelled('val'))} labelled, target {len(target.split.val)}; source model "
          f"{args.pretrain_steps} steps (source val F1 {pretrained.source_val_f1:.3f})", flush=True)

    started = time.perf_counter()
    whole = selection_criteria(model, source, target, device)
    whole_s = time.perf_counter() - started
    print(f"whole parts: {whole_s:.1f} s", flush=True)
    names = list(whole)
    rows = {}
    for size in [int(s) for s in args.sizes.split(",")]:
        values, seconds = [], []
        for repeat in range(1, args.repeats + 1):
            config = dataclasses.replace(source.config, eval_parcels=size, split_seed=repeat)  # the sample's seed only:
            s = dataclasses.replace(source, config=config)  # the split is made already
            t = dataclasses.replace(target, config=config)
            began = time.perf_counter()
            values.append(selection_criteria(model, s, t, device))
            seconds.append(time.perf_counter() - began)
        rows[size] = {name: (float(np.std([v[name] for v in values], ddof=1)),
                             float(np.mean([v[name] for v in values]) - whole[name])) for name in names}
        rows[size]["seconds"] = float(np.median(seconds))
        print(f"size {size}: {rows[size]['seconds']:.1f} s per evaluation", flush=True)

    print("\nstandard error (sd over samples) / bias (mean - whole), per criterion; whole-part value in the header")
    print("| parcels per part | s per evaluation | " + " | ".join(f"{n} ({whole[n]:.3f})" for n in names) + " |")
    print("|---|---|" + "---|" * len(names))
    print(f"| whole | {whole_s:.1f} | " + " | ".join("-" for _ in names) + " |")
    for size, row in rows.items():
        print(f"| {size} | {row['seconds']:.1f} | "
              + " | ".join(f"{row[n][0]:.4f} / {row[n][1]:+.4f}" for n in names) + " |")


if __name__ == "__main__":
    main()

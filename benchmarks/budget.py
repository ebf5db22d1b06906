"""From which training budget does each adaptation method act? Every adapting method on one
scenario at increasing budgets, each with its published optimiser and schedule.

At each budget (total steps, in 4 epochs as the quick profile trains) every method gets the
quick profile's config for it (batch size, TimeMatch's sample size, RAINCOAT's correction
epoch) with the budget's epochs and steps, its step-based schedules scaled to the budget
(:meth:`~timematch.methods.base.TrainConfig.scaled_to`: the inverse decay's gamma and the
reversal's warm-up, as the quick profile compresses the paper's 10,000 steps to 100), and
starts from the same source model (the quick profile's, cached as launches cache it).

A control row, ``finetune``, is DANN with ``trade_off=0``: the competitors' optimiser and
schedule, the mixed source and target batches (so the same batch-norm statistics), and no
alignment term: fine-tuning on the source. A competitor that agrees with it on nearly every
target test parcel does, at that budget, nothing its alignment term is for.

Prints per method and budget: target test macro F1, how far the weights moved from the source
model (encoder, classifier: ||theta - theta_0|| / ||theta_0||), the share of target test
predictions that differ from the source model's (and the share the batch-norm statistics
alone change), agreement with the control, and seconds (wall clock, and the process's CPU
seconds, which another load on the machine inflates less); writes them as JSON to ``--out``.

    python benchmarks/budget.py [--scenario DK:FR1] [--fold 0] [--budgets 100,1000,3000]
        [--methods all] [--out benchmarks/results/budget.json] [--threads N] [--device cpu]
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

from timematch.data.embedded import ensure_embedded_dataset
from timematch.data.tiles import default_cache_dir
from timematch.experiment import ExperimentSpec, PretrainedSource, pretrain_source, run_experiment, source_training
from timematch.methods import build_config, get_method, method_names
from timematch.runner.plan import source_model_path
from timematch.runner.profiles import load_profile

PROFILES = Path(__file__).resolve().parent.parent / "experiments" / "profiles"
EPOCHS = 4  # as the quick profile: its selection and RAINCOAT's correction epoch keep their meaning
CONTROL = "finetune"


def adapting_methods() -> list[str]:
    """Every registered method that starts from the source model."""
    return sorted((m for m in method_names() if get_method(m).starts_from_source), key=lambda m: get_method(m).table_order)


def budget_config(method: str, steps: int, base: dict) -> dict:
    """``method``'s config at a budget of ``steps`` steps (from its quick-profile config ``base``)."""
    if steps % EPOCHS:
        raise SystemExit(f"--budgets: {steps} is not a multiple of {EPOCHS} epochs")
    # the scaled schedule settings replace the quick profile's (its own 100-step scaling)
    return {**base, "epochs": EPOCHS, "steps_per_epoch": steps // EPOCHS, **build_config(method, {}).scaled_to(steps)}


def source_model(spec: ExperimentSpec, cache: Path) -> PretrainedSource:
    """The quick profile's source model of ``spec``: read from the launches' cache, else trained and stored."""
    training = source_training(spec)
    path = source_model_path(cache, training.key)
    if path.is_file():
        return PretrainedSource.load(path)
    logging.info("training the source model %s (cached as %s)", training.key, path)
    pretrained = pretrain_source(spec)
    path.parent.mkdir(parents=True, exist_ok=True)
    return PretrainedSource.load(pretrained.save(path))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenario", default="DK:FR1")
    parser.add_argument("--fold", type=int, default=0)
    parser.add_argument("--budgets", default="100,1000,3000", help="total steps per training, comma-separated")
    parser.add_argument("--methods", default="all", help="comma-separated, or all (every adapting method)")
    parser.add_argument("--profile", default="quick", help="whose configs and source model to start from")
    parser.add_argument("--out", default="benchmarks/results/budget.json")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: CUDA when present)")
    parser.add_argument("--data-root", default=None, help="default: the embedded synthetic dataset")
    parser.add_argument("--cache-dir", default=None, help="where source models are cached (default: the launches')")
    parser.add_argument("--resume", action="store_true",
                        help="keep the rows --out holds (same scenario and fold) and run only the missing ones")
    parser.add_argument("--markdown", action="store_true",
                        help="print the table of the rows --out holds, as docs/results.md shows it, and exit")
    args = parser.parse_args()
    if args.markdown:
        print(markdown(json.loads(Path(args.out).read_text())))
        return
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    methods = adapting_methods() if args.methods == "all" else args.methods.split(",")
    unknown = sorted(set(methods) - set(adapting_methods()))
    if unknown:
        raise SystemExit(f"--methods: {unknown} do not start from the source model; choose from {adapting_methods()}")
    budgets = [int(b) for b in args.budgets.split(",")]
    cache = Path(args.cache_dir) if args.cache_dir else default_cache_dir()
    root = Path(args.data_root) if args.data_root else ensure_embedded_dataset(cache)
    profile = load_profile(PROFILES, args.profile)
    source, target = args.scenario.split(":")
    base_spec = ExperimentSpec(data_root=root, source=source, target=target, method="source_only", fold=args.fold,
                               pretrain_config=profile.pretrain, data=profile.data_config(), cache_dir=cache,
                               device=args.device)
    pretrained = source_model(base_spec, cache)
    kept = kept_rows(Path(args.out), args) if args.resume else []
    started = time.perf_counter()
    baseline = run_experiment(base_spec.replace(method_config=profile.method_overrides("source_only")), pretrained)
    rows = [{"method": "source_only", "budget": 0, "test_macro_f1": baseline.metrics["test_macro_f1"],
             "seconds": time.perf_counter() - started}]
    rows += [row for row in kept if row["budget"]]
    done = {(row["method"], row["budget"]) for row in rows}
    print(f"{args.scenario}, fold {args.fold}, profile {args.profile}; source model {pretrained.key}")
    print(f"source_only: test macro F1 {100 * baseline.metrics['test_macro_f1']:.1f} "
          f"({len(baseline.predictions)} target test parcels)")
    header = (f"{'method':<12}{'steps':>7}{'F1':>7}{'enc %':>8}{'cls %':>8}{'chg %':>8}{'BN %':>7}"
              f"{'=ctrl %':>9}{'s':>7}{'cpu s':>7}")
    print(header)
    for steps in budgets:
        control = None
        if all((method, steps) in done for method in methods):
            print(f"{'(all)':<12}{steps:>7}  (kept from {args.out})")
            continue
        for method in [CONTROL, *methods]:
            name = "dann" if method == CONTROL else method
            if (method, steps) in done:
                kept_row = next(r for r in rows if (r["method"], r["budget"]) == (method, steps))
                if method != CONTROL or "predictions" in kept_row:
                    if method == CONTROL:
                        control = np.asarray(kept_row["predictions"])
                    print(f"{method:<12}{steps:>7}  (kept from {args.out})")
                    continue
                rows.remove(kept_row)  # a control without its predictions: run it again
            config = budget_config(name, steps, profile.method_overrides(name))
            if method == CONTROL:
                config["trade_off"] = 0.0
            spec = base_spec.replace(method=name, method_config=config)
            started, cpu = time.perf_counter(), time.process_time()
            result = run_experiment(spec, pretrained)
            seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
            if method == CONTROL:
                control = result.predictions
            metrics = result.metrics
            row = {
                "method": method, "budget": steps, "config": config, "seconds": seconds, "cpu_seconds": cpu,
                "test_macro_f1": metrics["test_macro_f1"],
                **{k: metrics[k] for k in ("moved_encoder", "moved_classifier", "changed_predictions",
                                           "changed_by_batch_norm")},
                "agrees_with_control": float(np.mean(result.predictions == control)),
            }
            if method == CONTROL:  # kept, so that a resumed run compares with it
                row["predictions"] = control.tolist()
            rows.append(row)
            print(f"{method:<12}{steps:>7}{100 * row['test_macro_f1']:>7.1f}{100 * row['moved_encoder']:>8.2f}"
                  f"{100 * row['moved_classifier']:>8.2f}{100 * row['changed_predictions']:>8.1f}"
                  f"{100 * row['changed_by_batch_norm']:>7.1f}{100 * row['agrees_with_control']:>9.1f}"
                  f"{seconds:>7.0f}{cpu:>7.0f}", flush=True)
            write(args, rows, budgets, methods)  # what ran so far survives an interruption


def markdown(result: dict) -> str:
    """Per method (rows) and budget (columns): test macro F1 x100, the share of target test
    parcels predicted differently from the source model, agreement with the control, the
    encoder's relative movement, CPU seconds."""
    rows = [r for r in result["rows"] if r["budget"]]
    budgets = sorted({r["budget"] for r in rows})
    methods = list(dict.fromkeys(r["method"] for r in sorted(rows, key=lambda r: r["method"] != CONTROL)))
    by = {(r["method"], r["budget"]): r for r in rows}
    baseline = next(r for r in result["rows"] if r["method"] == "source_only")
    lines = ["| method | " + " | ".join(f"{b} steps: F1 / changed / = finetune / encoder moved / CPU s" for b in budgets)
             + " |", "|---|" + ":-:|" * len(budgets)]
    for method in methods:
        cells = []
        for budget in budgets:
            r = by.get((method, budget))
            cells.append("not run" if r is None else
                         f"{100 * r['test_macro_f1']:.1f} / {100 * r['changed_predictions']:.1f} % / "
                         f"{100 * r['agrees_with_control']:.1f} % / {100 * r['moved_encoder']:.2f} % / "
                         f"{r.get('cpu_seconds', float('nan')):.0f}")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    lines.append(f"| source_only | {100 * baseline['test_macro_f1']:.1f} (the source model) |" + " |" * (len(budgets) - 1))
    return "\n".join(lines)


def kept_rows(out: Path, args: argparse.Namespace) -> list[dict]:
    """The rows of an earlier run written to ``out`` for the same scenario and fold."""
    if not out.is_file():
        return []
    earlier = json.loads(out.read_text())
    if (earlier.get("scenario"), earlier.get("fold")) != (args.scenario, args.fold):
        raise SystemExit(f"--resume: {out} holds {earlier.get('scenario')} fold {earlier.get('fold')}, "
                         f"not {args.scenario} fold {args.fold}; choose another --out")
    return earlier["rows"]


def write(args: argparse.Namespace, rows: list[dict], budgets: list[int], methods: list[str]) -> None:
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "date": datetime.date.today().isoformat(), "scenario": args.scenario, "fold": args.fold,
        "profile": args.profile, "budgets": budgets, "methods": methods, "machine": platform.node(),
        "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "device": "cuda" if (args.device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
        else "cpu", "rows": rows,
    }, indent=1, default=str))


if __name__ == "__main__":
    main()

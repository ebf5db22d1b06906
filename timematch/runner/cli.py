"""The command line: ``python launch.py [options]`` and ``python launch.py report [options]``.

Everything the user named is resolved and checked first (scenarios, methods, profile,
search spaces, objective, data root, tracking store, Ray address), in a few seconds and
before Ray starts; an error prints one line and exits with code 2.

It parses, resolves (:func:`~timematch.runner.choices.plan_from_choices` builds the plan in one
call) and runs (:func:`~timematch.runner.launcher.run_launch`). The plan needs the methods, and
so torch, to check what the user named; the modules that load Ray, MLflow or Optuna (the
launcher, the report) are imported where they are first needed, so that ``--help`` and a bad
option answer before those start (``tests/test_architecture.py`` keeps the rule).

Longer than 400 lines: two thirds of it are the two parsers' option texts (``--help``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import secrets
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from timematch.data.embedded import embedded_root
from timematch.data.format import METADATA_FILE, find_tiles, missing_tiles
from timematch.data.tiles import default_cache_dir
from timematch.errors import ConfigError, TimeMatchError, named_option
from timematch.execution import PRECISIONS
from timematch.runner.tracking import check_tracking, client, default_tracking_uri, sqlite_path
from timematch.runner.launch_state import (  # noqa: F401  (the exit codes are this module's API too)
    EXIT_INTERRUPTED, EXIT_OK, EXIT_TRIALS_FAILED, EXIT_USAGE, ExperimentFolder, Launch,
)

if TYPE_CHECKING:
    from timematch.runner.plan import LaunchPlan

MAX_SEEDS = 100
MAX_TRIALS = 1000  # per group: an Optuna study of its own; more is a typo, not a search
MAX_SEED = 999_999  # Optuna seeds each group's sampler with seed * 1000 + group, below numpy's 2**32
LAUNCH_ID = re.compile(r"[A-Za-z0-9_.-]+")  # launch ids are YYYYmmdd-HHMMSS-xxxx; 'all' fits too

DESCRIPTION = """\
Run TimeMatch experiments: train the source models, search each method's hyper-parameters
per scenario x method x fold with Ray Tune (Optuna TPE + ASHA), log everything to MLflow,
and print the paper-style table.

  python launch.py                                   # quick profile, 5 paper scenarios, every method
  python launch.py --scenario DK-FR1 --method timematch --trials 8
  python launch.py --profile paper --data-root /data/timematch --address auto
  python launch.py --resume                          # continue the last launch of --experiment
  python launch.py report [--experiment NAME]        # the table of an experiment, from MLflow
"""

EPILOG = f"""\
subcommands:
  report  the paper-style table of an experiment, from MLflow (its options: python launch.py report --help)
          python launch.py report --experiment timematch-quick --launch all

exit codes:
  {EXIT_OK:<4} done (with --dry-run: everything named is valid and the plan is printed)
  {EXIT_TRIALS_FAILED:<4} the launch finished but some trials failed (tagged in MLflow); also a crash, with a traceback
  {EXIT_USAGE:<4} bad input, checked before anything runs: an option, a --set, a profile or search-space file,
       the data root, the Ray address, the tracking store; or a dataset or disk found unusable later.
       One line on stderr says what is wrong, where it came from and what is valid
  {EXIT_INTERRUPTED:<4} interrupted (Ctrl-C); continue with --resume
"""


def _array_size(text: str) -> int | str:
    """An argparse type: ``auto`` or a whole number >= 1."""
    if text == "auto" or (text.isdigit() and int(text) >= 1):
        return text if text == "auto" else int(text)
    raise argparse.ArgumentTypeError(f"expected a whole number >= 1 or 'auto', got {text!r}")


def _number_or_auto(text: str) -> float | str:
    """An argparse type: ``auto`` or a finite number >= 0."""
    if text == "auto":
        return text
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0 or 'auto', got {text!r}")
    return value


def _integer(low: int, high: int | None = None) -> Callable[[str], int]:
    """An argparse type: an integer in [low, high] (``high`` None: no upper bound)."""
    allowed = f">= {low}" if high is None else f"in [{low}, {high}]"

    def parse(text: str) -> int:
        try:
            value: int | None = int(text)
        except ValueError:
            value = None
        if value is None or value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"expected an integer {allowed}, got {text!r}")
        return value

    return parse


def _name(text: str) -> str:
    """An argparse type: a non-empty name on one line (an MLflow experiment)."""
    if not text.strip() or not text.isprintable():
        raise argparse.ArgumentTypeError(f"expected a non-empty name on one line, got {text!r}")
    return text


def _launch_id(text: str) -> str:
    if not LAUNCH_ID.fullmatch(text):
        raise argparse.ArgumentTypeError(
            f"expected a launch id (results/<experiment>/launches/, e.g. 20260102-030405-ab12) or 'all', got {text!r}"
        )
    return text


#: ``--method``'s help until it is printed (:func:`_method_help`)
_METHOD_HELP = "the registered methods (filled in when help is printed)"


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Fills ``--method``'s text from the registry when help is printed, not when the parser is
    built: a launch or a bad option need not wait for it."""

    def _expand_help(self, action: argparse.Action) -> str:
        if action.help == _METHOD_HELP:
            action.help = _method_help()
        return super()._expand_help(action)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line and exit code 2, like every other bad input
        self.exit(EXIT_USAGE, f"{self.prog}: error: {one_line(message)} (see --help)\n")


def _method_help() -> str:
    """The ``--method`` text, its lists from the registry as the plan resolves them; built only
    when help is printed (:class:`_Formatter`): listing the methods imports them, and torch."""
    from timematch.runner.choices import parse_methods  # torch, 3.5 s: only --help and a launch need it

    every, paper = parse_methods("all").methods, parse_methods("paper").methods
    since = [m for m in every if m not in paper]
    return (f"a method ({', '.join(every)}), a comma list, 'all' (every registered method; source_only then runs "
            f"as the default-config baseline) or 'paper' (the {len(paper)} methods of the TimeMatch paper's table, "
            f"without the methods published since: {', '.join(since)}). Named explicitly, source_only is searched "
            "like the others (default: all)")


def launch_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="launch.py", description=DESCRIPTION, epilog=EPILOG,
                     formatter_class=_Formatter)
    what = parser.add_argument_group("what to run")
    what.add_argument("--scenario", default="all", help=(
        "'all' (the five paper scenarios of experiments/scenarios.yaml: DK-FR1, DK-FR2, DK-AT1, FR1-DK, FR1-FR2), "
        "'pairs' (all 12 ordered pairs of the tiles), a name like DK-FR1, or SRC:TGT with tile names "
        "(DK, FR1, FR2, AT1 or country/tile/year); comma lists allowed (default: all)"))
    what.add_argument("--method", default="all", help=_METHOD_HELP)
    what.add_argument("--profile", default="quick", help=(
        "experiments/profiles/<name>.yaml: 'quick' (minutes on a 2-core CPU; too short for the feature-alignment "
        "competitors to act: the report flags them), 'paper' (published budgets, 3 folds), 'smoke' (tiny, for "
        "tests) (default: quick)"))
    what.add_argument("--folds", help=(
        "number of folds N (folds 0..N-1) or a comma list like 0,2 (default: the profile's)"))
    what.add_argument("--trials", type=_integer(0, MAX_TRIALS), help=(
        f"Optuna trials per scenario x method x fold, 0..{MAX_TRIALS}; the first is the defaults; 0 = defaults "
        "only (default: the profile's)"))
    what.add_argument("--no-search", action="store_true", help="published/profile defaults only (same as --trials 0)")
    what.add_argument("--no-baseline", action="store_true", help=(
        "leave out the source_only baseline (one default trial per scenario x fold, the pretrained model "
        "evaluated on the target)"))
    what.add_argument("--objective", default="target_val_f1", help=(
        "trial selection metric: target_val_f1 (macro F1 on the target validation split; uses target "
        "labels, runs are tagged so); without target labels source_val_f1, target_im_score, target_entropy, "
        "dev (Deep Embedded Validation), snd (Soft Neighborhood Density); few_shot_target_f1 (5 labelled "
        "target validation parcels per class) (default: target_val_f1)"))
    what.add_argument("--seed", type=_integer(0, MAX_SEED), default=0, help=(
        f"training and sampler seed, 0..{MAX_SEED} (default: 0)"))
    what.add_argument("--seeds", type=_integer(1, MAX_SEEDS), default=1, help=(
        f"repeat each scenario x method x fold over N seeds (--seed, --seed + 1, ...; source models "
        f"included), 1..{MAX_SEEDS}: the table's cells are then mean ± std over folds x seeds, and the "
        "report adds a paired comparison of timematch with every other method (default: 1)"))
    what.add_argument("--precision", choices=PRECISIONS, default="fp32", help=(
        "the training steps' precision: fp32, or bf16 (autocast in the forward passes, on a GPU; part of a "
        "source model's key) (default: fp32)"))
    what.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help=(
        "override one profile entry, e.g. --set methods.timematch.epochs=5 --set data.min_parcels=20 "
        "(repeatable)"))
    where = parser.add_argument_group("data, cluster and tracking")
    where.add_argument("--data-root", help=(
        "the TimeMatch dataset root (default: $TIMEMATCH_DATA, else the embedded synthetic dataset, "
        "generated on first use into the cache directory)"))
    where.add_argument("--address", help=(
        "an existing Ray cluster: 'auto' (inside it, e.g. a RayJob), 'ray://HOST:10001' (Ray client, from "
        "outside) or 'HOST:6379' (default: $RAY_ADDRESS, else a local Ray instance on this machine)"))
    where.add_argument("--gpus-per-trial", type=_number_or_auto, help=(
        "GPUs per trial, fractions allowed (e.g. 0.25: four trials share a GPU); 'auto': on a GPU cluster the "
        "share at which the measured aggregate throughput of its GPU model stops rising "
        "(timematch/runner/gpu_curves.json; 0.25 for a model not measured), else 0 (default: the profile's, auto)"))
    where.add_argument("--array", type=_array_size, default="auto", help=(
        "trials of one searched group trained in lockstep as one fused model on one device (each still its own "
        "Optuna trial, MLflow run and ASHA decision; docs/running.md#trial-arrays): K at most per array; 1 runs "
        "every trial alone; 'auto': 1 on a CPU (an array computes its members one after another there) and on a "
        "GPU until its curve is measured (benchmarks/gpu_session.sh) (default: auto)"))
    where.add_argument("--cpus-per-trial", type=_number_or_auto, help=(
        "CPUs per trial; 'auto': 1 on CPU clusters, a share of a node's CPUs per GPU trial "
        "(default: the profile's, auto)"))
    where.add_argument("--tracking-uri", help=(
        "MLflow tracking URI, e.g. http://127.0.0.1:5000 (bash mlflow/server.sh) (default: "
        "$MLFLOW_TRACKING_URI, else sqlite:///<repo>/mlflow/mlflow.db)"))
    where.add_argument("--experiment", type=_name, help=(
        "MLflow experiment (one per launch name) (default: timematch-<profile>)"))
    where.add_argument("--results-dir", help=(
        "Tune state, trial states (retries, --resume) and reports: <dir>/<experiment>/; on a cluster of several "
        "machines it must be storage every node mounts (default: $TIMEMATCH_RESULTS, else <repo>/results)"))
    control = parser.add_argument_group("control")
    control.add_argument("--resume", action="store_true", help=(
        "continue the last launch of --experiment where it stopped (its saved plan; finished trials are "
        "not run again)"))
    control.add_argument("--dry-run", action="store_true", help="print the plan (stages, trials, resources) and exit")
    control.add_argument("--verbose", action="store_true", help="show the trials' own logs")
    control.add_argument("--no-cuda-graph", action="store_true", help=(
        "on a GPU, run every training step eagerly instead of capturing it once as a CUDA graph and "
        "replaying it (slower; for debugging a method)"))
    return parser


def report_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="launch.py report", description=(
        "Print and write the paper-style table of an experiment from MLflow: rows methods, columns "
        "scenarios + average, test macro F1 mean ± std over folds of the best trial per fold by the objective."),
        epilog=f"exit codes: {EXIT_OK} written, {EXIT_USAGE} bad input (one line on stderr), "
               f"{EXIT_INTERRUPTED} interrupted")
    parser.add_argument("--experiment", type=_name, help="MLflow experiment (default: the most recently updated one)")
    parser.add_argument("--tracking-uri", help=(
        "MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else the local SQLite store)"))
    parser.add_argument("--objective", help="selection metric (default: the one the launch used)")
    parser.add_argument("--launch", type=_launch_id, help=(
        "the launch to tabulate: its id (printed at its start; results/<experiment>/launches/) or 'all' to pool "
        "every launch of the experiment, which makes each cell a best-of-all-their-trials (default: the latest)"))
    parser.add_argument("--results-dir", help=(
        "where report.md/.html/.png go: <dir>/<experiment>/ (default: $TIMEMATCH_RESULTS, else <repo>/results)"))
    return parser


def one_line(message: str) -> str:
    """An error message on one line: line breaks (a YAML parser's, a pasted value's) become spaces."""
    return re.sub(r"\s*[\r\n\v\f\x1c-\x1e\x85\u2028\u2029]+\s*", " ", message).strip()


def main(argv: list[str] | None = None, project_root: Path | None = None) -> int:
    """Entry point of ``launch.py``; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    root = Path(project_root or Path.cwd()).resolve()
    try:
        if argv and argv[0] == "report":
            return report_command(report_parser().parse_args(argv[1:]), root)
        return launch_command(launch_parser().parse_args(argv), root)
    except TimeMatchError as err:
        print(f"launch.py: error: {one_line(str(err))}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt as err:
        print(f"launch.py: interrupted; {err or 'continue with --resume'}", file=sys.stderr)
        return EXIT_INTERRUPTED


# -- launch -----------------------------------------------------------------------------


def _experiment_name(args: argparse.Namespace) -> str:
    return args.experiment or f"timematch-{args.profile}"


def _results_dir(args: argparse.Namespace, root: Path) -> Path:
    """``--results-dir``, else ``$TIMEMATCH_RESULTS`` (set on every node of the k8s/ clusters to a
    shared volume), else ``<repo>/results``."""
    chosen = args.results_dir or os.environ.get("TIMEMATCH_RESULTS")
    if not chosen:
        return root / "results"
    path = Path(chosen).expanduser().resolve()
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        source = "--results-dir" if args.results_dir else "$TIMEMATCH_RESULTS"
        raise ConfigError(
            f"{source} {chosen}: {existing} is not a writable directory; pass a directory you can write to"
        )
    return path


def _tracking_uri(args: argparse.Namespace, root: Path) -> str:
    return args.tracking_uri or default_tracking_uri(root)


def resolve_data_root(data_root: str | None, remote: bool = False) -> tuple[Path, bool]:
    """``--data-root``, else ``$TIMEMATCH_DATA``, else the embedded synthetic dataset (flag True).

    ``remote``: the launch runs through Ray Client, where the path is one on the cluster.
    """
    chosen = data_root or os.environ.get("TIMEMATCH_DATA")
    if chosen:
        path = Path(chosen).expanduser().resolve()
        if not path.is_dir() and not remote:
            source, fix = ("--data-root", "leave --data-root out") if data_root else ("$TIMEMATCH_DATA", "unset it")
            raise ConfigError(f"{source} {chosen}: no such directory; {fix} to use the embedded synthetic dataset")
        return path, False
    return embedded_root(), True


def check_tiles(root: Path, tiles: set[str]) -> None:
    """Every tile the plan uses must be in the dataset (:func:`timematch.data.format.find_tiles`)."""
    missing = missing_tiles(root, tiles)
    if missing:
        raise ConfigError(
            f"data root {root}: missing tile(s) {', '.join(missing)} (no {METADATA_FILE}); tiles found: "
            f"{', '.join(find_tiles(root)) or 'none'}"
        )


def plan_launch(args: argparse.Namespace, root: Path) -> LaunchPlan:
    """The :class:`~timematch.runner.plan.LaunchPlan` of what the command line names, checked."""
    from timematch.runner.choices import PlanChoices, plan_from_choices  # torch: see _method_help
    choices = PlanChoices(
        experiment=_experiment_name(args), scenario=args.scenario, method=args.method, profile=args.profile,
        sets=tuple(args.set), folds=args.folds, trials=0 if args.no_search else args.trials,
        objective=args.objective, seed=args.seed, seeds=args.seeds, baseline=not args.no_baseline,
        precision=args.precision, cuda_graph=not args.no_cuda_graph,
    )
    remote = str(args.address or os.environ.get("RAY_ADDRESS", "")).startswith("ray://")
    data_root, synthetic = resolve_data_root(args.data_root, remote)
    plan = plan_from_choices(choices, root, data_root, synthetic, default_cache_dir())
    if not synthetic and not remote:
        check_tiles(data_root, set(plan.tiles))
    return plan


def resolve_launch(args: argparse.Namespace, root: Path) -> Launch:
    from timematch.runner.plan import LaunchPlan, check_embedded_root  # torch: see _method_help
    from timematch.runner.resources import check_address
    experiment = ExperimentFolder(_results_dir(args, root), _experiment_name(args))
    address = args.address or os.environ.get("RAY_ADDRESS") or None
    if args.resume:
        folder = experiment.latest()
        saved = folder.load()
        plan = LaunchPlan.from_json(json.dumps(saved["plan"]))
        if plan.synthetic_data:
            check_embedded_root(plan)
        uri = args.tracking_uri or saved["tracking_uri"]
        check_tracking(uri)
        check_address(address)
        return Launch(plan, folder, uri, address, True, saved.get("parent_run_id"))
    plan = plan_launch(args, root)
    from timematch.runner.plan import resolve_array  # torch: see _method_help

    plan.array, plan.array_reason = resolve_array(getattr(args, "array", "auto"))
    uri = _tracking_uri(args, root)
    check_tracking(uri)
    check_address(address)
    launch_id = time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(2)
    return Launch(plan, experiment.launch(launch_id), uri, address, False)


def _requested_resources(args: argparse.Namespace, plan: LaunchPlan) -> tuple[float | str, float | str, int | str]:
    profile = plan.resources
    cpus = args.cpus_per_trial if args.cpus_per_trial is not None else profile.cpus_per_trial
    gpus = args.gpus_per_trial if args.gpus_per_trial is not None else profile.gpus_per_trial
    return cpus, gpus, profile.max_concurrent_per_group


def launch_command(args: argparse.Namespace, root: Path) -> int:
    from timematch.runner.describe import describe  # torch: see _method_help
    from timematch.runner.plan import source_model_path
    from timematch.runner.resources import local_cluster, set_environment, trial_resources
    set_environment()
    launch = resolve_launch(args, root)
    plan = launch.plan
    cached = {t.key for t in plan.pretrain_tasks if source_model_path(plan.cache_dir, t.key).is_file()}
    cpus, gpus, concurrent = _requested_resources(args, plan)
    if args.dry_run:
        if launch.address is None:
            res = trial_resources(local_cluster(), cpus, gpus, concurrent)
            shown = {"cluster": "this machine", "cpus per trial": res.cpus, "gpus per trial": res.describe_gpus(),
                     "trials at once": res.slots, "in flight per group": res.max_concurrent_per_group}
        else:
            shown = {"cluster": launch.address, "cpus per trial": cpus, "gpus per trial": gpus,
                     "in flight per group": concurrent}
        shown["tracking"] = launch.tracking_uri
        shown["results"] = str(launch.folder.path)
        print(describe(plan, shown, cached))
        if launch.resumed:
            print(f"\n--resume: would continue launch {launch.launch_id}")
        return EXIT_OK
    from timematch.runner.launcher import run_launch  # Ray and MLflow: 4 s the command line's checks skip

    return run_launch(launch, args, (cpus, gpus, concurrent))


# -- report -----------------------------------------------------------------------------


def report_command(args: argparse.Namespace, root: Path) -> int:
    from timematch.runner.plan import get_objective  # torch: see _method_help
    from timematch.runner.resources import quiet_logs, set_environment
    from timematch.runner.reporting import build_report, experiment_id  # MLflow and Optuna: 3.6 s

    set_environment()
    quiet_logs(verbose=False)
    if args.objective is not None:
        with named_option("--objective"):
            get_objective(args.objective)
    results = _results_dir(args, root)
    uri = args.tracking_uri or default_tracking_uri(root)
    check_tracking(uri)
    store = sqlite_path(uri)
    if store is not None and not store.is_file():
        raise ConfigError(f"no MLflow store at {store} (tracking URI {uri}); run a launch first or pass --tracking-uri")
    experiment = args.experiment
    if experiment is None:
        experiments = [e for e in client(uri).search_experiments(order_by=["last_update_time DESC"])
                       if e.name != "Default"]
        if not experiments:
            raise ConfigError(f"no experiment in {uri} yet; run a launch first")
        experiment = experiments[0].name
    else:
        with named_option("--experiment"):
            experiment_id(uri, experiment)
    report = build_report(uri, ExperimentFolder(results, experiment), args.objective, launch_id=args.launch)
    print(f"{experiment} ({report.runs} finished trials)\n")
    print(report.markdown)
    print("written: " + ", ".join(str(p) for p in report.files))
    print(report.tagged)
    if report.degenerate:
        print(report.degenerate_line())
    return EXIT_OK

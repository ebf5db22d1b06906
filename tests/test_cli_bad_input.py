"""Every bad value of every option and of ``--set``: exit code 2 and one line naming where it came from.

The cases are checked against the parsers' own option lists, so a new option without a bad-input
case here fails :func:`test_every_option_has_a_bad_value_case`.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import yaml

from timematch.runner.cli import (
    EXIT_INTERRUPTED, EXIT_OK, EXIT_TRIALS_FAILED, EXIT_USAGE, launch_parser, main, report_parser,
)

REPO = Path(__file__).resolve().parents[1]
NO_BAD_VALUE = {"-h", "--help"}  # options that take no value and cannot be misused

# (option, the bad arguments, fragments the error line must hold besides the option);
# "{tmp}" is a fresh directory holding a plain file "a-file".
LAUNCH_CASES = [
    ("--scenario", ["--scenario", "DK-XX"], ["unknown scenario 'DK-XX'", "valid: all", "SRC:TGT"]),
    ("--scenario", ["--scenario", "DK:DK"], ["adapts a tile to itself"]),
    ("--scenario", ["--scenario", ","], ["is empty", "valid: all"]),
    ("--method", ["--method", "timematch,dan"], ["unknown method 'dan'", "valid: all, paper, source_only"]),
    ("--profile", ["--profile", "fast"], ["unknown profile 'fast'", "valid profiles: paper, quick, smoke"]),
    ("--profile", ["--profile", "../profiles/quick"], ["unknown profile", "valid profiles:"]),
    ("--folds", ["--folds", "0"], ["expected a count N >= 1"]),
    ("--folds", ["--folds", "1,9"], ["folds must lie in [0, 2]"]),
    ("--trials", ["--trials", "-1"], ["expected an integer in [0, 1000]"]),
    ("--trials", ["--trials", "many"], ["expected an integer in [0, 1000]"]),
    ("--no-search", ["--no-search=yes"], ["ignored explicit argument"]),
    ("--no-baseline", ["--no-baseline=yes"], ["ignored explicit argument"]),
    ("--objective", ["--objective", "test_macro_f1"], ["unknown objective", "target_val_f1", "target_im_score"]),
    ("--seed", ["--seed", "-1"], ["expected an integer in [0, 999999]"]),
    ("--seed", ["--seed", "1.5"], ["expected an integer in [0, 999999]"]),
    ("--seeds", ["--seeds", "0"], ["expected an integer in [1, 100]"]),
    ("--trials", ["--trials", "1001"], ["argument --trials: expected an integer in [0, 1000], got '1001'"]),
    ("--precision", ["--precision", "fp16"], ["invalid choice: 'fp16'", "'fp32', 'bf16'"]),
    ("--set", ["--set", "methods.timematch.lr=abc"], ["'abc' is not a number", "allowed:"]),
    ("--data-root", ["--data-root", "{tmp}/nowhere"], ["no such directory",
                                                       "leave --data-root out to use the embedded synthetic dataset"]),
    ("--address", ["--address", "http://somewhere"], ["'auto'", "ray://HOST:PORT", "HOST:PORT"]),
    ("--gpus-per-trial", ["--gpus-per-trial", "nan"], ["expected a number >= 0 or 'auto'"]),
    ("--array", ["--array", "0"], ["argument --array: expected a whole number >= 1 or 'auto', got '0'"]),
    ("--array", ["--array", "four"], ["expected a whole number >= 1 or 'auto'"]),
    ("--gpus-per-trial", ["--gpus-per-trial", "-1"], ["expected a number >= 0 or 'auto'"]),
    ("--cpus-per-trial", ["--cpus-per-trial", "abc"], ["expected a number >= 0 or 'auto'"]),
    ("--cpus-per-trial", ["--cpus-per-trial", "100000"], ["no node has that many CPUs"]),
    ("--tracking-uri", ["--tracking-uri", "{tmp}/mlruns"], ["plain file stores", "sqlite:///"]),
    ("--experiment", ["--experiment", " "], ["expected a non-empty name"]),
    ("--results-dir", ["--results-dir", "{tmp}/a-file/results"], ["is not a writable directory"]),
    ("--resume", ["--resume=yes"], ["ignored explicit argument"]),
    ("--dry-run", ["--dry-run=yes"], ["ignored explicit argument"]),
    ("--verbose", ["--verbose=yes"], ["ignored explicit argument"]),
    ("--no-cuda-graph", ["--no-cuda-graph=yes"], ["ignored explicit argument"]),
]

REPORT_CASES = [
    ("--experiment", ["--experiment", ""], ["expected a non-empty name"]),
    ("--tracking-uri", ["--tracking-uri", "{tmp}/mlruns"], ["plain file stores", "sqlite:///"]),
    ("--objective", ["--objective", "accuracy"], ["unknown objective 'accuracy'", "target_val_f1"]),
    ("--launch", ["--launch", "x' or '1"], ["expected a launch id", "'all'"]),
    ("--results-dir", ["--results-dir", "{tmp}/a-file"], ["is not a writable directory"]),
]

# (--set item, fragments: the valid range, choices or form)
SET_CASES = [
    ("methods.timematch.lr=abc", ["TimeMatchConfig.lr='abc' is not a number", "allowed: [0.0, 10.0]"]),
    ("methods.timematch.lr=0", ["out of range", "allowed: (0.0, 10.0]"]),
    ("methods.timematch.lr=.nan", ["out of range", "allowed: (0.0, 10.0]"]),
    ("methods.timematch.lr=", ["lr=None is not a number", "allowed:"]),
    ("methods.timematch.epochs=2.5", ["is not an integer", "allowed: [0, "]),
    ("methods.timematch.optimizer=lbfgs", ["optimizer='lbfgs'; valid: adam, sgd"]),
    ("methods.timematch.nesterov=maybe", ["must be true or false"]),
    ("methods.fixmatch.balanced_source=maybe", ["FixMatchConfig.balanced_source='maybe' must be true or false"]),
    ("methods.timematch.epoch=2", ["unknown config key(s) ['epoch']", "valid keys:", "epochs"]),
    ("methods.timematch=3", ["methods.timematch must be a mapping"]),
    ("methods.jumbot.epsilon=0", ["JUMBOTConfig.epsilon=0 is out of range", "allowed: (0.0, 100.0]"]),
    ("methods.mad.alpha=-1", ["MADConfig.alpha=-1 is out of range", "allowed: [0.0, 100.0]"]),
    ("methods.cmad.beta=1000", ["CMADConfig.beta=1000 is out of range", "allowed: [0.0, 100.0]"]),
    ("methods.mad.bcd_max_rounds=0", ["MADConfig.bcd_max_rounds=0 is out of range", "allowed: [1, 1000]"]),
    ("methods.mad.class_weights=given", ["class_weights='given'; valid: uniform, estimated"]),
    ("methods.raincoat.sinkhorn_epsilon=0", ["RaincoatConfig.sinkhorn_epsilon=0 is out of range"]),
    ("methods.raincoat.correct_epochs=9", ["RaincoatConfig.correct_epochs=9 is out of range", "allowed: [0, 2]"]),
    ("methods.no_such_method.lr=1", ["unknown method 'no_such_method'", "valid methods:", "timematch"]),
    ("methods.source_only.lr=1", ["under 'pretrain:'"]),
    ("data.min_parcels=abc", ["DataConfig.min_parcels='abc' is not a number", "allowed: [1, "]),
    ("data.n_folds=0", ["DataConfig.n_folds=0 is out of range", "allowed: [1, 100]"]),
    ("data.normalization=zscore", ["valid: source_stats, published"]),
    ("data.min_parcel=3", ["unknown data config key(s)", "valid keys:", "min_parcels"]),
    ("pretrain.lr=-1", ["SourceOnlyConfig.lr=-1 is out of range", "allowed: (0.0, 10.0]"]),
    ("pretrain.pseudo_threshold=0.9", ["unknown config key(s) ['pseudo_threshold']", "valid keys:"]),
    ("folds=0", ["folds=0 must be an integer >= 1"]),
    ("folds=9", ["folds=9 but the data has n_folds=3"]),
    ("trials=-1", ["trials=-1 must be an integer >= 0"]),
    ("retries=x", ["retries='x' must be an integer >= 0"]),
    ("scheduler.grace_period=0", ["must be an integer >= 1"]),
    ("scheduler.reduction_factor=1", ["must be a number > 1"]),
    ("scheduler.reduction_factor=.nan", ["must be a number > 1"]),
    ("scheduler.patience=3", ["unknown key(s) ['patience']", "valid: grace_period, reduction_factor"]),
    ("resources.cpus_per_trial=-1", ["must be 'auto' or a number >= 0"]),
    ("resources.gpus_per_trial=.inf", ["must be 'auto' or a number >= 0"]),
    ("resources.max_concurrent_per_group=0", ["must be 'auto' or an integer >= 1"]),
    ("resources.memory=4", ["unknown key(s) ['memory']", "valid: cpus_per_trial"]),
    ("method.timematch.epochs=3", ["unknown profile section 'method'", "valid: description, folds"]),
    ("description.text=x", ["'description' is not a section"]),
    ("methods.timematch.epochs", ["expected SECTION.KEY=VALUE"]),
    ("=3", ["expected SECTION.KEY=VALUE"]),
]


@pytest.fixture
def tmp(tmp_path, cache_dir, monkeypatch):
    """A scratch directory with a plain file in it; no environment defaults leak into the launch."""
    for name in ("TIMEMATCH_DATA", "TIMEMATCH_RESULTS", "RAY_ADDRESS", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(name, raising=False)
    (tmp_path / "a-file").write_text("not a directory\n")
    return tmp_path


@pytest.fixture
def launch_args(data_root, tmp):
    """A valid dry run (checked by :func:`test_the_base_command_is_valid`); ``--data-root`` comes last."""
    return ["--scenario", "DK-FR1", "--method", "timematch", "--profile", "smoke", "--dry-run",
            "--results-dir", str(tmp / "results"), "--tracking-uri", f"sqlite:///{tmp / 'mlflow.db'}",
            "--data-root", str(data_root)]


def run(argv: list[str], capsys, root: Path = REPO) -> tuple[int, str, str]:
    """``main`` in this process: its exit code (argparse's SystemExit included), stdout, stderr."""
    try:
        code = main(argv, project_root=root)
    except SystemExit as exit_:
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


def error_line(argv: list[str], capsys, root: Path = REPO) -> str:
    """The one line that ``main(argv)`` prints for bad input, checked: exit code 2, no traceback."""
    code, _, err = run(argv, capsys, root)
    assert code == EXIT_USAGE, (code, err)
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("launch.py"), err
    return lines[0]


def options(parser) -> set[str]:
    return {s for action in parser._actions for s in action.option_strings} - NO_BAD_VALUE


def filled(argv: list[str], tmp: Path) -> list[str]:
    return [a.replace("{tmp}", str(tmp)) for a in argv]


def test_every_option_has_a_bad_value_case():
    assert {case[0] for case in LAUNCH_CASES} == options(launch_parser())
    assert {case[0] for case in REPORT_CASES} == options(report_parser())


def test_the_base_command_is_valid(capsys, launch_args):
    code, out, err = run(launch_args, capsys)
    assert code == EXIT_OK, err
    assert "stage 1, source models" in out


@pytest.mark.parametrize("option, argv, fragments", LAUNCH_CASES, ids=[" ".join(c[1]) for c in LAUNCH_CASES])
def test_a_bad_option_value_is_one_line_naming_it(capsys, launch_args, tmp, option, argv, fragments):
    line = error_line(launch_args + filled(argv, tmp), capsys)
    for fragment in [option, *fragments]:
        assert fragment in line, line


@pytest.mark.parametrize("option, argv, fragments", REPORT_CASES, ids=[" ".join(c[1]) for c in REPORT_CASES])
def test_a_bad_report_option_value_is_one_line_naming_it(capsys, tmp, option, argv, fragments):
    base = ["report", "--tracking-uri", f"sqlite:///{tmp / 'mlflow.db'}"]
    line = error_line(base + filled(argv, tmp), capsys)
    for fragment in [option, *fragments]:
        assert fragment in line, line


@pytest.mark.parametrize("item, fragments", SET_CASES, ids=[c[0] for c in SET_CASES])
def test_a_bad_set_is_one_line_naming_the_set(capsys, launch_args, item, fragments):
    line = error_line(launch_args + ["--set", "data.min_parcels=20", "--set", item], capsys)
    assert line.startswith(f"launch.py: error: --set {item}: "), line  # the bad one of the two
    assert ".yaml" not in line, "a bad --set is blamed on --set, not on the profile file"
    for fragment in fragments:
        assert fragment in line, line


def test_a_missing_data_root_from_the_environment_says_how_to_use_the_embedded_data(
        capsys, launch_args, tmp, monkeypatch):
    monkeypatch.setenv("TIMEMATCH_DATA", str(tmp / "nowhere"))
    line = error_line(launch_args[:-2], capsys)
    assert f"$TIMEMATCH_DATA {tmp / 'nowhere'}: no such directory; unset it to use the embedded synthetic" in line


@pytest.fixture
def project(tmp):
    """A copy of the project's config folders, to break a profile or a search space."""
    root = tmp / "project"
    shutil.copytree(REPO / "experiments", root / "experiments")
    shutil.copytree(REPO / "search_spaces", root / "search_spaces")
    return root


@pytest.mark.parametrize("text, fragments", [
    ("folds: [", ["not valid YAML"]),
    ("- a list\n", ["expected a mapping with sections"]),
    ("trials: -2\n", ["trials=-2 must be an integer >= 0"]),
    ("methods: {timematch: {lr: fast}}\n", ["methods.timematch", "lr='fast' is not a number", "allowed:"]),
    ("data: {normalization: zscore}\n", ["valid: source_stats, published"]),
    ("budgets: 3\n", ["unknown section(s) ['budgets']", "valid: description"]),
    ("budget: 3\n", ["budget must be a mapping, got 3"]),
])
def test_a_bad_profile_file_is_one_line_naming_the_file(capsys, launch_args, project, text, fragments):
    path = project / "experiments" / "profiles" / "smoke.yaml"
    path.write_text(text)
    line = error_line(launch_args + ["--set", "trials=1"], capsys, root=project)
    assert f"profile file {path}: " in line and "--set" not in line, line
    for fragment in fragments:
        assert fragment in line, line


@pytest.mark.parametrize("document, fragments", [
    ("lr: {type: float, low: [", ["not valid YAML"]),
    ({"lr": {"type": "normal", "low": 0.1, "high": 1}}, ["expected {type: float | int | categorical"]),
    ({"lr": {"type": "float", "low": 1e-3, "high": 1e-5}}, ["low=0.001 > high=1e-05"]),
    ({"lr": {"type": "float", "low": 0.0, "high": 1e-3, "log": True}}, ["log scale needs low > 0"]),
    ({"epochs": {"type": "int", "low": 1, "high": 5, "step": 0}}, ["step=0 must be a positive integer"]),
    ({"optimizer": {"type": "categorical", "choices": ["adam", "lbfgs"]}}, ["'lbfgs' is rejected", "valid: adam, sgd"]),
    ({"epoch": {"type": "int", "low": 1, "high": 5}}, ["'epoch' is not a config key", "valid keys:"]),
    ({"source_shift": {"type": "categorical", "choices": [True, "yes"]}}, ["'yes' is rejected", "true or false"]),
])
def test_a_bad_search_space_file_is_one_line_naming_the_file(capsys, launch_args, project, document, fragments):
    path = project / "search_spaces" / "timematch.yaml"
    path.write_text(document if isinstance(document, str) else yaml.safe_dump(document))
    line = error_line(launch_args + ["--trials", "2"], capsys, root=project)
    assert f"search-space file {path}: " in line, line
    for fragment in fragments:
        assert fragment in line, line


def test_a_missing_search_space_file_says_what_to_do(capsys, launch_args, project):
    path = project / "search_spaces" / "timematch.yaml"
    path.unlink()
    line = error_line(launch_args + ["--trials", "2"], capsys, root=project)
    assert f"search-space file {path}: not found" in line and "--no-search" in line, line


def test_an_unprintable_argument_stays_on_one_line(capsys, launch_args):
    line = error_line(launch_args + ["--bogus\nvalue"], capsys)
    assert "unrecognized arguments" in line and "(see --help)" in line


@pytest.mark.parametrize("argv", [[], ["report"]], ids=["launch", "report"])
def test_help_lists_the_exit_codes(capsys, argv):
    code, out, _ = run(argv + ["--help"], capsys)
    assert code == EXIT_OK
    listed = out[out.index("exit codes:"):]
    codes = [EXIT_OK, EXIT_USAGE, EXIT_INTERRUPTED] + ([EXIT_TRIALS_FAILED] if not argv else [])
    for exit_code in codes:
        assert re.search(rf"(^|\s){exit_code}\s+\w", listed), (exit_code, listed)


def test_help_lists_the_subcommands_with_an_example(capsys):
    out = run(["--help"], capsys)[1]
    subcommands = out[out.index("subcommands:"):out.index("exit codes:")]
    assert re.search(r"^\s+report\s", subcommands, re.MULTILINE)
    assert "python launch.py report --experiment" in subcommands

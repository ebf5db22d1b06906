"""A launch's folder and a resolved launch; the exit codes.

Owns the layout of ``<results>/<experiment>/`` (no other module joins these paths):

- ``launches/<launch id>/launch.json``: the launch record (its plan, tracking URI, MLflow ids),
  written before any work so ``--resume`` finds a launch killed while it generates data;
- ``launches/<launch id>/tune/``: Ray Tune's state (its trials' results, the searcher's);
- ``launches/<launch id>/events.log``: the lines trials write for the driver to show;
- ``launches/<launch id>/trial_states/``: the adaptation trials' resumable states;
- ``LATEST``: the id of the experiment's latest launch (what ``--resume`` continues);
- ``optuna.db``: the Optuna studies of every launch of the experiment;
- ``report.md``, ``report.html``, ``report.png``: the experiment's latest report;
- ``sensitivity/<scenario>_<method>.png``: its sensitivity plot per searched (scenario, method).

Shared by the command line (:mod:`.cli`, which resolves a launch), the launcher
(:mod:`.launcher`, which runs it), the stages and the report, so that the launcher never
imports the command line.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from timematch.errors import ConfigError

if TYPE_CHECKING:
    from timematch.runner.plan import LaunchPlan

EXIT_OK, EXIT_TRIALS_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
REPORT_SUFFIXES = (".md", ".html", ".png")


def safe_name(name: str) -> str:
    """``name`` as a folder or registry name: anything outside ``[A-Za-z0-9_.-]`` becomes ``_``."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


@dataclass(frozen=True)
class ExperimentFolder:
    """``<results>/<experiment>/``: every launch of one experiment, its Optuna storage, its report."""

    results: Path
    experiment: str

    @property
    def path(self) -> Path:
        return Path(self.results) / safe_name(self.experiment)

    @property
    def optuna_db(self) -> Path:
        return self.path / "optuna.db"

    @property
    def report_files(self) -> list[Path]:
        return [self.path / f"report{suffix}" for suffix in REPORT_SUFFIXES]

    def sensitivity_plot(self, scenario: str, method: str) -> Path:
        """The report's sensitivity plot of one searched (scenario, method)."""
        return self.path / "sensitivity" / f"{safe_name(scenario)}_{safe_name(method)}.png"

    def launch(self, launch_id: str) -> "LaunchFolder":
        return LaunchFolder(self, launch_id)

    def latest(self) -> "LaunchFolder":
        """The experiment's latest launch (``--resume``); a one-line error when it has none."""
        pointer = self.path / "LATEST"
        if not pointer.is_file():
            results = Path(self.results)
            known = sorted(p.parent.name for p in results.glob("*/LATEST")) if results.is_dir() else []
            raise ConfigError(
                f"--resume: no launch of experiment {self.experiment!r} under {results}; experiments with "
                f"launches: {', '.join(known) or 'none'} (pick one with --experiment)"
            )
        return self.launch(pointer.read_text().strip())

    def mark_latest(self, launch_id: str) -> None:
        (self.path / "LATEST").write_text(launch_id + "\n")


@dataclass(frozen=True)
class LaunchFolder:
    """``<results>/<experiment>/launches/<launch id>/``: one launch's record and state."""

    experiment: ExperimentFolder
    launch_id: str

    @property
    def path(self) -> Path:
        return self.experiment.path / "launches" / self.launch_id

    @property
    def tune(self) -> Path:
        """Ray Tune's storage for this launch's stages."""
        return self.path / "tune"

    @property
    def events(self) -> Path:
        return self.path / "events.log"

    @property
    def trial_states(self) -> Path:
        """The adaptation trials' resumable states (:meth:`trial_state`)."""
        return self.path / "trial_states"

    def trial_state(self, trial_id: str) -> Path:
        """Adaptation trial ``trial_id``'s resumable state: written after each epoch, dropped once
        the trial ends without an error (a failed one's stays: ``--resume`` continues it)."""
        return self.trial_states / f"{trial_id}.pt"

    @property
    def record_path(self) -> Path:
        return self.path / "launch.json"

    def save(self, record: dict[str, Any]) -> None:
        """Write the launch record and make this launch the experiment's latest."""
        self.path.mkdir(parents=True, exist_ok=True)
        self.record_path.write_text(json.dumps(record, indent=1))
        self.experiment.mark_latest(self.launch_id)

    def load(self) -> dict[str, Any]:
        try:
            return json.loads(self.record_path.read_text())
        except (OSError, ValueError) as err:
            raise ConfigError(f"--resume: the launch record {self.record_path} is unreadable ({err}); start a new "
                              "launch without --resume") from None


@dataclass
class Launch:
    """A resolved launch: its plan, where it logs and keeps its state."""

    plan: LaunchPlan
    folder: LaunchFolder
    tracking_uri: str
    address: str | None
    resumed: bool
    parent_run_id: str | None = None

    @property
    def launch_id(self) -> str:
        return self.folder.launch_id

    def save(self, experiment_id: str | None) -> None:
        """Record the launch for ``--resume``: first before any work (a launch killed while it
        generates or packs data resumes too), again once its MLflow parent run exists."""
        self.folder.save({"launch_id": self.launch_id, "experiment": self.plan.experiment,
                          "tracking_uri": self.tracking_uri, "experiment_id": experiment_id,
                          "parent_run_id": self.parent_run_id, "plan": json.loads(self.plan.to_json())})

"""A resolved launch and the exit codes, shared by the command line (:mod:`.cli`, which
resolves a launch) and the launcher (:mod:`.launcher`, which runs it): kept apart so that
the launcher never imports the command line."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

EXIT_OK, EXIT_TRIALS_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


@dataclass
class Launch:
    """A resolved launch: its plan, where it logs and keeps its state."""

    plan: Any  # LaunchPlan
    launch_id: str
    directory: Path
    tracking_uri: str
    address: str | None
    resumed: bool
    parent_run_id: str | None = None

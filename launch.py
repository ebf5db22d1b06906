#!/usr/bin/env python
"""Run TimeMatch experiments with hyper-parameter search on Ray, tracked in MLflow.

    python launch.py --help
    python launch.py                         # quick profile: 5 paper scenarios, every method
    python launch.py report                  # the table of the latest experiment

Parsing, validation and the run itself live in :mod:`timematch.runner.cli`; this file only
tells it where the project's config folders (experiments/, search_spaces/, mlflow/,
results/) are.
"""

import sys
from pathlib import Path

from timematch.runner.cli import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], project_root=Path(__file__).resolve().parent))

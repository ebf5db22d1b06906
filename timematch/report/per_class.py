"""A trial's per-class report (class -> precision, recall, F1, support) as CSV text: the
``per_class_report.csv`` a trial logs beside its metrics."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def per_class_csv(report: Mapping[str, Mapping[str, float]]) -> str:
    """The per-class report (class -> precision, recall, f1, support) as CSV text."""
    columns: list[str] = []
    for values in report.values():
        columns.extend(k for k in values if k not in columns)
    lines = [",".join(["class", *columns])]
    for name, values in report.items():
        lines.append(",".join([_csv(name), *(_csv(values.get(c, "")) for c in columns)]))
    return "\n".join(lines) + "\n"


def _csv(value: Any) -> str:
    text = f"{value:.6g}" if isinstance(value, float) else str(value)
    return f'"{text}"' if any(c in text for c in ',"\n') else text

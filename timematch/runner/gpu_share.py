"""``--gpus-per-trial auto`` on a GPU cluster: the share of a GPU at which the measured
aggregate throughput stops rising. This module owns that choice and the measured curves.

``benchmarks/gpu_sharing.py --save timematch/runner/gpu_curves.json`` measures, per GPU
model, the aggregate training steps per second of K concurrent trials run as the runner
runs them (one process each, Ray's fractional GPUs, the fast path) for K = 1, 2, 4, 8, 16,
and merges the curve into that file. ``auto`` reads the curve of TimeMatch (the adaptation
trials' step) and takes the smallest K after which doubling the trials adds less than
:data:`GAIN`: more trials per GPU would then add memory and contention, not throughput.
A measured curve answers for the GPU at hand without costing every launch a probe; a GPU
with no curve gets :data:`DEFAULT_SHARE`, and the launch says so.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

CURVES = Path(__file__).with_name("gpu_curves.json")
#: A doubling of the trials per GPU must raise the aggregate throughput by this much.
GAIN = 0.10
#: The share of a trial when the GPU has no measured curve (four trials per GPU).
DEFAULT_SHARE = 0.25
#: The curve ``auto`` reads: the method, how the trials share the GPU, and the step path.
CURVE = {"method": "timematch", "sharing": "processes", "path": "cuda_graph"}


@dataclass(frozen=True)
class Share:
    gpus: float
    reason: str


def normalise(name: str) -> str:
    """``NVIDIA H200`` (torch, NVML) and ``H200`` (Ray's accelerator type) -> ``H200``."""
    return name.upper().replace("NVIDIA", "").replace("-", " ").strip()


def load_curves(path: Path = CURVES) -> dict[str, list[dict]]:
    """GPU name -> the measured points (see benchmarks/gpu_sharing.py); {} when none was saved."""
    if not path.is_file():
        return {}
    return json.loads(path.read_text()).get("curves", {})


def auto_share(gpu: str | None, curves: dict[str, list[dict]] | None = None) -> Share:
    """The share of one trial on the GPU model ``gpu`` (None: unknown)."""
    curves = load_curves() if curves is None else curves
    if not gpu:
        return Share(DEFAULT_SHARE, f"auto: the cluster's GPU model is unknown; {DEFAULT_SHARE:g} per trial")
    found = {normalise(name): points for name, points in curves.items()}.get(normalise(gpu))
    points = sorted((p for p in found or [] if all(p.get(k) == v for k, v in CURVE.items())),
                    key=lambda p: p["trials"])
    if not points:
        return Share(DEFAULT_SHARE, f"auto: no measured curve for {gpu} (benchmarks/gpu_sharing.py --save "
                                    f"{CURVES.name} on one); {DEFAULT_SHARE:g} per trial")
    chosen = points[0]
    for point in points[1:]:
        if point["aggregate"] < chosen["aggregate"] * (1 + GAIN):
            break
        chosen = point
    trials = int(chosen["trials"])
    shown = ", ".join(f"{p['trials']}: {p['aggregate']:.0f}" for p in points)
    return Share(1.0 / trials, f"auto: {trials} trial{'s' if trials > 1 else ''} per {gpu}, where the measured "
                               f"aggregate steps/s stops rising by {GAIN:.0%} per doubling (trials: steps/s {shown})")


def save_curve(gpu: str, points: list[dict], path: Path = CURVES) -> None:
    """Merge ``gpu``'s measured points into the curves file."""
    data = json.loads(path.read_text()) if path.is_file() else {}
    data.setdefault("curves", {})[gpu] = points
    path.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")

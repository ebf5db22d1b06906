"""How a training runs, as opposed to what it computes: one small, import-light module (the
command line reads its choices without importing torch)."""

from __future__ import annotations

from dataclasses import dataclass

from timematch.errors import ConfigError

#: ``fp32``; ``bf16``: the training steps' forward passes under autocast (evaluation in float32).
PRECISIONS = ("fp32", "bf16")


@dataclass(frozen=True)
class Execution:
    """``precision``: one of :data:`PRECISIONS` (it changes the trained model, so it is part
    of a source model's key). ``cuda_graph``: on a GPU, capture the training step once and
    replay it (False: eager, for debugging). ``gpu_share``: the fraction of its GPU the trial
    has (Ray's ``--gpus-per-trial``), which decides whether the tiles fit there
    (:func:`timematch.data.views.place_views`)."""

    precision: str = "fp32"
    cuda_graph: bool = True
    gpu_share: float = 1.0

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision {self.precision!r}: valid values are {', '.join(PRECISIONS)}")
        if not isinstance(self.gpu_share, (int, float)) or not 0.0 < float(self.gpu_share) <= 1024:
            raise ConfigError(f"gpu_share {self.gpu_share!r}: a positive fraction of a GPU")

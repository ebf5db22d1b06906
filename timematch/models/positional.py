"""Fixed sinusoidal encoding of acquisition dates, shared by every temporal encoder.

Positions are days after the tile's start date. TimeMatch shifts them by up to
``max_shift`` days in either direction, so the table covers
``[-max_shift, max_position + max_shift)`` and is indexed by ``position + max_shift``
(the layout of the public TimeMatch code: 365 + 2 * 100 rows by default).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F


def sinusoid_frequencies(dim: int, period: float = 1000.0) -> torch.Tensor:
    """Angular frequencies ``period^(-2i/dim)``, i < dim / 2 (float64)."""
    return torch.exp(torch.arange(0, dim, 2, dtype=torch.float64) * (-math.log(period) / dim))


def sinusoid_table(length: int, dim: int, period: float = 1000.0) -> torch.Tensor:
    """``(length, dim)`` table: column ``2i`` is ``sin(p * f_i)``, column ``2i + 1`` is ``cos(p * f_i)``."""
    position = torch.arange(length, dtype=torch.float64)[:, None]
    freq = sinusoid_frequencies(dim, period)
    table = torch.zeros(length, dim, dtype=torch.float64)
    table[:, 0::2] = torch.sin(position * freq)
    table[:, 1::2] = torch.cos(position * freq)
    return table.float()


class PositionalEncoding(nn.Module):
    """Looks up the sinusoidal encoding of integer date positions.

    ``forward(positions (B, T) int) -> (B, T, dim)``. Positions must lie in
    ``[-max_shift, max_position + max_shift)``: the forward does not check (it would read
    the positions back to the host); :func:`check_positions` checks where batches are built.
    The table is a
    non-persistent buffer: it is rebuilt from the constructor arguments, never stored in
    checkpoints, and follows the module across devices.
    """

    def __init__(self, dim: int, period: float = 1000.0, max_position: int = 365, max_shift: int = 100) -> None:
        super().__init__()
        if dim % 2:
            raise ValueError(f"the positional encoding needs an even width (sin, cos pairs), got {dim}")
        self.dim = dim
        self.max_shift = max_shift
        self.low = -max_shift
        self.high = max_position + max_shift
        self.register_buffer("table", sinusoid_table(max_position + 2 * max_shift, dim, period), persistent=False)
        self.register_buffer("frequencies", sinusoid_frequencies(dim, period), persistent=False)

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        check_integer(positions)
        return F.embedding(positions + self.max_shift, self.table)

    def shift(self, encoded: torch.Tensor, shifts: torch.Tensor) -> torch.Tensor:
        """Turn encodings of positions ``p`` into encodings of ``p + d``, one shift per leading row.

        ``encoded`` (D, ..., dim) holds encodings, or any linear combination of them (such as
        an attention-weighted sum over dates); ``shifts`` (D,) int. Each (sin, cos) pair is
        rotated by the angle ``d * f``: ``sin((p + d) f) = sin(pf) cos(df) + cos(pf) sin(df)``.
        """
        angle = shifts.to(torch.float64)[:, None] * self.frequencies  # (D, dim / 2)
        view = (shifts.shape[0],) + (1,) * (encoded.dim() - 2) + (-1,)
        cos, sin = angle.cos().to(encoded.dtype).view(view), angle.sin().to(encoded.dtype).view(view)
        sin_part, cos_part = encoded[..., 0::2], encoded[..., 1::2]
        rotated = torch.stack([sin_part * cos + cos_part * sin, cos_part * cos - sin_part * sin], dim=-1)
        return rotated.flatten(-2)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, valid positions [{self.low}, {self.high})"


def check_integer(positions: torch.Tensor) -> None:
    """Raise ``ValueError`` unless ``positions`` has an integer type (a property of the tensor:
    nothing is read back)."""
    if positions.dtype.is_floating_point or positions.dtype == torch.bool:
        raise ValueError(f"date positions must be an integer tensor (int64 days), got dtype {positions.dtype}")


def check_positions(positions, low: int, high: int) -> None:
    """Raise ``ValueError`` unless every position is an integer in ``[low, high)``.

    ``positions``: an array or tensor, or just the (min, max) pair. For host data (numpy,
    CPU tensors) or once per tile: on a GPU tensor it reads the minimum and maximum back.
    """
    if isinstance(positions, torch.Tensor):
        check_integer(positions)
        if positions.numel() == 0:
            return
        lo, hi = torch.stack(torch.aminmax(positions)).tolist()
    else:
        values = np.asarray(positions)
        if values.size == 0:
            return
        if not np.issubdtype(values.dtype, np.integer):
            raise ValueError(f"date positions must be integers (days), got dtype {values.dtype}")
        lo, hi = int(values.min()), int(values.max())
    if lo < low or hi >= high:
        raise ValueError(
            f"date positions must lie in [{low}, {high}) (days after the start date, shifts included), "
            f"got min {lo} and max {hi}; keep the shift search range within +-{-low} days "
            f"or build the model with larger max_shift / max_position"
        )

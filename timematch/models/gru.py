"""GRU head, TimeMatch comparison variant.

The date embeddings get the sinusoidal encoding of their positions and run through a
single-layer GRU; the last hidden state is the parcel feature.
"""

from __future__ import annotations

import torch
from torch import nn

from timematch.models.positional import PositionalEncoding


class GRUEncoder(nn.Module):
    """``forward(x (B, T, in_dim), positions (B, T)) -> (B, hidden_dim)``."""

    def __init__(
        self,
        in_dim: int = 128,
        hidden_dim: int = 128,
        period: float = 1000.0,
        max_position: int = 365,
        max_shift: int = 100,
    ) -> None:
        super().__init__()
        self.out_dim = hidden_dim
        self.positional = PositionalEncoding(in_dim, period, max_position, max_shift)
        self.gru = nn.GRU(in_dim, hidden_dim, batch_first=True)

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        _, last = self.gru(x + self.positional(positions))
        return last[-1]

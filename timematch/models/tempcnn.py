"""Temporal CNN head (after Pelletier et al., 2019), TimeMatch comparison variant.

The date embeddings get the sinusoidal encoding of their positions (so a shift of the
dates changes the features, which shift estimation relies on), then 1-D convolutions run
over time. The published TempCNN flattens the time axis, which ties the model to one
sequence length; here the maps are pooled by their temporal mean and max instead so the
same weights serve 30 sampled dates in training and all dates in evaluation.
"""

from __future__ import annotations

import torch
from torch import nn

from timematch.models.layers import BatchNorm1d, linear_blocks
from timematch.models.positional import PositionalEncoding


class TempCNN(nn.Module):
    """``forward(x (B, T, in_dim), positions (B, T)) -> (B, mlp[-1])``."""

    def __init__(
        self,
        in_dim: int = 128,
        kernels: tuple[int, ...] = (32, 32, 128),
        kernel_size: int = 3,
        mlp: tuple[int, ...] = (256, 128),
        dropout: float = 0.2,
        period: float = 1000.0,
        max_position: int = 365,
        max_shift: int = 100,
    ) -> None:
        super().__init__()
        if mlp[0] != 2 * kernels[-1]:
            raise ValueError(f"mlp must start at 2 * kernels[-1] = {2 * kernels[-1]} (mean and max), got {mlp}")
        self.out_dim = mlp[-1]
        self.positional = PositionalEncoding(in_dim, period, max_position, max_shift)
        layers: list[nn.Module] = []
        for a, b in zip((in_dim, *kernels[:-1]), kernels):
            layers += [nn.Conv1d(a, b, kernel_size, padding=kernel_size // 2), BatchNorm1d(b), nn.ReLU()]
        self.conv = nn.Sequential(*layers)
        self.mlp = linear_blocks(mlp)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        x = x + self.positional(positions)
        maps = self.conv(x.transpose(1, 2))  # (B, kernels[-1], T)
        pooled = torch.cat([maps.mean(dim=-1), maps.amax(dim=-1)], dim=-1)
        return self.dropout(self.mlp(pooled))

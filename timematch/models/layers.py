"""Building blocks shared by the encoders and the decoder."""

from __future__ import annotations

import torch
from torch import nn


class LinearBlock(nn.Module):
    """Linear (no bias) -> BatchNorm1d -> ReLU, applied to the last dimension.

    The bias is left out because the batch norm that follows removes it. Inputs of any
    rank ``(..., in_dim)`` are flattened to ``(N, in_dim)`` so that the batch norm
    statistics run over every leading position (parcels, dates, pixels).
    """

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(in_dim, out_dim, bias=False)
        self.norm = nn.BatchNorm1d(out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape[:-1]
        out = self.norm(self.linear(x.reshape(-1, x.shape[-1])))
        return torch.relu_(out).view(*shape, -1)


def linear_blocks(dims: tuple[int, ...] | list[int]) -> nn.Sequential:
    """A chain of :class:`LinearBlock` through the widths ``dims`` (``len(dims) - 1`` blocks)."""
    return nn.Sequential(*(LinearBlock(a, b) for a, b in zip(dims[:-1], dims[1:])))

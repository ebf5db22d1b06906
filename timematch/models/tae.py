"""Temporal Attention Encoder (Sainte Fare Garnot et al., CVPR 2020), the original PSE+TAE head.

Inputs are layer-normalised and position-encoded; each head's query is the temporal mean
of a linear projection passed through BatchNorm and a linear layer (the "master query"),
its keys a linear projection, its values the full input::

    q_h = fc2(mean_t fc1_q(x_t))_h,  a_h = softmax_t(q_h . k_{h,t} / sqrt(d_k)),
    o_h = sum_t a_{h,t} x_t

The heads are concatenated (n_head * d_in = 512) and an MLP (512 -> 128 -> 128, Linear
with bias, BatchNorm, ReLU), dropout and a final LayerNorm give the 128-d feature.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from timematch.models.layers import BatchNorm1d
from timematch.models.positional import PositionalEncoding


class TAE(nn.Module):
    """``forward(x (B, T, in_dim), positions (B, T)) -> (B, mlp[-1])``."""

    def __init__(
        self,
        in_dim: int = 128,
        n_head: int = 4,
        d_k: int = 32,
        mlp: tuple[int, ...] = (512, 128, 128),
        dropout: float = 0.2,
        attention_dropout: float = 0.1,
        period: float = 1000.0,
        max_position: int = 365,
        max_shift: int = 100,
    ) -> None:
        super().__init__()
        if mlp[0] != n_head * in_dim:
            raise ValueError(f"mlp must start at n_head * in_dim = {n_head * in_dim}, got {mlp}")
        self.n_head, self.d_k = n_head, d_k
        self.out_dim = mlp[-1]
        self.in_norm = nn.LayerNorm(in_dim)
        self.positional = PositionalEncoding(in_dim, period, max_position, max_shift)
        self.fc1_q = nn.Linear(in_dim, n_head * d_k)
        self.fc1_k = nn.Linear(in_dim, n_head * d_k)
        nn.init.normal_(self.fc1_q.weight, mean=0.0, std=math.sqrt(2.0 / d_k))
        nn.init.normal_(self.fc1_k.weight, mean=0.0, std=math.sqrt(2.0 / d_k))
        self.fc2 = nn.Sequential(BatchNorm1d(n_head * d_k), nn.Linear(n_head * d_k, n_head * d_k))
        self.attention_dropout = nn.Dropout(attention_dropout)
        layers: list[nn.Module] = []
        for a, b in zip(mlp[:-1], mlp[1:]):
            layers += [nn.Linear(a, b), BatchNorm1d(b), nn.ReLU()]
        self.mlp = nn.Sequential(*layers)
        self.dropout = nn.Dropout(dropout)
        self.out_norm = nn.LayerNorm(mlp[-1])

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        x = self.in_norm(x) + self.positional(positions)
        query = self.fc2(self.fc1_q(x).mean(dim=1)).view(B, self.n_head, self.d_k)
        keys = self.fc1_k(x).view(B, T, self.n_head, self.d_k)
        scores = torch.einsum("bthk,bhk->bht", keys, query) / math.sqrt(self.d_k)
        attention = self.attention_dropout(scores.softmax(dim=-1))  # (B, H, T)
        heads = torch.bmm(attention, x)  # (B, H, in_dim): every head attends over the full input
        return self.out_norm(self.dropout(self.mlp(heads.reshape(B, -1))))

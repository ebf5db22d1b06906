"""Lightweight Temporal Attention Encoder (Sainte Fare Garnot & Landrieu, 2020), TimeMatch variant.

Each head ``h`` has a learned master query ``q_h`` (d_k); keys come from one linear layer
on the position-encoded inputs ``x_t`` (d_model = 256), and the values are the inputs
themselves split into ``n_head`` channel groups::

    a_h = softmax_t(q_h . k_{h,t} / sqrt(d_k)),    o_h = sum_t a_{h,t} x_t[group h]

The heads are concatenated (d_model) and a Linear block maps them to 128. All heads and
dates are handled by two batched contractions (no Python loop).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from timematch.models.layers import LinearBlock, linear_blocks
from timematch.models.positional import PositionalEncoding


class LTAE(nn.Module):
    """``forward(x (B, T, in_dim), positions (B, T)) -> (B, mlp[-1])``."""

    def __init__(
        self,
        in_dim: int = 128,
        d_model: int = 256,
        n_head: int = 16,
        d_k: int = 8,
        mlp: tuple[int, ...] = (256, 128),
        dropout: float = 0.2,
        attention_dropout: float = 0.1,
        period: float = 1000.0,
        max_position: int = 365,
        max_shift: int = 100,
    ) -> None:
        super().__init__()
        if d_model % n_head:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_head ({n_head})")
        if mlp[0] != d_model:
            raise ValueError(f"mlp must start at d_model = {d_model}, got {mlp}")
        self.n_head, self.d_k = n_head, d_k
        self.out_dim = mlp[-1]
        self.inconv = LinearBlock(in_dim, d_model)
        self.positional = PositionalEncoding(d_model, period, max_position, max_shift)
        self.key = nn.Linear(d_model, n_head * d_k)
        self.query = nn.Parameter(torch.randn(n_head, d_k) * math.sqrt(2.0 / d_k))
        self.attention_dropout = nn.Dropout(attention_dropout)
        self.mlp = linear_blocks(mlp)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        x = self.inconv(x) + self.positional(positions)  # (B, T, d_model)
        keys = self.key(x).view(B, T, self.n_head, self.d_k)
        scores = torch.einsum("bthk,hk->bht", keys, self.query) / math.sqrt(self.d_k)
        attention = self.attention_dropout(scores.softmax(dim=-1))  # (B, H, T)
        values = x.view(B, T, self.n_head, -1)
        heads = torch.einsum("bht,bthc->bhc", attention, values)  # (B, H, d_model / H)
        return self.dropout(self.mlp(heads.reshape(B, -1)))

    def forward_shifted(self, x: torch.Tensor, positions: torch.Tensor, shifts: torch.Tensor) -> torch.Tensor:
        """``forward`` at ``positions + d`` for each of the D ``shifts``: ``(D * B, out_dim)``, shift-major.

        In eval mode, equal up to rounding to
        ``forward(x.repeat(D, 1, 1), positions.repeat(D, 1) + shifts.repeat_interleave(B)[:, None])``,
        without repeating the work that does not depend on the shift: the input block and the
        key projection run once. The encoding enters linearly: the keys of ``h + p`` are
        ``key(h) + W_k p``, so a shift adds one lookup in a projected (positions x heads)
        table to the scores; the values' share ``sum_t a_t p(t + d)`` is ``sum_t a_t p(t)``
        rotated by ``d`` (see :meth:`PositionalEncoding.shift`).
        """
        B, T, _ = x.shape
        D = shifts.shape[0]
        positional = self.positional
        shifted = positions[None] + shifts[:, None, None]  # (D, B, T), inside the table: the caller's check
        h = self.inconv(x)  # (B, T, d_model)
        base = torch.einsum("bthk,hk->bht", self.key(h).view(B, T, self.n_head, self.d_k), self.query)
        table_keys = (positional.table @ self.key.weight.t()).view(-1, self.n_head, self.d_k)
        table_scores = torch.einsum("lhk,hk->lh", table_keys, self.query)  # (L, H): the encoding's share
        offset = table_scores[shifted + positional.max_shift].permute(0, 1, 3, 2)  # (D, B, H, T)
        attention = (base + offset).div_(math.sqrt(self.d_k)).softmax(dim=-1)
        attention = self.attention_dropout(attention)
        # values h + p(t + d): weight h and p(t) once per shift, then move p(t) to p(t + d)
        from_h = torch.einsum("dbht,bthc->dbhc", attention, h.view(B, T, self.n_head, -1))
        from_p = torch.einsum("dbht,bthc->dbhc", attention, positional(positions).view(B, T, self.n_head, -1))
        heads = from_h.reshape(D, B, -1) + positional.shift(from_p.reshape(D, B, -1), shifts)
        return self.dropout(self.mlp(heads.reshape(D * B, -1)))

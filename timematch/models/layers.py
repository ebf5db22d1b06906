"""Building blocks shared by the encoders and the decoder, and the batch norm that can leave
samples out of its statistics.

:func:`sample_weighted_statistics` lets a training step forward a batch of fixed size in
which only some samples count (FixMatch's confident target samples): inside it, every
:class:`BatchNorm1d` of the model in train mode computes its batch statistics over the
samples of weight 1 only, as if the others had not been forwarded, and updates its running
statistics only when at least two samples count. Outside it the layer is
``nn.BatchNorm1d`` exactly. Keeping the shape fixed is what lets the whole step be captured
once and replayed as a CUDA graph (:mod:`timematch.step_engine`): selecting the confident
samples (``x[confident]``) would give a new shape at every step and read the count back to
the host.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class SampleWeights:
    """``weight`` (B,) float, 1 = the sample counts in batch statistics, 0 = it does not;
    ``gate`` 0-dim float, 1 when the running statistics are updated (at least two samples
    count), else 0. When fewer than two count, ``weight`` is all ones, so the batch is
    normalised by its own statistics and stays finite; the caller gives those samples no
    loss."""

    weight: torch.Tensor
    gate: torch.Tensor

    @classmethod
    def of(cls, weight: torch.Tensor) -> "SampleWeights":
        weight = weight.float()
        enough = weight.sum() >= 2
        return cls(torch.where(enough, weight, torch.ones_like(weight)), enough.float())

    def rows(self, n_rows: int) -> torch.Tensor:
        """Weights of ``n_rows`` rows laid out sample-major (``n_rows`` a multiple of B)."""
        batch = self.weight.shape[0]
        if n_rows == batch:
            return self.weight
        if n_rows % batch:
            raise ValueError(f"{n_rows} rows are not {batch} samples x a whole number of positions")
        return self.weight.repeat_interleave(n_rows // batch)


_ACTIVE: contextvars.ContextVar[SampleWeights | None] = contextvars.ContextVar("sample_weights", default=None)


@contextlib.contextmanager
def sample_weighted_statistics(weights: SampleWeights | None) -> Iterator[None]:
    """Inside: batch norms in train mode use only the samples ``weights`` selects (None: all)."""
    token = _ACTIVE.set(weights)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def active_sample_weights() -> SampleWeights | None:
    return _ACTIVE.get()


class BatchNorm1d(nn.BatchNorm1d):
    """``nn.BatchNorm1d`` (same parameters, buffers and state dict) that honours
    :func:`sample_weighted_statistics` in train mode. Inputs (N, C) or (B, C, L)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights = _ACTIVE.get()
        if weights is None or not self.training:
            return super().forward(x)
        if x.dim() == 3:  # (B, C, L): statistics over samples and positions
            batch, channels, length = x.shape
            rows = x.transpose(1, 2).reshape(-1, channels)
            return weighted_batch_norm(self, rows, weights.rows(rows.shape[0]), weights.gate).view(
                batch, length, channels).transpose(1, 2)
        return weighted_batch_norm(self, x, weights.rows(x.shape[0]), weights.gate)


def weighted_batch_norm(norm: nn.BatchNorm1d, x: torch.Tensor, row_weight: torch.Tensor,
                        gate: torch.Tensor) -> torch.Tensor:
    """Batch norm of rows ``x`` (N, C) with statistics over the rows of weight 1 (``row_weight``
    (N,) of 0 and 1), the running statistics moved by ``norm.momentum * gate``. In float32
    under autocast, as autocast runs ``nn.BatchNorm1d``."""
    with torch.autocast(x.device.type, enabled=False):
        return _weighted_batch_norm(norm, x.float(), row_weight.float(), gate)


def _weighted_batch_norm(norm: nn.BatchNorm1d, x: torch.Tensor, row_weight: torch.Tensor,
                         gate: torch.Tensor) -> torch.Tensor:
    total = row_weight.sum()
    mean = (row_weight @ x) / total
    centred = x - mean
    var = (row_weight @ centred.square()) / total  # biased, as BatchNorm normalises with
    out = centred * torch.rsqrt(var + norm.eps)
    if norm.affine:
        out = out * norm.weight + norm.bias
    if norm.track_running_stats:
        update_running_stats(norm, mean.detach(), var.detach(), total.detach(), gate)
    return out


@torch.no_grad()
def update_running_stats(norm: nn.BatchNorm1d, mean: torch.Tensor, var: torch.Tensor, rows: torch.Tensor | float,
                         gate: torch.Tensor | None = None) -> None:
    """Move ``norm``'s running statistics towards a batch's ``mean`` and biased ``var`` over
    ``rows`` rows, as ``nn.BatchNorm1d`` does in train mode (unbiased variance; momentum None:
    cumulative average); ``gate`` (0-dim, 0 or 1) None or 1: update, 0: leave them. Tensor ops
    only: nothing is read back to the host. Like the native batch norm, the update is not
    seen by autograd (through ``.data``): an earlier forward's backward, which saved the
    running statistics, stays valid."""
    if not norm.track_running_stats:
        return
    running_mean, running_var, tracked = norm.running_mean.data, norm.running_var.data, norm.num_batches_tracked.data
    if gate is None:
        tracked.add_(1)
    else:
        tracked.add_(gate.to(tracked.dtype))
    if norm.momentum is None:
        momentum = 1.0 / tracked.clamp_min(1).to(running_mean.dtype)
    else:
        momentum = norm.momentum
    if gate is not None:
        momentum = gate.to(running_mean.dtype) * momentum
    if isinstance(rows, torch.Tensor):
        unbiased = var * (rows.to(var.dtype) / (rows.to(var.dtype) - 1).clamp_min(1))
    else:  # a number: no tensor made from it (a host-to-device copy, which a captured step cannot hold)
        unbiased = var * (rows / max(rows - 1, 1))
    # lerp's own formula (a + w (b - a)) in ops that torch.func.vmap batches (an array of trials
    # runs this per member; vmap has no batching rule for lerp_ and would loop over the members)
    running_mean.add_((mean.to(running_mean.dtype) - running_mean) * momentum)
    running_var.add_((unbiased.to(running_var.dtype) - running_var) * momentum)


class LinearBlock(nn.Module):
    """Linear (no bias) -> BatchNorm1d -> ReLU, applied to the last dimension.

    The bias is left out because the batch norm that follows removes it. Inputs of any
    rank ``(..., in_dim)`` are flattened to ``(N, in_dim)`` so that the batch norm
    statistics run over every leading position (parcels, dates, pixels).
    """

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(in_dim, out_dim, bias=False)
        self.norm = BatchNorm1d(out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape[:-1]
        out = self.norm(self.linear(x.reshape(-1, x.shape[-1])))
        return torch.relu_(out).view(*shape, -1)


def linear_blocks(dims: tuple[int, ...] | list[int]) -> nn.Sequential:
    """A chain of :class:`LinearBlock` through the widths ``dims`` (``len(dims) - 1`` blocks)."""
    return nn.Sequential(*(LinearBlock(a, b) for a, b in zip(dims[:-1], dims[1:])))

"""Fused MLP1 + masked mean/std pooling of the Pixel-Set Encoder, computed in chunks.

MLP1 runs on every pixel of every date (128 parcels x 30 dates x 64 pixels = 245,760
rows per training batch). Written with standard modules, each of its activations is a
30-60 MB tensor and a CPU training step is bound by memory traffic and page faults (glibc
hands buffers above 32 MB back to the system after every use), about 0.85 s for a batch
of 128 on 2 cores. Here the rows are processed in cache-sized chunks and never stored:
the backward pass recomputes them.

Batch normalisation is unchanged (up to rounding). Each Linear block's batch statistics are those of its
output over the valid pixels, obtained from the mean and covariance of its *input*
(``mean(W h) = W mean(h)``, ``var(W h)_c = w_c^T Cov(h) w_c``), so the normalisation can
be folded into the linear layer: ``relu(BN(W h)) = relu(W' h + b')`` with
``W' = a W``, ``b' = beta - a W mean(h)``, ``a = gamma / sqrt(var + eps)``. The folding runs
on tiny tensors under ordinary autograd; the two autograd functions below handle the
per-pixel work:

- :class:`_HiddenMoments`: sum and Gram matrix of one hidden layer over the valid pixels
  (the input statistics of the next Linear block);
- :class:`_PooledMLP`: the whole MLP1 followed by the masked mean and the masked standard
  deviation (``sqrt(sum (h - mean)^2 / (n - 1) + 1e-31)``) over the pixels of each
  (parcel, date).

Padded pixels get zero weight everywhere, so they change neither the output nor the
batch statistics. Samples left out by :func:`timematch.models.layers.sample_weighted_statistics`
get zero weight in the statistics (not in their own pooling). Nothing is read back to the
host: the counts stay tensors, and whether the batch is padded is the caller's static
knowledge (``padded``), so the computation can be captured in a CUDA graph. Under autocast
(bf16) the per-pixel layers run in the autocast type and the pooling, the statistics and
the parameter gradients in float32. ``tests/test_models.py`` checks values, gradients and
running statistics against the plain module implementation.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from timematch.models.layers import active_sample_weights, update_running_stats

STD_EPS = 1e-31  # keeps sqrt differentiable at zero variance (public code: 10e-32)
CPU_CHUNK_ROWS = 16384  # pixel rows per chunk on CPU: keeps each activation around 4 MB
GPU_CHUNK_ROWS = 1 << 22  # on a GPU one large chunk is fastest


def chunk_groups(pixels_per_group: int, device: torch.device) -> int:
    """How many (parcel, date) groups of ``pixels_per_group`` pixels go in one chunk."""
    rows = CPU_CHUNK_ROWS if device.type == "cpu" else GPU_CHUNK_ROWS
    return max(1, rows // max(1, pixels_per_group))


def _forward_layers(x: torch.Tensor, params: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
    """Activations ``[x, h_1, ..., h_L]`` of ``h_k = relu(h_{k-1} W_k^T + b_k)`` for rows ``x``."""
    acts = [x]
    for k in range(0, len(params), 2):
        acts.append(torch.addmm(params[k + 1], acts[-1], params[k].t()).relu_())
    return acts


def _backward_layers(
    acts: list[torch.Tensor], grad_out: torch.Tensor, params: tuple[torch.Tensor, ...], grads: list[torch.Tensor]
) -> None:
    """Accumulate into ``grads`` (float32) the parameter gradients given ``grad_out = dL/dh_L``
    (all in the activations' type)."""
    grad = grad_out
    for layer in range(len(params) // 2 - 1, -1, -1):
        grad = torch.ops.aten.threshold_backward(grad, acts[layer + 1], 0.0)  # through the ReLU
        # out of place: under vmap (an array of trials) the gradients may be batched where a start value is not
        grads[2 * layer] = grads[2 * layer] + (acts[layer].t() @ grad).t()  # far faster than grad.t() @ acts
        grads[2 * layer + 1] = grads[2 * layer + 1] + grad.sum(0, dtype=grads[2 * layer + 1].dtype)
        if layer:
            grad = grad @ params[2 * layer]


def _cast(params: tuple[torch.Tensor, ...], dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    return tuple(p.to(dtype) for p in params)


class _HiddenMoments(torch.autograd.Function):
    """``(sum_r w_r h_r, sum_r w_r h_r h_r^T)`` of the last hidden layer ``h`` over pixel rows.

    ``x`` (R, C) pixel rows, ``weights`` (R,) 1 for a row in the statistics and 0 otherwise
    (None: every row), ``dtype`` the type the layers compute in, ``params`` the folded
    (weight, bias) pairs. Sums are float64.
    """

    generate_vmap_rule = True  # an array of trials runs it under torch.func.vmap (timematch.arrays)

    @staticmethod
    def forward(x, weights, chunk_rows, dtype, *params):
        total = gram = 0.0  # accumulated out of place: under vmap the sums are batched, x is not
        layers = _cast(params, dtype)
        for r0 in range(0, x.shape[0], chunk_rows):
            hidden = _forward_layers(x[r0 : r0 + chunk_rows].to(dtype), layers)[-1].float()
            weighted = hidden if weights is None else hidden * weights[r0 : r0 + chunk_rows, None]
            total = total + weighted.sum(0).double()
            gram = gram + (weighted.t() @ hidden).double()
        return total, gram

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weights, chunk_rows, dtype, *params = inputs
        ctx.chunk_rows, ctx.dtype = chunk_rows, dtype
        ctx.weighted = weights is not None
        ctx.save_for_backward(x, weights, *params)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_total, grad_gram):
        x, weights, *params = ctx.saved_tensors
        grads = [torch.zeros_like(p) for p in params]
        layers = _cast(tuple(params), ctx.dtype)
        grad_total = grad_total.float()
        grad_gram = (grad_gram + grad_gram.t()).float()
        for r0 in range(0, x.shape[0], ctx.chunk_rows):
            acts = _forward_layers(x[r0 : r0 + ctx.chunk_rows].to(ctx.dtype), layers)
            grad = torch.addmm(grad_total, acts[-1].float(), grad_gram)
            if ctx.weighted:
                grad.mul_(weights[r0 : r0 + ctx.chunk_rows, None])
            _backward_layers(acts, grad.to(ctx.dtype), layers, grads)
        return (None, None, None, None, *grads)


class _PooledMLP(torch.autograd.Function):
    """Row MLP on every pixel, then masked mean and std over the pixels of each group.

    ``x`` (G, S, C) pixels of G (parcel, date) groups, ``weights`` (G, S) 1 = valid pixel,
    ``counts`` (G,) valid pixels per group (at least 1), ``padded`` whether any weight may
    be 0, ``dtype`` the type the layers compute in; returns mean and std, each (G, F),
    float32.
    """

    generate_vmap_rule = True  # an array of trials runs it under torch.func.vmap (timematch.arrays)

    @staticmethod
    def forward(x, weights, counts, padded, chunk, dtype, *params):
        G, S, C = x.shape
        dim = params[-2].shape[0]
        means, stds = [], []  # joined at the end: under vmap the results are batched, x is not
        dof = (counts - 1).clamp_min(1)[:, None]
        layers = _cast(params, dtype)
        for g0 in range(0, G, chunk):
            g1 = min(G, g0 + chunk)
            rows = x[g0:g1].reshape(-1, C).to(dtype)
            hidden = _forward_layers(rows, layers)[-1].float().view(g1 - g0, S, dim)
            w = weights[g0:g1, :, None]
            if padded:
                hidden.mul_(w)
            m = hidden.sum(1).div_(counts[g0:g1, None])
            centred = hidden.sub_(m[:, None, :])
            if padded:
                centred.mul_(w)
            means.append(m)
            stds.append(centred.mul_(centred).sum(1).div_(dof[g0:g1]).add_(STD_EPS).sqrt_())
        if len(means) == 1:
            return means[0], stds[0]
        return torch.cat(means), torch.cat(stds)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weights, counts, padded, chunk, dtype, *params = inputs
        mean, std = output
        ctx.chunk, ctx.padded, ctx.dtype = chunk, padded, dtype
        ctx.save_for_backward(x, weights, counts, mean, std, *params)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_mean, grad_std):
        x, weights, counts, mean, std, *params = ctx.saved_tensors
        G, S, C = x.shape
        dim = params[-2].shape[0]
        grads = [torch.zeros_like(p) for p in params]
        layers = _cast(tuple(params), ctx.dtype)
        # d mean / d h_s = w_s / n ;  d std / d h_s = w_s (h_s - mean) / ((n - 1) std)
        along_mean = grad_mean.float() / counts[:, None]
        along_centred = grad_std.float() / ((counts - 1).clamp_min(1)[:, None] * std)
        for g0 in range(0, G, ctx.chunk):
            g1 = min(G, g0 + ctx.chunk)
            acts = _forward_layers(x[g0:g1].reshape(-1, C).to(ctx.dtype), layers)
            # centre first: h - mean is exactly 0 for a lone valid pixel, whose std is tiny
            centred = acts[-1].float().view(g1 - g0, S, dim) - mean[g0:g1, None, :]
            grad = centred.mul_(along_centred[g0:g1, None, :]).add_(along_mean[g0:g1, None, :])
            if ctx.padded:
                grad.mul_(weights[g0:g1, :, None])
            _backward_layers(acts, grad.view(-1, dim).to(ctx.dtype), layers, grads)
        return (None, None, None, None, None, None, *grads)


def _fold(block: nn.Module, stats: tuple[torch.Tensor, torch.Tensor] | None, rows, gate):
    """Fold a Linear block's batch norm into its linear layer; returns ``(W', b')``.

    ``stats`` are the float64 mean (D,) and biased covariance (D, D) of the block's input
    over the ``rows`` rows of the statistics (a number or a 0-dim tensor); given, the batch
    statistics are used and the running statistics updated (gated by ``gate``, see
    :func:`timematch.models.layers.update_running_stats`), as ``nn.BatchNorm1d`` does in
    train mode; None, the running statistics are used (eval mode).
    """
    weight, norm = block.linear.weight, block.norm
    if stats is not None:
        mean_in, cov_in = stats
        w64 = weight.double()
        mean = w64 @ mean_in
        var = ((w64 @ cov_in) * w64).sum(1).clamp_min(0)
        update_running_stats(norm, mean.detach(), var.detach(), rows, gate)
        mean, var = mean.to(weight.dtype), var.to(weight.dtype)
    else:
        mean, var = norm.running_mean, norm.running_var
    scale = norm.weight / torch.sqrt(var + norm.eps)
    return weight * scale[:, None], norm.bias - scale * mean


@torch.no_grad()
def _pixel_moments(rows: torch.Tensor, weights: torch.Tensor | None, total, chunk_rows: int):
    """Mean (C,) and biased covariance (C, C), float64, of the pixel ``rows`` of weight 1
    (``weights`` (R,) of 0 and 1; None: every row), ``total`` of them, in one pass.

    The rows are centred on a shift close to the mean (that of the first chunk) to keep the
    float32 Gram matrices accurate.
    """
    shift = rows[:chunk_rows].mean(0)
    total_sum = gram = 0.0  # accumulated out of place: under vmap the weights may be batched, the rows not
    for r0 in range(0, rows.shape[0], chunk_rows):
        centred = rows[r0 : r0 + chunk_rows] - shift
        weighted = centred if weights is None else centred * weights[r0 : r0 + chunk_rows, None]
        total_sum = total_sum + weighted.sum(0).double()
        gram = gram + (weighted.t() @ centred).double()
    offset = total_sum / total  # mean - shift
    return shift.double() + offset, gram / total - torch.outer(offset, offset)


def pooled_mlp(
    mlp: nn.Sequential, pixels: torch.Tensor, mask: torch.Tensor, padded: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked mean and std over pixels of ``mlp`` applied to every pixel.

    ``mlp`` is a sequence of Linear blocks (Linear without bias, BatchNorm1d, ReLU); each
    batch norm uses batch statistics over the valid pixels in train mode and running
    statistics in eval mode, exactly as the plain modules would. ``pixels`` (B, T, S, C),
    ``mask`` (B, S) bool; returns two (B, T, F) float32 tensors. ``padded=False`` says that
    every mask entry is True (the masking is then skipped; True is always correct). Every
    parcel needs at least one valid pixel (the packed cache guarantees it): one without
    gets a mean of 0, not an error, since checking would read the mask back to the host.
    """
    B, T, S, C = pixels.shape
    if pixels.numel() == 0:
        raise ValueError(f"empty pixel batch of shape {tuple(pixels.shape)} (B, T, S, C)")
    device_type = pixels.device.type
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else pixels.dtype
    with torch.autocast(device_type, enabled=False):
        pixels = pixels.float()
        mask_f = mask.to(pixels.dtype)
        if padded:  # padding may hold anything, NaN included: zero it
            pixels = torch.where(mask[:, None, :, None], pixels, 0.0)
        pixels = pixels.contiguous()
        weights = mask_f[:, None, :].expand(B, T, S).reshape(B * T, S)
        counts = mask_f.sum(1).clamp_min(1).repeat_interleave(T)
        rows = pixels.view(-1, C)
        chunk = chunk_groups(S, pixels.device)

        folded: list[torch.Tensor] = []
        if any(block.norm.training or not block.norm.track_running_stats for block in mlp):
            # which pixel rows enter the batch statistics, and how many
            sample = active_sample_weights()
            gate = None if sample is None else sample.gate
            if sample is None and not padded:
                row_weights, total = None, B * T * S
            else:
                in_stats = mask_f if sample is None else mask_f * sample.weight[:, None]
                row_weights = in_stats[:, None, :].expand(B, T, S).reshape(-1)
                total = in_stats.sum().double() * T
        for i, block in enumerate(mlp):
            stats = None
            if block.norm.training or not block.norm.track_running_stats:
                if i == 0:  # statistics of the pixels themselves: constants, no gradient
                    stats = _pixel_moments(rows, row_weights, total, chunk * S)
                else:
                    moment_sum, gram = _HiddenMoments.apply(rows, row_weights, chunk * S, dtype, *folded)
                    mean_in = moment_sum / total
                    stats = mean_in, gram / total - torch.outer(mean_in, mean_in)
                folded += _fold(block, stats, total, gate)
            else:
                folded += _fold(block, None, 0, None)

        mean, std = _PooledMLP.apply(pixels.view(B * T, S, C), weights, counts, padded, chunk, dtype, *folded)
    return mean.view(B, T, -1), std.view(B, T, -1)

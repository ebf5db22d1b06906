"""A frequency encoder over per-date embeddings at irregular dates (RAINCOAT's frequency branch,
He et al., ICML 2023, for series whose dates differ between samples).

RAINCOAT takes the FFT of regularly sampled series, keeps the lowest M modes, mixes the
channels of each mode with learned complex weights, and uses the amplitude and phase of the
result. Satellite series are not regular: a tile has its own calendar, clouds remove dates,
and a training view draws 30 of them per sample. An FFT over the date *index* would mix
frequencies whenever the gaps differ, and treat two samples with different dates as if they
shared them. So the coefficients are those of the continuous Fourier series over the year,
estimated from the samples' own dates by quadrature (a non-uniform discrete Fourier
transform):

    X_k = sum_t w_t h(p_t) exp(-2 pi i k p_t / P),   k = 0 .. M-1,  P = 365 days,

with ``w_t`` the trapezoid weights of each sample's sorted date positions ``p_t`` (half the gap
to each neighbour, normalised to sum 1), and ``h = W_in e`` the per-date embeddings projected to
a few channels. This needs no resampling and gives every sample its own transform; a
translation of the season by d days multiplies X_k by exp(-2 pi i k d / P): it leaves the
amplitudes alone and turns the phases, which is the information a time shift carries. The
phase enters as (cos, sin) of the angle, i.e. Y / |Y| (smooth, unlike the angle itself, whose
gradient is undefined at |Y| = 0 and which jumps at +-pi).

Per mode, a learned complex matrix mixes the channels (RAINCOAT's spectral convolution);
amplitude and phase of all modes are flattened and mapped linearly to the output. That last
map starts at zero, so a classifier that gains this branch starts with the outputs it had.
"""

from __future__ import annotations

import math

import torch
from torch import nn

#: The period of the Fourier series: one year of date positions (days).
PERIOD_DAYS = 365.0


def quadrature_weights(positions: torch.Tensor) -> torch.Tensor:
    """Trapezoid weights (B, T) of sorted date positions (B, T): half the gap to each neighbour,
    normalised to sum 1 per sample (equal weights when a sample has one date or equal dates)."""
    p = positions.double()
    if p.shape[1] == 1:
        return torch.ones_like(p)
    gaps = p[:, 1:] - p[:, :-1]  # (B, T-1)
    zero = torch.zeros_like(p[:, :1])
    weights = 0.5 * (torch.cat([zero, gaps], 1) + torch.cat([gaps, zero], 1))
    total = weights.sum(1, keepdim=True)
    uniform = torch.full_like(weights, 1.0 / p.shape[1])
    return torch.where(total > 0, weights / total.clamp_min(1e-12), uniform)


def fourier_coefficients(h: torch.Tensor, positions: torch.Tensor, modes: int,
                         period: float = PERIOD_DAYS) -> tuple[torch.Tensor, torch.Tensor]:
    """Real and imaginary parts (B, M, C) of the first ``modes`` Fourier coefficients of ``h``
    (B, T, C) sampled at ``positions`` (B, T) (see the module docstring)."""
    weights = quadrature_weights(positions).to(h.dtype)  # (B, T)
    k = torch.arange(modes, device=h.device, dtype=h.dtype)
    angle = (2.0 * math.pi / period) * positions.to(h.dtype)[:, :, None] * k  # (B, T, M)
    weighted = h * weights[:, :, None]  # (B, T, C)
    real = torch.einsum("btm,btc->bmc", torch.cos(angle), weighted)
    imag = -torch.einsum("btm,btc->bmc", torch.sin(angle), weighted)
    return real, imag


class FrequencyEncoder(nn.Module):
    """``forward(embeddings (B, T, in_dim), positions (B, T)) -> (B, out_dim)``: amplitude and
    phase of ``modes`` annual Fourier modes of ``channels`` projected channels, mixed per mode,
    mapped to ``out_dim`` by a zero-initialised linear layer."""

    def __init__(self, in_dim: int = 128, channels: int = 16, modes: int = 8, out_dim: int = 128,
                 period: float = PERIOD_DAYS) -> None:
        super().__init__()
        if modes < 1 or channels < 1:
            raise ValueError(f"the frequency encoder needs modes >= 1 and channels >= 1, got {modes}, {channels}")
        self.modes, self.channels, self.period = modes, channels, period
        self.project = nn.Linear(in_dim, channels)
        scale = 1.0 / channels
        self.mix_real = nn.Parameter(scale * torch.randn(modes, channels, channels))
        self.mix_imag = nn.Parameter(scale * torch.randn(modes, channels, channels))
        self.norm = nn.LayerNorm(3 * modes * channels)
        self.out = nn.Linear(3 * modes * channels, out_dim)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)
        self.out_dim = out_dim

    def spectrum(self, embeddings: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Amplitude and phase (cos, sin) of the mixed modes, flattened: (B, 3 * modes * channels)."""
        real, imag = fourier_coefficients(self.project(embeddings), positions, self.modes, self.period)
        # complex per-mode mixing: (a + ib)(c + id) = (ac - bd) + i(ad + bc)
        mixed_real = torch.einsum("bmc,mco->bmo", real, self.mix_real) - torch.einsum("bmc,mco->bmo", imag,
                                                                                      self.mix_imag)
        mixed_imag = torch.einsum("bmc,mco->bmo", real, self.mix_imag) + torch.einsum("bmc,mco->bmo", imag,
                                                                                      self.mix_real)
        amplitude = torch.sqrt(mixed_real.pow(2) + mixed_imag.pow(2) + 1e-8)
        phase = torch.cat([mixed_real / amplitude, mixed_imag / amplitude], -1)
        return self.norm(torch.cat([amplitude, phase], -1).flatten(1))

    def forward(self, embeddings: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.out(self.spectrum(embeddings, positions))

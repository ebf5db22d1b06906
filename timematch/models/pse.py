"""Pixel-Set Encoder (Sainte Fare Garnot et al., CVPR 2020), as used by TimeMatch.

For every date, each pixel goes through MLP1 (Linear blocks 10 -> 32 -> 64); the pixel
embeddings of a parcel are pooled by their masked mean and masked standard deviation
(``sqrt(sum_s (h_s - mean)^2 / (n - 1) + 1e-31)``), concatenated (128), optionally joined
by the parcel's 4 geometric features, and MLP2 (128 -> 128) gives the date embedding.
"""

from __future__ import annotations

import torch
from torch import nn

from timematch.models.layers import linear_blocks
from timematch.models.pixel_mlp import pooled_mlp


class PixelSetEncoder(nn.Module):
    """``forward(pixels (B, T, S, C), mask (B, S) bool, geom (B, G) | None) -> (B, T, out_dim)``.

    Padded pixels (``mask`` False) change neither the output nor the batch-norm
    statistics, in train and in eval mode, whatever they hold. Every parcel needs at
    least one valid pixel (the packed cache guarantees it; the encoder does not read the mask
    back to check); one with exactly one gets a standard deviation of ``sqrt(1e-31)`` (no
    NaN). ``padded=False`` promises that every mask entry is True (the masking is skipped).
    ``geom`` is ignored when the encoder was built without
    geometric features (``geom_dim=0``). MLP1 and the pooling run fused, in chunks (see
    :mod:`timematch.models.pixel_mlp`); the parameters are plain Linear blocks.
    """

    def __init__(
        self,
        mlp1: tuple[int, ...] = (10, 32, 64),
        mlp2: tuple[int, ...] = (128, 128),
        geom_dim: int = 0,
    ) -> None:
        super().__init__()
        if len(mlp1) < 2 or mlp2[0] != 2 * mlp1[-1]:
            raise ValueError(f"mlp2 must start at 2 * mlp1[-1] (mean and std), got mlp1={mlp1}, mlp2={mlp2}")
        self.input_dim = mlp1[0]
        self.geom_dim = geom_dim
        self.out_dim = mlp2[-1]
        self.mlp1 = linear_blocks(mlp1)
        # the geometric features join the pooled statistics at the input of MLP2
        self.mlp2 = linear_blocks((mlp2[0] + geom_dim, *mlp2[1:]))

    def forward(self, pixels: torch.Tensor, mask: torch.Tensor, geom: torch.Tensor | None = None,
                padded: bool = True) -> torch.Tensor:
        B, T, S, C = pixels.shape
        if C != self.input_dim:
            raise ValueError(
                f"pixels must be (B, T, S, C) with C = {self.input_dim} bands, got shape {tuple(pixels.shape)}"
            )
        if mask.shape != (B, S) or mask.dtype != torch.bool:
            raise ValueError(
                f"mask must be a bool tensor of shape (B, S) = {(B, S)}, got {mask.dtype} {tuple(mask.shape)}"
            )
        mean, std = pooled_mlp(self.mlp1, pixels, mask, padded)
        stats = torch.cat([mean, std], dim=-1).to(pixels.dtype)  # (B, T, 2F)
        if self.geom_dim:
            if geom is None:
                raise ValueError(f"the model was built with geometric features: pass geom (B, {self.geom_dim})")
            stats = torch.cat([stats, geom[:, None, :].expand(B, T, -1).to(stats.dtype)], dim=-1)
        return self.mlp2(stats)

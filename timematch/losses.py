"""Losses shared by the methods."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def focal_loss(logits: torch.Tensor, target: torch.Tensor, gamma: float = 1.0,
               weight: torch.Tensor | None = None) -> torch.Tensor:
    """Focal loss (Lin et al. 2017): -(1 - p_t)^gamma log p_t, averaged over the batch.

    ``logits`` (B, K), ``target`` (B,) class indices. gamma = 0 is cross entropy.
    ``weight`` (B,) of 0 and 1: the mean over the samples of weight 1 only (0 when there is
    none), with a fixed shape (what a captured training step needs instead of ``logits[keep]``).
    """
    log_p = F.log_softmax(logits.float(), dim=-1).gather(1, target[:, None]).squeeze(1)
    per_sample = -log_p if gamma == 0 else -(1.0 - log_p.exp()).pow(gamma) * log_p
    if weight is None:
        return per_sample.mean()
    weight = weight.to(per_sample.dtype)
    return (per_sample * weight).sum() / weight.sum().clamp_min(1.0)

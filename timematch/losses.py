"""Losses shared by the methods."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def focal_loss(logits: torch.Tensor, target: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """Focal loss (Lin et al. 2017), mean over the batch: -(1 - p_t)^gamma log p_t.

    ``logits`` (B, K), ``target`` (B,) class indices. gamma = 0 is cross entropy.
    """
    log_p = F.log_softmax(logits, dim=-1).gather(1, target[:, None]).squeeze(1)
    if gamma == 0:
        return -log_p.mean()
    return (-(1.0 - log_p.exp()).pow(gamma) * log_p).mean()

"""Parts FixMatch and TimeMatch share: the EMA teacher, confident pseudo labels, and the
domain-specific forward pass."""

from __future__ import annotations

import copy

import numpy as np
import torch

from timematch.losses import focal_loss


def make_teacher(student: torch.nn.Module) -> torch.nn.Module:
    """A frozen copy of the student, updated only by :func:`ema_update`."""
    teacher = copy.deepcopy(student)
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


@torch.no_grad()
def ema_update(teacher: torch.nn.Module, student: torch.nn.Module, decay: float) -> None:
    """teacher <- decay * teacher + (1 - decay) * student, over every parameter and buffer.

    Integer buffers (BatchNorm's batch counter) are copied. ``decay=0`` makes the teacher
    the student (the "no EMA" ablation).
    """
    t_state = teacher.state_dict()
    for name, value in student.state_dict().items():
        target = t_state[name]
        if target.dtype.is_floating_point:
            target.mul_(decay).add_(value.detach(), alpha=1.0 - decay)
        else:
            target.copy_(value)


@torch.no_grad()
def pseudo_labels(
    teacher: torch.nn.Module, weak: dict[str, torch.Tensor], shift: int, threshold: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's argmax on the weak view at positions + ``shift``, and the mask of the
    samples whose top probability exceeds ``threshold``."""
    teacher.eval()
    logits, _ = teacher(weak["pixels"], weak["mask"], weak["positions"] + shift, weak["geom"])
    confidence, labels = logits.float().softmax(-1).max(-1)
    return labels, confidence > threshold


def select(batch: dict[str, torch.Tensor], keep: torch.Tensor) -> dict[str, torch.Tensor]:
    return {key: value[keep] for key, value in batch.items()}


def concat(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Two batches as one; pixels are padded to the larger pixel count (masked)."""
    out = {}
    for key in a:
        x, y = a[key], b[key]
        if key in ("pixels", "mask") and x.shape[2 if key == "pixels" else 1] != y.shape[2 if key == "pixels" else 1]:
            raise ValueError("batches to concatenate must have the same pixel count")
        out[key] = torch.cat([x, y])
    return out


def supervised_and_pseudo_loss(
    student: torch.nn.Module,
    source: dict[str, torch.Tensor],
    target: dict[str, torch.Tensor],
    pseudo: torch.Tensor,
    trade_off: float,
    gamma: float,
    domain_specific_bn: bool,
) -> tuple[torch.Tensor, dict[str, float]]:
    """focal(source) + trade_off * focal(confident target, pseudo labels).

    With domain-specific batch norm the source and target parts are forwarded separately
    so each gets its own batch statistics; the target part is skipped with fewer than 2
    confident samples (BatchNorm needs 2). Without it, one concatenated forward pass.
    ``target`` holds only the confident samples, ``pseudo`` their labels.
    """
    student.train()
    n_target = int(target["pixels"].shape[0])
    if domain_specific_bn or n_target < 2:
        logits_s, _ = student(source["pixels"], source["mask"], source["positions"], source["geom"])
        source_loss = focal_loss(logits_s, source["label"], gamma)
        if n_target >= 2:
            logits_t, _ = student(target["pixels"], target["mask"], target["positions"], target["geom"])
            target_loss = focal_loss(logits_t, pseudo, gamma)
        else:
            target_loss = torch.zeros((), device=source_loss.device)
    else:
        both = concat(source, target)
        logits, _ = student(both["pixels"], both["mask"], both["positions"], both["geom"])
        n_source = source["pixels"].shape[0]
        source_loss = focal_loss(logits[:n_source], source["label"], gamma)
        target_loss = focal_loss(logits[n_source:], pseudo, gamma)
    loss = source_loss + trade_off * target_loss
    return loss, {"source_loss": float(source_loss.detach()), "target_loss": float(target_loss.detach())}


def histogram(labels: np.ndarray, n_classes: int) -> np.ndarray:
    return np.bincount(labels, minlength=n_classes).astype(np.float64)

"""Parts FixMatch and TimeMatch share: the EMA teacher, confident pseudo labels, the
domain-specific forward pass, and the per-epoch pseudo-label statistics kept on the device."""

from __future__ import annotations

import copy

import numpy as np
import torch

from timematch.data.views import Batch, model_outputs
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
    the student (the "no EMA" ablation). One fused update over all floating tensors.
    """
    t_state = teacher.state_dict()
    targets, sources = [], []
    for name, value in student.state_dict().items():
        target = t_state[name]
        if target.dtype.is_floating_point:
            targets.append(target)
            sources.append(value.detach())
        else:
            target.copy_(value)
    # a member of an array of trials (timematch.arrays, under torch.func.vmap; its own decay, maybe a
    # tensor) updates tensor by tensor: vmap has no rule for the fused update
    if isinstance(decay, torch.Tensor) or torch._C._functorch.is_functorch_wrapped_tensor(targets[0]):
        weight = 1.0 - decay
        for target, source in zip(targets, sources):  # lerp's formula; vmap has no batching rule for lerp_
            target.add_((source - target) * (weight.to(target.dtype) if isinstance(weight, torch.Tensor) else weight))
    else:
        torch._foreach_lerp_(targets, sources, 1.0 - decay)


@torch.no_grad()
def pseudo_labels(teacher: torch.nn.Module, weak: Batch, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's argmax on the weak view, and the mask of the samples whose top
    probability exceeds ``threshold``."""
    teacher.eval()
    logits, _ = model_outputs(teacher, weak)
    confidence, labels = logits.float().softmax(-1).max(-1)
    return labels, confidence > threshold


def supervised_and_pseudo_loss(
    student: torch.nn.Module,
    source: Batch,
    target: Batch,
    pseudo: torch.Tensor,
    confident: torch.Tensor,
    trade_off: float,
    gamma: float,
    domain_specific_bn: bool,
    static_shapes: bool = True,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """focal(source) + trade_off * focal(confident target, pseudo labels).

    ``target`` is the whole strong target view, ``confident`` (B,) bool marks the samples
    that train, ``pseudo`` (B,) their labels. As published, the target part counts only
    with at least 2 confident samples (BatchNorm needs 2). With domain-specific batch norm
    the source and the target are forwarded separately, the target's batch statistics over
    its confident samples only; without it, one concatenated pass whose statistics cover the
    source and the confident target samples.

    ``static_shapes``: the whole target batch is forwarded with the others weighted out of
    the loss and of the batch statistics (see :mod:`timematch.models.layers`), so nothing
    depends on the count and the step can be captured as a CUDA graph; otherwise (a CPU)
    the confident samples are selected and the target pass is skipped below 2, which saves
    its work. The two give the same loss, gradients and statistics (up to dropout draws).
    """
    student.train()
    if not static_shapes:
        return _selected_loss(student, source, target, pseudo, confident, trade_off, gamma, domain_specific_bn)
    weight = confident.float()
    weight = weight * (weight.sum() >= 2)
    if domain_specific_bn:
        logits_s, _ = model_outputs(student, source)
        logits_t, _ = model_outputs(student, target, sample_weight=weight)
    else:
        both = Batch.concat(source, target)
        logits, _ = model_outputs(student, both, sample_weight=torch.cat([torch.ones_like(weight), weight]))
        logits_s, logits_t = logits[: len(source)], logits[len(source):]
    source_loss = focal_loss(logits_s, source.label, gamma)
    target_loss = focal_loss(logits_t, pseudo, gamma, weight)
    loss = source_loss + trade_off * target_loss
    return loss, {"source_loss": source_loss.detach(), "target_loss": target_loss.detach()}


def _selected_loss(student, source, target, pseudo, confident, trade_off, gamma, domain_specific_bn):
    """:func:`supervised_and_pseudo_loss` with the confident samples selected (reads the count)."""
    keep = confident.nonzero().squeeze(1)
    selected = Batch(**{k: v[keep] for k, v in target.tensors().items()}, padded=target.padded)
    pseudo = pseudo[keep]
    if domain_specific_bn or len(keep) < 2:
        logits_s, _ = model_outputs(student, source)
        source_loss = focal_loss(logits_s, source.label, gamma)
        if len(keep) >= 2:
            logits_t, _ = model_outputs(student, selected)
            target_loss = focal_loss(logits_t, pseudo, gamma)
        else:
            target_loss = torch.zeros((), device=source_loss.device)
    else:
        logits, _ = model_outputs(student, Batch.concat(source, selected))
        source_loss = focal_loss(logits[: len(source)], source.label, gamma)
        target_loss = focal_loss(logits[len(source):], pseudo, gamma)
    loss = source_loss + trade_off * target_loss
    return loss, {"source_loss": source_loss.detach(), "target_loss": target_loss.detach()}


class PseudoLabelStats:
    """An epoch's pseudo labels, counted on the device: the histogram of the teacher's argmax
    over every target sample (TimeMatch's class-distribution estimate), and the confusion of
    the confident ones with their withheld true labels (analysis only: target labels never
    enter training)."""

    def __init__(self, n_classes: int, device: torch.device) -> None:
        self.n_classes = n_classes
        self.histogram = torch.zeros(n_classes, dtype=torch.float32, device=device)
        self.confusion = torch.zeros(n_classes * n_classes, dtype=torch.float32, device=device)  # true x pseudo
        self.confident = torch.zeros((), dtype=torch.float32, device=device)

    def add(self, labels: torch.Tensor, confident: torch.Tensor, true: torch.Tensor) -> None:
        self.histogram.index_add_(0, labels, torch.ones_like(labels, dtype=torch.float32))
        counted = (confident & (true >= 0)).float()
        self.confusion.index_add_(0, true.clamp_min(0) * self.n_classes + labels, counted)
        self.confident.add_(confident.float().sum())

    def read(self) -> tuple[np.ndarray, np.ndarray, int]:
        """(histogram (K,), confusion (K, K) rows true, confident count), then reset in place."""
        packed = torch.cat([self.histogram, self.confusion, self.confident[None]]).cpu().numpy().astype(np.float64)
        for tensor in (self.histogram, self.confusion, self.confident):
            tensor.zero_()
        k = self.n_classes
        return packed[:k], packed[k : k + k * k].reshape(k, k), int(packed[-1])


def macro_f1(confusion: np.ndarray) -> float:
    """Macro F1 of a confusion matrix (rows true, columns predicted) over the classes present
    in either (as scikit-learn's ``f1_score(average="macro", zero_division=0)``); NaN if empty."""
    true, predicted = confusion.sum(1), confusion.sum(0)
    present = (true + predicted) > 0
    if not present.any():
        return float("nan")
    f1 = 2.0 * np.diag(confusion) / np.maximum(true + predicted, 1e-12)
    return float(f1[present].mean())


def histogram(labels: np.ndarray, n_classes: int) -> np.ndarray:
    return np.bincount(labels, minlength=n_classes).astype(np.float64)

"""What the feature-alignment and adversarial competitors share (MMD, DANN, CDAN, CDAN+E,
JUMBOT, ALDA), written once: their config and optimiser set-up, the joint forward pass, and
the parts (gradient reversal with warm start, the domain discriminator, Gaussian kernels
and the linear-time multi-kernel MMD, entropy, the (randomized) multilinear map).

Every competitor starts from the source-trained weights and sees, each step, a
(class-balanced) source batch and a target batch, both strong views, concatenated into
**one** forward pass (so a competitor step costs about what a TimeMatch step costs).
``features`` are the temporal encoder's 128-d output. The published optimiser set-up
(Long et al.; Ganin et al.; as in the Transfer-Learning-Library): SGD with Nesterov
momentum 0.9, lr 1e-3 with the inverse decay lr * (1 + 0.001 i)^-0.75, the backbone at
0.1x the head's rate, weight decay 1e-4.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from timematch.data.views import Batch, Views, model_outputs
from timematch.losses import focal_loss
from timematch.methods.base import Method, TrainConfig, check_range
from timematch.training import StepContext


@dataclass(frozen=True)
class AlignmentConfig(TrainConfig):
    """Budget of TimeMatch (20 x 500 steps), the adversarial methods' optimiser, cross
    entropy on the source (``focal_gamma=0``), and the alignment term's ``trade_off``."""

    epochs: int = 20
    steps_per_epoch: int | None = 500
    lr: float = 1e-3
    optimizer: str = "sgd"
    schedule: str = "inverse_decay"
    backbone_lr_scale: float = 0.1
    focal_gamma: float = 0.0
    trade_off: float = 1.0
    balanced_source: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range(self, "trade_off", 0.0, 100.0)


@dataclass(frozen=True)
class AdversarialConfig(AlignmentConfig):
    """Gradient reversal with warm start: coefficient 2 (hi - lo) / (1 + exp(-alpha i /
    max_iters)) - (hi - lo) + lo at global step i, from ``grl_lo`` to ``grl_hi``; the
    discriminator's hidden width."""

    grl_alpha: float = 1.0
    grl_lo: float = 0.0
    grl_hi: float = 1.0
    grl_max_iters: int = 1000
    discriminator_hidden: int = 1024

    step_counts: ClassVar[tuple[str, ...]] = ("grl_max_iters",)
    array_varying: ClassVar[tuple[str, ...]] = ("grl_max_iters",)  # a tensor in the reversal's schedule

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range(self, "grl_alpha", 0.0, 100.0)
        check_range(self, "grl_lo", 0.0, 10.0)
        check_range(self, "grl_hi", 0.0, 10.0)
        check_range(self, "grl_max_iters", 1, 10_000_000)
        check_range(self, "discriminator_hidden", 1, 65_536)


# -- parts ------------------------------------------------------------------------------


class _GradientReversal(torch.autograd.Function):
    generate_vmap_rule = True  # an array of trials runs it under torch.func.vmap (timematch.arrays)

    @staticmethod
    def forward(x: torch.Tensor, coefficient: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.save_for_backward(inputs[1])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (coefficient,) = ctx.saved_tensors
        return -coefficient.to(grad.dtype) * grad, None


def reverse_gradient(x: torch.Tensor, coefficient: torch.Tensor | float) -> torch.Tensor:
    """Identity forward; the backward pass multiplies the gradient by ``-coefficient`` (a
    number or a 0-dim tensor, which a captured step reads at each replay)."""
    return _GradientReversal.apply(x, torch.as_tensor(coefficient, dtype=torch.float32, device=x.device))


def warm_start_coefficient(step, alpha: float = 1.0, lo: float = 0.0, hi: float = 1.0, max_iters: int = 1000):
    """2 (hi - lo) / (1 + exp(-alpha step / max_iters)) - (hi - lo) + lo: ``lo`` at step 0,
    rising to ``hi`` (DANN's schedule, Ganin et al. 2016). ``step``: an int (returns a float)
    or a tensor (returns a float32 tensor)."""
    if isinstance(step, torch.Tensor):
        return (2.0 * (hi - lo) / (1.0 + torch.exp(-alpha * step.double() / max_iters)) - (hi - lo) + lo).float()
    return float(2.0 * (hi - lo) / (1.0 + math.exp(-alpha * step / max_iters)) - (hi - lo) + lo)


class DomainDiscriminator(nn.Sequential):
    """in -> hidden -> hidden -> out (Linear, BatchNorm, ReLU; then Linear): logits.

    ``out=1``: the source-vs-target logit (the sigmoid sits in the loss, for stability);
    ALDA uses ``out`` = number of classes.
    """

    def __init__(self, in_features: int, hidden: int = 1024, out_features: int = 1) -> None:
        super().__init__(
            nn.Linear(in_features, hidden), nn.BatchNorm1d(hidden), nn.ReLU(),
            nn.Linear(hidden, hidden), nn.BatchNorm1d(hidden), nn.ReLU(),
            nn.Linear(hidden, out_features),
        )


def domain_adversarial_loss(logits: torch.Tensor, n_source: int) -> tuple[torch.Tensor, torch.Tensor]:
    """0.5 (BCE(d_s, 1) + BCE(d_t, 0)) over discriminator ``logits`` (N, 1) with the source
    first, and the discriminator's accuracy (0.5: the domains are indistinguishable)."""
    logits = logits.reshape(-1)
    labels = (torch.arange(logits.shape[0], device=logits.device) < n_source).to(logits.dtype)
    per_sample = F.binary_cross_entropy_with_logits(logits, labels, reduction="none")
    loss = 0.5 * (per_sample[:n_source].mean() + per_sample[n_source:].mean())
    return loss, discriminator_accuracy(logits, n_source)


def discriminator_accuracy(logits: torch.Tensor, n_source: int) -> torch.Tensor:
    """Mean of the source (logit > 0) and target (logit <= 0) accuracies of domain ``logits``."""
    logits = logits.detach().reshape(-1)
    return 0.5 * ((logits[:n_source] > 0).float().mean() + (logits[n_source:] <= 0).float().mean())


def entropy(probs: torch.Tensor) -> torch.Tensor:
    """Per-sample entropy -sum_k p_k log p_k of probabilities ``probs`` (N, K) -> (N,)."""
    return -(probs * probs.clamp_min(1e-12).log()).sum(-1)


#: Bandwidth multipliers of DAN's Gaussian kernels: 2^k, k = -3..1.
MMD_MULTIPLIERS = tuple(2.0 ** k for k in range(-3, 2))


def linear_mk_mmd(source: torch.Tensor, target: torch.Tensor,
                  multipliers: tuple[float, ...] = MMD_MULTIPLIERS) -> torch.Tensor:
    """Linear-time estimate of the multi-kernel MMD^2 (Gretton et al. 2012; DAN, Long et al. 2015).

    With x_i = (s_i, t_i) and its successor x_{i+1} (cyclically), the unbiased estimate
    mean_i [k(s_i, s_{i+1}) + k(t_i, t_{i+1}) - k(s_i, t_{i+1}) - k(s_{i+1}, t_i)], O(B),
    for the kernel k = sum over ``multipliers`` m of exp(-||a - b||^2 / (2 m sigma^2)),
    sigma^2 the mean squared distance of the pairs used (not differentiated).
    ``source``, ``target``: (B, F) with the same B >= 2.
    """
    if source.shape != target.shape or source.shape[0] < 2:
        raise ValueError(f"linear MMD needs two batches of one shape with B >= 2, got {tuple(source.shape)} "
                         f"and {tuple(target.shape)}")
    s_next, t_next = source.roll(-1, 0), target.roll(-1, 0)
    distances = torch.stack([
        (source - s_next).pow(2).sum(1), (target - t_next).pow(2).sum(1),
        (source - t_next).pow(2).sum(1), (s_next - target).pow(2).sum(1),
    ])  # (4, B)
    sigma2 = distances.detach().mean().clamp_min(1e-12)
    kernel = sum(torch.exp(-distances / (2.0 * m * sigma2)) for m in multipliers)
    return (kernel[0] + kernel[1] - kernel[2] - kernel[3]).mean()


class MultilinearMap(nn.Module):
    """f (N, F), g (N, K) -> the flattened outer product (N, F * K) (CDAN, Long et al. 2018)."""

    def __init__(self, features: int, classes: int) -> None:
        super().__init__()
        self.out_features = features * classes

    def forward(self, f: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        return torch.bmm(g.unsqueeze(2), f.unsqueeze(1)).flatten(1)


class RandomizedMultilinearMap(nn.Module):
    """f (N, F), g (N, K) -> (f R_f) * (g R_g) / sqrt(d), (N, d), with fixed Gaussian R_f
    (F, d) and R_g (K, d) (CDAN's randomized map; the matrices are buffers, so they are
    checkpointed and restored with the method)."""

    def __init__(self, features: int, classes: int, out_features: int = 1024) -> None:
        super().__init__()
        self.out_features = out_features
        self.register_buffer("Rf", torch.randn(features, out_features))
        self.register_buffer("Rg", torch.randn(classes, out_features))

    def forward(self, f: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        return (f @ self.Rf) * (g @ self.Rg) / math.sqrt(self.out_features)


def conditional_map(features: int, classes: int, randomize_above: int = 4096,
                    randomized_dim: int = 1024) -> nn.Module:
    """The multilinear map, randomized to ``randomized_dim`` when ``features * classes`` exceeds
    ``randomize_above`` (CDAN's rule)."""
    if features * classes > randomize_above:
        return RandomizedMultilinearMap(features, classes, randomized_dim)
    return MultilinearMap(features, classes)


# -- the shared method ------------------------------------------------------------------


def paired_batches(views: "Views", size: int, balanced_source: bool, shared_dates: bool = False) -> dict[str, Batch]:
    """A step's two batches of strong views: ``size`` labelled source parcels (class-balanced when
    ``balanced_source``) and ``size`` target training parcels; ``shared_dates``: one draw of dates
    per batch (a time axis per batch, for DTW)."""
    source, target = views.source, views.target
    return {
        "source": source.strong(source.draw_labelled(size, balanced_source), shared_dates=shared_dates),
        "target": target.strong(target.draw_train(size), shared_dates=shared_dates),
    }


def log_value(value: float, like: torch.Tensor) -> torch.Tensor:
    """A number as a float32 log tensor on ``like``'s device (logs of a step are tensors)."""
    return torch.tensor(float(value), dtype=torch.float32, device=like.device)


@dataclass
class AlignmentTerms:
    """What a competitor adds to the source loss: ``trade_off * transfer``, plus ``own_loss``
    (a term that trains only the method's own modules, e.g. ALDA's discriminator
    regulariser) with weight 1; ``logs`` are the step's logs."""

    transfer: torch.Tensor
    logs: dict[str, torch.Tensor]
    own_loss: torch.Tensor | None = None


class AlignmentMethod(Method):
    """A source batch and a target batch (strong views), one forward pass of both; the
    subclass adds its alignment term to the source classification loss in
    :meth:`alignment_loss`."""

    config: AlignmentConfig

    def sample(self) -> dict[str, Batch]:
        return paired_batches(self.views, self.config.batch_size, self.config.balanced_source)

    def training_step(self, batch: dict[str, Batch], context: StepContext) -> tuple[torch.Tensor, dict]:
        source = batch["source"]
        logits, features = model_outputs(self.model, Batch.concat(source, batch["target"]))
        n = len(source)
        classification = focal_loss(logits[:n], source.label, self.config.focal_gamma)
        terms = self.alignment_loss(logits, features, n, source.label, context)
        loss = classification + self.config.trade_off * terms.transfer
        if terms.own_loss is not None:
            loss = loss + terms.own_loss
        logs = dict(terms.logs, source_loss=classification.detach(), transfer_loss=terms.transfer.detach())
        return loss, logs

    def alignment_loss(self, logits: torch.Tensor, features: torch.Tensor, n_source: int,
                       source_labels: torch.Tensor, context: StepContext) -> "AlignmentTerms":
        """The alignment term over ``logits`` (N, K) and ``features`` (N, F), source rows first."""
        raise NotImplementedError


class AdversarialMethod(AlignmentMethod):
    """An alignment method with a gradient-reversal warm start (DANN, CDAN, ALDA)."""

    config: AdversarialConfig

    def reversal_coefficient(self, context: StepContext) -> torch.Tensor:
        """The gradient-reversal coefficient at this step (a device tensor)."""
        cfg = self.config
        return warm_start_coefficient(context.global_step, cfg.grl_alpha, cfg.grl_lo, cfg.grl_hi, cfg.grl_max_iters)

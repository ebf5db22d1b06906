"""ALDA (Chen, Xue, Cai, Xiao, Zhou, Zhao, He; "Adversarial-Learned Loss for Domain
Adaptation", AAAI 2020), as a competitor in the TimeMatch paper.

A discriminator D (128 -> 1024 -> 1024 -> K, through gradient reversal with warm start)
predicts xi = sigmoid(D(phi(x))), the chance that each class's prediction is right; it
defines the noise-correcting matrix eta_kl = xi_l if k = l else (1 - xi_l) / (K - 1),
and the corrected label of a sample predicted y^ is c = eta[:, y^]. Target samples count
only where the classifier's confidence exceeds ``pseudo_threshold`` (0.7):

    L_adv = BCE(c_s, onehot(y_s)) + BCE(c_t, (1 - onehot(y^_t)) / (K - 1))   (D vs features)
    L_reg = CE(D(phi(x_s)), y_s)                                             (D only)
    L_cor = -mean(p_t * c_t)                                                 (classifier)
    L = CE(f(x_s), y_s) + trade_off * (L_adv + L_cor) + L_reg

Logs ``pseudo_label_acceptance`` (the fraction of target samples above the threshold),
``adversarial_loss``, ``corrected_loss``, ``discriminator_reg_loss``, ``grl_coefficient``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from timematch.methods.alignment import (
    AdversarialConfig, AdversarialMethod, AlignmentTerms, DomainDiscriminator, reverse_gradient,
)
from timematch.methods.base import check_range
from timematch.methods.registry import register


@dataclass(frozen=True)
class ALDAConfig(AdversarialConfig):
    pseudo_threshold: float = 0.7

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range(self, "pseudo_threshold", 0.0, 1.0)


def _one_hot(labels: torch.Tensor, classes: int) -> torch.Tensor:
    """float one-hot rows (``F.one_hot`` checks its labels' range with a read-back, which an
    array of trials, under ``torch.func.vmap``, cannot do)."""
    return (labels[:, None] == torch.arange(classes, device=labels.device)).float()


def alda_losses(discriminator_logits: torch.Tensor, probs: torch.Tensor, source_labels: torch.Tensor,
                threshold: float) -> dict[str, torch.Tensor]:
    """ALDA's adversarial and corrected losses for ``discriminator_logits`` (N, K) and the
    classifier's ``probs`` (N, K), source rows (``len(source_labels)``) first.

    The rows that count (every source row, the accepted target rows) are weighted, not
    selected, so the shapes never depend on how many are accepted.
    """
    n, classes = source_labels.shape[0], probs.shape[1]
    xi = torch.sigmoid(discriminator_logits.float())
    confidence, predicted = probs.detach().max(1)
    accepted = (confidence[n:] > threshold).float()
    predicted_mask = _one_hot(predicted, classes)
    predicted_mask = torch.cat([predicted_mask[:n], predicted_mask[n:] * accepted[:, None]])
    eye = torch.eye(classes, device=probs.device)
    off = (1.0 - eye) / (classes - 1)
    eta = off + (eye - off) * xi[:, None, :]  # (N, K, K): eta[b, k, l]
    corrected = (eta * predicted_mask[:, None, :]).sum(2).clamp(0.0, 1.0)  # (N, K)
    wanted = torch.cat([_one_hot(source_labels, classes), (1.0 - predicted_mask[n:]) / (classes - 1)])
    rows = torch.cat([torch.ones(n, device=probs.device), accepted])
    with torch.autocast(probs.device.type, enabled=False):  # autocast refuses binary_cross_entropy
        per_row = F.binary_cross_entropy(corrected.float(), wanted, reduction="none").sum(1)
    adversarial = (per_row * rows).sum() / rows.sum()
    target_corrected = (eta.detach()[n:] * predicted_mask[n:, None, :]).sum(2)
    # mean over the accepted rows' K entries; 0 (with a zero gradient) when none is accepted
    corrected_loss = -((probs[n:] * target_corrected).sum(1) * accepted).sum() / (accepted.sum() * classes).clamp_min(1.0)
    return {"adversarial": adversarial, "corrected": corrected_loss, "accepted": accepted.mean()}


@register("alda")
class ALDA(AdversarialMethod):
    config_class = ALDAConfig
    config: ALDAConfig
    table_order = 70.0
    short_name = "ALDA"

    def __init__(self, config, model, source, target, device) -> None:
        super().__init__(config, model, source, target, device)
        self.discriminator = self.own(
            "discriminator", DomainDiscriminator(model.feature_dim, config.discriminator_hidden, len(source.classes)))

    def alignment_loss(self, logits, features, n_source, source_labels, context):
        coefficient = self.reversal_coefficient(context)
        probs = logits.float().softmax(-1)
        losses = alda_losses(self.discriminator(reverse_gradient(features, coefficient)), probs, source_labels,
                             self.config.pseudo_threshold)
        # the regulariser trains the discriminator only (features detached)
        regulariser = F.cross_entropy(self.discriminator(features[:n_source].detach()), source_labels)
        return AlignmentTerms(losses["adversarial"] + losses["corrected"], {
            "pseudo_label_acceptance": losses["accepted"], "adversarial_loss": losses["adversarial"].detach(),
            "corrected_loss": losses["corrected"].detach(), "discriminator_reg_loss": regulariser.detach(),
            "grl_coefficient": coefficient,
        }, own_loss=regulariser)

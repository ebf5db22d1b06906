"""CDAN (Long, Cao, Wang, Jordan; "Conditional Adversarial Domain Adaptation", NeurIPS
2018), as a competitor in the TimeMatch paper.

The domain discriminator sees the multilinear map of the features and the (detached)
softmax predictions, T(phi, g) = phi (x) g, randomized to 1024 dimensions when
features x classes > 4096, through gradient reversal with DANN's warm start:

    L = CE(f(x_s), y_s) + trade_off * sum_i w_i BCE(D(R(T(phi_i, g_i))), d_i) / N

with w_i = 1 for CDAN; CDAN+E (:mod:`timematch.methods.cdan_e`) weights samples by
1 + exp(-H(g_i)), normalised to mean 1, so confident predictions count more.
Logs ``discriminator_accuracy``, ``transfer_loss`` and ``grl_coefficient``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from timematch.methods.alignment import (
    AdversarialConfig, AdversarialMethod, AlignmentTerms, DomainDiscriminator, conditional_map, discriminator_accuracy,
    entropy, reverse_gradient,
)
from timematch.methods.base import check_range
from timematch.methods.registry import register


@dataclass(frozen=True)
class CDANConfig(AdversarialConfig):
    entropy_conditioning: bool = False
    randomize_above: int = 4096
    randomized_dim: int = 1024

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range(self, "randomize_above", 1, 10_000_000)
        check_range(self, "randomized_dim", 1, 65_536)


@register("cdan")
class CDAN(AdversarialMethod):
    config_class = CDANConfig
    config: CDANConfig
    table_order = 40.0
    short_name = "CDAN"

    def __init__(self, config, model, source, target, device) -> None:
        super().__init__(config, model, source, target, device)
        classes = len(source.classes)
        # the map holds no trainable parameters (the randomized one: fixed random matrices)
        self.map = self.own("multilinear_map",
                            conditional_map(model.feature_dim, classes, config.randomize_above, config.randomized_dim),
                            trainable=False)
        self.discriminator = self.own("discriminator",
                                      DomainDiscriminator(self.map.out_features, config.discriminator_hidden))

    def alignment_loss(self, logits, features, n_source, source_labels, context):
        coefficient = self.reversal_coefficient(context)
        probs = logits.float().softmax(-1).detach()
        joint = self.map(features, probs)
        domain_logits = self.discriminator(reverse_gradient(joint, coefficient)).reshape(-1)
        labels = (torch.arange(domain_logits.shape[0], device=domain_logits.device) < n_source).to(domain_logits.dtype)
        if self.config.entropy_conditioning:
            weight = 1.0 + torch.exp(-entropy(probs))
            weight = weight / weight.sum() * weight.shape[0]
        else:
            weight = None
        loss = F.binary_cross_entropy_with_logits(domain_logits, labels, weight=weight)
        accuracy = discriminator_accuracy(domain_logits, n_source)
        return AlignmentTerms(loss, {"discriminator_accuracy": accuracy, "grl_coefficient": coefficient})

"""DANN (Ganin, Ustinova, Ajakan, Germain, Larochelle, Laviolette, Marchand, Lempitsky;
"Domain-Adversarial Training of Neural Networks", JMLR 2016), as a competitor in the
TimeMatch paper.

A domain discriminator D (128 -> 1024 -> 1024 -> 1) tells source from target features
through a gradient-reversal layer whose coefficient lambda_i warms up from 0 to 1:

    L = CE(f(x_s), y_s) + trade_off * 0.5 [BCE(D(R(phi(x_s))), 1) + BCE(D(R(phi(x_t))), 0)]

Logs ``discriminator_accuracy`` (near 0.5 when the features align; near 1 when D wins),
``transfer_loss`` and ``grl_coefficient``.
"""

from __future__ import annotations

from dataclasses import dataclass

from timematch.methods.alignment import (
    AdversarialConfig, AdversarialMethod, AlignmentTerms, DomainDiscriminator, domain_adversarial_loss, reverse_gradient,
)
from timematch.methods.registry import register


@dataclass(frozen=True)
class DANNConfig(AdversarialConfig):
    pass


@register("dann")
class DANN(AdversarialMethod):
    config_class = DANNConfig
    config: DANNConfig
    table_order = 30.0
    short_name = "DANN"

    def __init__(self, config, model, source, target, device) -> None:
        super().__init__(config, model, source, target, device)
        self.discriminator = self.own("discriminator", DomainDiscriminator(model.feature_dim, config.discriminator_hidden))

    def alignment_loss(self, logits, features, n_source, source_labels, context):
        coefficient = self.reversal_coefficient(context)
        domain_logits = self.discriminator(reverse_gradient(features, coefficient))
        loss, accuracy = domain_adversarial_loss(domain_logits, n_source)
        return AlignmentTerms(loss, {"discriminator_accuracy": accuracy, "grl_coefficient": coefficient})

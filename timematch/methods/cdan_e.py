"""CDAN+E (Long et al., NeurIPS 2018): CDAN with entropy conditioning, each sample's
discriminator loss weighted by 1 + exp(-H(g)) (see :mod:`timematch.methods.cdan`)."""

from __future__ import annotations

from dataclasses import dataclass

from timematch.methods.cdan import CDAN, CDANConfig
from timematch.methods.registry import register


@dataclass(frozen=True)
class CDANEConfig(CDANConfig):
    entropy_conditioning: bool = True


@register("cdan_e")
class CDANE(CDAN):
    config_class = CDANEConfig
    config: CDANEConfig
    table_order = 45.0
    short_name = "CDAN+E"

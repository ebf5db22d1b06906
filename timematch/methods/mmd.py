"""MMD / DAN (Long, Cao, Wang, Jordan; "Learning Transferable Features with Deep Adaptation
Networks", ICML 2015), as a competitor in the TimeMatch paper.

Cross entropy on the source plus the multi-kernel MMD between source and target features,
Gaussian kernels with bandwidth multipliers 2^k, k = -3..1, linear-time estimate:

    L = CE(f(x_s), y_s) + trade_off * MMD_l^2(phi(x_s), phi(x_t))

Logs ``mmd`` (the estimate per step, averaged per epoch): it should fall as the features align.
"""

from __future__ import annotations

from dataclasses import dataclass

from timematch.methods.alignment import AlignmentConfig, AlignmentMethod, AlignmentTerms, linear_mk_mmd
from timematch.methods.base import check_range
from timematch.methods.registry import register


@dataclass(frozen=True)
class MMDConfig(AlignmentConfig):
    kernel_min_exponent: int = -3
    kernel_max_exponent: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range(self, "kernel_min_exponent", -20, 20)
        check_range(self, "kernel_max_exponent", self.kernel_min_exponent, 20)


@register("mmd")
class MMD(AlignmentMethod):
    config_class = MMDConfig
    config: MMDConfig
    table_order = 20.0
    short_name = "MMD"

    def alignment_loss(self, logits, features, n_source, source_labels, context):
        cfg = self.config
        multipliers = tuple(2.0 ** k for k in range(cfg.kernel_min_exponent, cfg.kernel_max_exponent + 1))
        mmd = linear_mk_mmd(features[:n_source], features[n_source:], multipliers)
        return AlignmentTerms(mmd, {"mmd": mmd.detach()})

"""JUMBOT (Fatras, Séjourné, Flamary, Courty; "Unbalanced minibatch Optimal Transport;
applications to Domain Adaptation", ICML 2021), as a competitor in the TimeMatch paper.

Each step, the unbalanced optimal transport plan pi between the source and the target
minibatch (uniform weights) is solved with POT's unbalanced Sinkhorn solver for the
ground cost between features and labels

    C_ij = eta1 ||phi(x_s,i) - phi(x_t,j)||^2 + eta2 CE(y_s,i, f(x_t,j)),

entropic regularisation ``epsilon`` and marginal relaxation ``tau`` (KL); pi is held fixed
and the model minimises

    L = CE(f(x_s), y_s) + trade_off * sum_ij pi_ij C_ij.

Logs ``transported_mass`` (sum of pi: 1 for balanced OT, less when the relaxation leaves
mass untransported) and ``transfer_loss``.

Its step runs eagerly, also on a GPU (:attr:`JUMBOT.eager_reason`): POT's solver runs on
the host, and a CUDA graph cannot contain a copy to the host.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import ot
import torch
import torch.nn.functional as F

from timematch.methods.alignment import AlignmentConfig, AlignmentMethod, AlignmentTerms, log_value
from timematch.methods.base import check_choice, check_range
from timematch.methods.registry import register

SOLVERS = ("sinkhorn", "sinkhorn_stabilized")


@dataclass(frozen=True)
class JUMBOTConfig(AlignmentConfig):
    eta1: float = 0.01
    eta2: float = 1.0
    epsilon: float = 0.01
    tau: float = 0.5
    # POT's plain unbalanced Sinkhorn-Knopp, as the published JUMBOT code calls it
    # (measured here: the log-stabilised variant does not converge at epsilon 0.01)
    ot_solver: str = "sinkhorn"
    ot_max_iter: int = 1000

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range(self, "eta1", 0.0, 1000.0)
        check_range(self, "eta2", 0.0, 1000.0)
        check_range(self, "epsilon", 0.0, 100.0, low_open=True)
        check_range(self, "tau", 0.0, 1000.0, low_open=True)
        check_choice(self, "ot_solver", SOLVERS)
        check_range(self, "ot_max_iter", 1, 1_000_000)


def unbalanced_plan(cost: np.ndarray, epsilon: float, tau: float, solver: str = "sinkhorn",
                    max_iter: int = 1000) -> np.ndarray:
    """POT's entropic unbalanced OT plan (n, m) between uniform marginals for ``cost`` (n, m)."""
    n, m = cost.shape
    a, b = np.full(n, 1.0 / n), np.full(m, 1.0 / m)
    return ot.unbalanced.sinkhorn_unbalanced(a, b, cost, reg=epsilon, reg_m=tau, method=solver,
                                             numItermax=max_iter)


@register("jumbot")
class JUMBOT(AlignmentMethod):
    config_class = JUMBOTConfig
    config: JUMBOTConfig
    table_order = 60.0
    short_name = "JUMBOT"
    eager_reason = ("POT's unbalanced Sinkhorn solver runs on the host (numpy, with a convergence test per "
                    "iteration): each step copies the cost matrix to the host and the plan back")

    def alignment_loss(self, logits, features, n_source, source_labels, context):
        cfg = self.config
        f_s, f_t = features[:n_source].float(), features[n_source:].float()
        log_p_t = F.log_softmax(logits[n_source:].float(), dim=-1)  # (m, K)
        one_hot = F.one_hot(source_labels, log_p_t.shape[-1]).float()  # (n, K)
        cost = cfg.eta1 * torch.cdist(f_s, f_t).pow(2) + cfg.eta2 * -(one_hot @ log_p_t.T)
        plan = unbalanced_plan(cost.detach().cpu().double().numpy(), cfg.epsilon, cfg.tau, cfg.ot_solver,
                               cfg.ot_max_iter)
        if not np.isfinite(plan).all():  # the solver diverged: no transport this step, counted
            return AlignmentTerms(torch.zeros((), device=cost.device), {"transported_mass": log_value(0.0, cost),
                                                                       "ot_failures_count": log_value(1.0, cost)})
        pi = torch.from_numpy(plan).to(cost.device, cost.dtype)
        return AlignmentTerms((pi * cost).sum(), {"transported_mass": log_value(plan.sum(), cost),
                                                  "ot_failures_count": log_value(0.0, cost)})

"""MAD and C-MAD (Painblanc, Chapel, Courty, Friguet, Pelletier, Tavenard; "Match-And-Deform:
Time Series Domain Adaptation through Optimal Transport and Temporal Alignment", ECML-PKDD
2023): optimal transport between the samples, jointly with a DTW alignment of the time axes.

With the per-date embeddings x_{i,s} of source sample i (date s of T) and x'_{j,t} of target
sample j (date t of U) (:meth:`Method.date_outputs`), L^{ij}_{st} = ||x_{i,s} - x'_{j,t}||^2.
Each step, a transport plan gamma between the two batches (marginals w over the source, uniform
over the target) and a DTW path pi in A(T, U) (C-MAD: one path pi^(c) per source class c, used
by every pair whose source sample has class c) minimise

    sum_ij gamma_ij [ alpha C_ij + beta S_ij ],   C_ij = sum_st pi^(y_i)_st L^{ij}_st / ((T + U) / 2),
                                                  S_ij = -log p(y_i | x'_j)

by block-coordinate descent, from the previous step's paths: for fixed paths C is a few matrix
products (no loop over sample pairs) and gamma is POT's exact plan (``ot.emd``); for a fixed
gamma each path is the DTW path (:func:`timematch.dtw.dtw_path`, on the device) of the (T x U)
cost sum_{i: y_i = c} sum_j gamma_ij L^{ij}; the rounds stop when no path changes (at most
``bcd_max_rounds``). With gamma and pi held fixed, the model minimises

    L = CE(f(x_s), y_s) + alpha sum_ij gamma_ij C_ij + beta sum_ij gamma_ij S_ij

(gradients through both domains' per-date embeddings and the target predictions). Published:
alpha 0.1, beta 0.01, batches of 256 per domain, Adam at lr 1e-4, 3,000 iterations.

Both batches share one draw of dates each (``strong(..., shared_dates=True)``), so each
batch has one time axis and a path maps source days to target days: the path's mean offset
``mean_(s,t) in pi (day_s - day_t)`` is a time-shift estimate with TimeMatch's sign (target
positions + d align with the source), logged per epoch as ``dtw_offset`` (C-MAD: the classes'
offsets weighted by their transported mass).

The source marginal: ``class_weights="uniform"`` (1 / n), or ``"estimated"``: w_i proportional
to p_t(y_i) / n_s(y_i), the target class proportions p_t estimated from the model's mean
predicted probabilities on the target batch. (The published code's option reads the target
training labels' proportions; no label of the target is read here.)

Runs eagerly (:attr:`MAD.eager_reason`). A transport problem POT does not solve (its result
code is not optimal, or the plan is not finite) leaves the step without its transport terms
and is counted in ``ot_failures_count``; rounds that stop at ``bcd_max_rounds`` with paths
still changing keep the last plan and path and are counted in ``bcd_unconverged_count``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import ot
import torch
import torch.nn.functional as F

from timematch.data.views import Batch
from timematch.dtw import diagonal_path, dtw_path, path_offset
from timematch.losses import focal_loss
from timematch.methods.alignment import log_value, paired_batches
from timematch.methods.base import Method, TrainConfig, check_choice, check_flag, check_range
from timematch.methods.registry import register
from timematch.training import StepContext

CLASS_WEIGHTS = ("uniform", "estimated")


@dataclass(frozen=True)
class MADConfig(TrainConfig):
    """The published set-up: 3,000 steps (6 x 500) of Adam at lr 1e-4, batches of 256 per
    domain, alpha 0.1, beta 0.01, cross entropy on the source."""

    epochs: int = 6
    steps_per_epoch: int | None = 500
    batch_size: int = 256
    lr: float = 1e-4
    weight_decay: float = 0.0
    focal_gamma: float = 0.0
    alpha: float = 0.1
    beta: float = 0.01
    per_class_paths: bool = False
    class_weights: str = "uniform"
    bcd_max_rounds: int = 100
    balanced_source: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range(self, "alpha", 0.0, 100.0)
        check_range(self, "beta", 0.0, 100.0)
        check_range(self, "bcd_max_rounds", 1, 1000)
        check_choice(self, "class_weights", CLASS_WEIGHTS)
        check_flag(self, "per_class_paths")
        check_flag(self, "balanced_source")


def pair_costs(source: torch.Tensor, target: torch.Tensor, paths: torch.Tensor) -> torch.Tensor:
    """C_ij = sum_st P_i[s, t] ||source_{i,s} - target_{j,t}||^2 for ``source`` (n, T, D), ``target``
    (m, U, D) and the path of each source sample ``paths`` (n, T, U) or one shared path (T, U):
    (n, m), by the expansion ||a - b||^2 = ||a||^2 + ||b||^2 - 2 <a, b> (no loop over pairs)."""
    a = source.pow(2).sum(-1)  # (n, T)
    b = target.pow(2).sum(-1)  # (m, U)
    if paths.dim() == 2:
        rows, cols = paths.sum(1), paths.sum(0)  # (T,), (U,)
        aligned = torch.einsum("st,isd->itd", paths, source)  # (n, U, D)
        return (a @ rows)[:, None] + (b @ cols)[None, :] - 2.0 * torch.einsum("itd,jtd->ij", aligned, target)
    rows, cols = paths.sum(2), paths.sum(1)  # (n, T), (n, U)
    aligned = torch.einsum("ist,isd->itd", paths, source)
    return (a * rows).sum(1)[:, None] + cols @ b.T - 2.0 * torch.einsum("itd,jtd->ij", aligned, target)


def path_costs(source: torch.Tensor, target: torch.Tensor, plan: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """The DTW cost of each group c (K, T, U): sum_{i in c} sum_j plan_ij ||source_{i,s} - target_{j,t}||^2,
    with ``groups`` (n, K) the 0/1 membership of the source samples (one column: MAD's one path)."""
    a = source.pow(2).sum(-1)  # (n, T)
    b = target.pow(2).sum(-1)  # (m, U)
    mass = plan.sum(1)  # (n,)
    first = (groups * mass[:, None]).T @ a  # (K, T)
    second = (groups.T @ plan) @ b  # (K, U)
    moved = torch.einsum("ij,jtd->itd", plan, target)  # (n, U, D): each source sample's transported target
    cross = torch.einsum("ic,isd,itd->cst", groups, source, moved)
    return first[:, :, None] + second[:, None, :] - 2.0 * cross


def exact_plan(weights: np.ndarray, cost: np.ndarray) -> np.ndarray | None:
    """POT's exact transport plan between ``weights`` and uniform target weights for ``cost``;
    None when the solver does not report an optimal, finite plan."""
    target = np.full(cost.shape[1], 1.0 / cost.shape[1])
    plan, log = ot.emd(weights, target, cost, log=True)
    if log.get("result_code") != 1 or not np.isfinite(plan).all():
        return None
    return plan


@register("mad")
class MAD(Method):
    config_class = MADConfig
    config: MADConfig
    table_order = 110.0
    short_name = "MAD"
    in_paper_table = False
    eager_reason = ("POT's exact transport solver runs on the host, and the block-coordinate descent stops "
                    "when the DTW paths stop changing: both read the step's values back")

    def __init__(self, config, model, source, target, device) -> None:
        super().__init__(config, model, source, target, device)
        self.n_classes = len(source.classes)
        self.paths: torch.Tensor | None = None  # (K, T, U): the previous step's, where the next starts

    @property
    def n_paths(self) -> int:
        return self.n_classes if self.config.per_class_paths else 1

    def sample(self) -> dict[str, Batch]:
        return paired_batches(self.views, self.config.batch_size, self.config.balanced_source, shared_dates=True)

    def source_weights(self, labels: torch.Tensor, target_probs: torch.Tensor) -> np.ndarray:
        """The source marginal w (see ``class_weights``), float64 summing to 1."""
        n = labels.shape[0]
        if self.config.class_weights == "uniform":
            return np.full(n, 1.0 / n)
        counts = torch.bincount(labels, minlength=self.n_classes).double()
        proportion = target_probs.double().mean(0)
        weights = (proportion[labels] / counts[labels]).cpu().numpy()
        return weights / weights.sum()

    def align(self, x_s: torch.Tensor, x_t: torch.Tensor, labels: torch.Tensor, label_cost: torch.Tensor,
              weights: np.ndarray) -> tuple[np.ndarray | None, torch.Tensor, int, bool]:
        """Block-coordinate descent from the previous paths: (plan or None, paths (K, T, U), rounds, converged)."""
        cfg = self.config
        T, U = x_s.shape[1], x_t.shape[1]
        scale = (T + U) / 2.0
        if self.paths is None or self.paths.shape[1:] != (T, U):
            self.paths = diagonal_path(T, U, x_s.device, x_s.dtype).expand(self.n_paths, T, U).clone()
        groups = (F.one_hot(labels, self.n_classes).to(x_s.dtype) if cfg.per_class_paths
                  else torch.ones(labels.shape[0], 1, dtype=x_s.dtype, device=x_s.device))
        present = (groups.sum(0) > 0)[:, None, None]  # a class absent from the batch keeps its path
        paths, plan = self.paths, None
        for rounds in range(1, cfg.bcd_max_rounds + 1):
            per_sample = paths[labels] if cfg.per_class_paths else paths[0]
            cost = cfg.alpha * pair_costs(x_s, x_t, per_sample) / scale + cfg.beta * label_cost
            plan = exact_plan(weights, cost.double().cpu().numpy())
            if plan is None:
                return None, paths, rounds, True
            gamma = torch.from_numpy(plan).to(x_s.device, x_s.dtype)
            new = dtw_path(path_costs(x_s, x_t, gamma, groups))[0]
            new = torch.where(present, new, paths)
            if torch.equal(new, paths):
                return plan, paths, rounds, True
            paths = new
        return plan, paths, cfg.bcd_max_rounds, False

    def training_step(self, batch: dict[str, Batch], context: StepContext) -> tuple[torch.Tensor, dict]:
        cfg = self.config
        source = batch["source"]
        out = self.date_outputs(Batch.concat(source, batch["target"]))
        n = len(source)
        labels = source.label
        classification = focal_loss(out.logits[:n], labels, cfg.focal_gamma)
        x_s, x_t = out.dates[:n].float(), out.dates[n:].float()
        log_p_t = F.log_softmax(out.logits[n:].float(), dim=-1)  # (m, K)
        label_cost = -log_p_t.T[labels]  # S_ij = -log p(y_i | x'_j): (n, m)
        with torch.no_grad():
            weights = self.source_weights(labels, log_p_t.exp())
            plan, paths, rounds, converged = self.align(x_s.detach(), x_t.detach(), labels, label_cost.detach(),
                                                        weights)
        zero = log_value(0.0, out.logits)
        logs = {"source_loss": classification.detach(), "bcd_rounds": log_value(rounds, out.logits),
                "bcd_unconverged_count": log_value(not converged, out.logits),
                "ot_failures_count": log_value(plan is None, out.logits)}
        if plan is None:
            return classification, dict(logs, transport_cost=zero, label_transport=zero)
        self.paths = paths
        gamma = torch.from_numpy(plan).to(x_s.device, x_s.dtype)
        per_sample = paths[labels] if cfg.per_class_paths else paths[0]
        transport = (gamma * pair_costs(x_s, x_t, per_sample)).sum() / ((x_s.shape[1] + x_t.shape[1]) / 2.0)
        label_transport = (gamma * label_cost).sum()
        loss = classification + cfg.alpha * transport + cfg.beta * label_transport
        offset = self._offset(paths, gamma, labels, source.positions[0], batch["target"].positions[0])
        return loss, dict(logs, transport_cost=transport.detach(), label_transport=label_transport.detach(),
                          dtw_offset=offset)

    def _offset(self, paths: torch.Tensor, gamma: torch.Tensor, labels: torch.Tensor, source_days: torch.Tensor,
                target_days: torch.Tensor) -> torch.Tensor:
        """The path's mean offset in days, a 0-dim tensor (C-MAD: the classes' offsets weighted by
        their transported mass)."""
        offsets = path_offset(paths, source_days, target_days)  # (K,)
        if not self.config.per_class_paths:
            return offsets[0]
        mass = torch.zeros(self.n_classes, dtype=gamma.dtype, device=gamma.device).index_add_(0, labels, gamma.sum(1))
        return (offsets * mass.to(offsets.dtype)).sum() / mass.sum().clamp_min(1e-12)

    def extra_state(self) -> dict[str, Any]:
        return {"paths": None if self.paths is None else self.paths.detach().cpu()}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        paths = state.get("paths")
        self.paths = None if paths is None else paths.to(self.device)


@dataclass(frozen=True)
class CMADConfig(MADConfig):
    """C-MAD: MAD with one DTW path per source class."""

    per_class_paths: bool = True


@register("cmad")
class CMAD(MAD):
    """C-MAD: one DTW path per source class (``per_class_paths=True``); see :class:`MAD`."""

    config_class = CMADConfig
    config: CMADConfig
    table_order = 111.0
    short_name = "C-MAD"

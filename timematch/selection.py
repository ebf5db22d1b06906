"""Unsupervised model-selection criteria: scores that rank trained models (or epochs) with
no, or very few, target labels.

Every criterion here is a pure function of numpy arrays that returns a float, higher =
better, and NaN where it is undefined (no points, a non-finite input). :data:`CRITERIA`
registers each name with what it needs from a model and its paper;
:func:`selection_criteria` computes them all for one model in one pass over the data:

- ``source_val_f1``: macro F1 on the source validation split;
- ``target_im_score``: information maximisation on target predictions;
- ``target_entropy``: :func:`target_entropy`, minus the mean prediction entropy;
- ``dev``: :func:`dev_score`, Deep Embedded Validation (importance-weighted source risk);
- ``snd``: :func:`snd_score`, Soft Neighborhood Density of target predictions;
- ``few_shot_target_f1``: :func:`few_shot_f1` on :func:`few_shot_indices` (the only one
  that reads target labels: a few per class, of the target validation split only).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from timematch.data.dataset import Domain
from timematch.errors import ConfigError
from timematch.evaluation import model_inputs, predict, score_labelled
from timematch.metrics import classification_metrics, entropy, information_maximization

#: The criterion that uses the target validation labels: logged every epoch, the optimistic
#: reference the others are measured against (and the default objective).
ORACLE = "target_val_f1"

#: What a criterion can need from a model (the keys of :attr:`Criterion.needs`).
NEEDS: dict[str, str] = {
    "target_probs": "softmax outputs (N, K) on the target validation parcels",
    "target_features": "features (N, D) of the target validation parcels",
    "target_labels": "labels of a few target validation parcels per class",
    "source_probs": "softmax outputs on the labelled source validation parcels",
    "source_labels": "labels of the source validation parcels",
    "source_losses": "per-parcel cross-entropy on the labelled source validation parcels",
    "source_features": "features of the labelled source validation parcels",
    "source_train_features": "features of a seeded subsample of the labelled source training parcels",
}


@dataclass(frozen=True)
class Criterion:
    """A model-selection criterion, maximised. ``needs`` lists keys of :data:`NEEDS`."""

    name: str
    uses_target_labels: bool
    needs: tuple[str, ...]
    description: str
    reference: str

    def __post_init__(self) -> None:
        unknown = sorted(set(self.needs) - set(NEEDS))
        if unknown:
            raise ValueError(f"criterion {self.name!r}: unknown needs {unknown}; valid: {', '.join(NEEDS)}")
        if self.uses_target_labels != ("target_labels" in self.needs):
            raise ValueError(f"criterion {self.name!r}: uses_target_labels must match 'target_labels' in needs")


def _registry(*criteria: Criterion) -> dict[str, Criterion]:
    registry: dict[str, Criterion] = {}
    for criterion in criteria:
        if criterion.name in registry:
            raise ValueError(f"criterion {criterion.name!r} registered twice")
        registry[criterion.name] = criterion
    return registry


CRITERIA: dict[str, Criterion] = _registry(
    Criterion(
        "source_val_f1", False, ("source_probs", "source_labels"),
        "macro F1 on the source validation split; no target labels (AdaTime's source risk)",
        "Ragab et al., ADATIME: A Benchmarking Suite for Domain Adaptation on Time Series Data, ACM TKDD 2023",
    ),
    Criterion(
        "target_im_score", False, ("target_probs",),
        "information maximisation H(mean prediction) - mean H(prediction) on target predictions "
        "(timematch.metrics.information_maximization); no target labels",
        "Gomes, Krause & Perona, Discriminative Clustering by Regularized Information Maximization, NeurIPS 2010; "
        "as a validator: Musgrave, Belongie & Lim, arXiv:2208.07360, 2022",
    ),
    Criterion(
        "target_entropy", False, ("target_probs",),
        "minus the mean entropy of target predictions (higher = more confident); no target labels",
        "Morerio, Cavazza & Murino, Minimal-Entropy Correlation Alignment for Unsupervised Deep Domain "
        "Adaptation, ICLR 2018",
    ),
    Criterion(
        "dev", False, ("source_losses", "source_features", "source_train_features", "target_features"),
        "minus the Deep Embedded Validation risk: source validation loss importance-weighted towards the "
        "target by a domain classifier, with a control variate; no target labels",
        "You, Wang, Long & Jordan, Towards Accurate Model Selection in Deep Unsupervised Domain Adaptation, "
        "ICML 2019",
    ),
    Criterion(
        "snd", False, ("target_probs",),
        "Soft Neighborhood Density: mean entropy of each target point's softmax similarity to the others "
        "(higher = denser neighbourhoods); no target labels",
        "Saito et al., Tune it the Right Way: Unsupervised Validation of Domain Adaptation via Soft "
        "Neighborhood Density, ICCV 2021",
    ),
    Criterion(
        "few_shot_target_f1", True, ("target_probs", "target_labels"),
        "macro F1 on a few labelled target validation parcels per class (never the test split); "
        "uses target labels",
        "Ragab et al., ADATIME (few-shot target risk), ACM TKDD 2023",
    ),
)


def get_criterion(name: str) -> Criterion:
    """The registered criterion ``name``; :class:`ConfigError` listing the valid names otherwise."""
    try:
        return CRITERIA[name]
    except KeyError:
        raise ConfigError(f"unknown selection criterion {name!r}; valid: {', '.join(CRITERIA)}") from None


# -- target entropy -------------------------------------------------------------------


def target_entropy(probs: np.ndarray) -> float:
    """Minus the mean Shannon entropy (nats) of target predictions ``probs`` (N, K).

    ``-1/N sum_i H(p_i)``, ``H(p) = -sum_k p_k log p_k``: 0 for one-hot predictions,
    ``-log K`` for uniform ones. Morerio et al., "Minimal-Entropy Correlation Alignment for
    Unsupervised Deep Domain Adaptation", ICLR 2018, select hyper-parameters by this
    target entropy. Confidence alone rewards a model that is confidently wrong, so it is a
    weak criterion on its own; NaN when ``probs`` is empty or not finite.
    """
    probs = np.asarray(probs, dtype=np.float64)
    if len(probs) == 0 or not np.isfinite(probs).all():
        return float("nan")
    return -float(entropy(probs).mean())


# -- Deep Embedded Validation ---------------------------------------------------------


@dataclass(frozen=True)
class DEVEstimate:
    """The parts of a DEV estimate, for logging: ``risk`` (lower = better), the control
    variate coefficient ``eta``, the mean importance weight (about 1 when the domain
    classifier is calibrated) and ``n_fit``, the points per domain it was fit on."""

    risk: float
    eta: float
    mean_weight: float
    n_fit: int

    @property
    def score(self) -> float:
        """``-risk``: higher = better, as every criterion."""
        return -self.risk


_NAN_ESTIMATE = DEVEstimate(float("nan"), float("nan"), float("nan"), 0)


def dev_estimate(
    source_val_features: np.ndarray,
    source_val_losses: np.ndarray,
    target_features: np.ndarray,
    source_train_features: np.ndarray | None = None,
    *,
    max_points: int = 1000,
    n_folds: int = 5,
    seed: int = 0,
) -> DEVEstimate:
    """Deep Embedded Validation (You et al., "Towards Accurate Model Selection in Deep
    Unsupervised Domain Adaptation", ICML 2019): the target risk estimated from labelled
    source validation parcels.

    Shapes: ``source_val_features`` (N, D), ``source_val_losses`` (N,) (per-parcel loss,
    e.g. cross-entropy), ``target_features`` (M, D), ``source_train_features`` (P, D).

    1. A domain classifier (logistic regression on standardised features, seeded) learns
       source (0) vs target (1) from at most ``max_points`` points of each domain, the
       larger domain subsampled to the size of the smaller so the classes are balanced.
    2. Density ratios of the source validation points,
       ``w(x) = p_t(x) / p_s(x) = P(t|x) / P(s|x) * n_s / n_t`` (``n_s = n_t`` here).
       The classifier never sees the points it weights: as in the paper it is fit on
       ``source_train_features`` when given, else it is cross-fitted over ``n_folds`` folds
       of the source validation points.
    3. Weighted losses ``L_i = w_i * loss_i`` and the control variate
       ``eta = -Cov(L, w) / Var(w)``, ``risk = mean(L) + eta * mean(w) - eta``
       (``E[w] = 1`` under the source, so the correction has mean zero and removes the
       variance that ``L`` shares with ``w``; ``eta = 0`` when the weights are constant).

    NaN fields when fewer than 2 source validation or target points are given or an input
    is not finite.
    """
    features = np.asarray(source_val_features, dtype=np.float64)
    losses = np.asarray(source_val_losses, dtype=np.float64)
    target = np.asarray(target_features, dtype=np.float64)
    train = None if source_train_features is None else np.asarray(source_train_features, dtype=np.float64)
    if features.ndim != 2 or target.ndim != 2 or (train is not None and train.ndim != 2):
        raise ValueError("DEV needs 2-D feature arrays (N, D)")
    if losses.shape != (len(features),):
        raise ValueError(f"source_val_losses must have shape ({len(features)},), got {losses.shape}")
    if max_points < 2 or n_folds < 2:
        raise ValueError(f"max_points and n_folds must be >= 2, got {max_points} and {n_folds}")
    if len(features) < 2 or len(target) < 2 or (train is not None and len(train) < 2):
        return _NAN_ESTIMATE
    widths = {features.shape[1], target.shape[1]} | ({train.shape[1]} if train is not None else set())
    if len(widths) > 1:
        raise ValueError(f"source and target features must have the same width, got {sorted(widths)}")
    arrays = (features, losses, target) + ((train,) if train is not None else ())
    if not all(np.isfinite(a).all() for a in arrays):
        return _NAN_ESTIMATE

    rng = np.random.default_rng(seed)
    if train is not None:
        weights, n_fit = _density_ratio(train, target, features, max_points, rng, seed)
    else:
        weights = np.empty(len(features))
        folds = np.array_split(rng.permutation(len(features)), min(n_folds, len(features)))
        n_fit = len(features)
        for fold in folds:
            rest = np.setdiff1d(np.arange(len(features)), fold)
            weights[fold], fitted = _density_ratio(features[rest], target, features[fold], max_points, rng, seed)
            n_fit = min(n_fit, fitted)
    return _control_variate_risk(weights, losses, n_fit)


def dev_score(
    source_val_features: np.ndarray,
    source_val_losses: np.ndarray,
    target_features: np.ndarray,
    source_train_features: np.ndarray | None = None,
    *,
    max_points: int = 1000,
    n_folds: int = 5,
    seed: int = 0,
) -> float:
    """Minus the DEV risk of :func:`dev_estimate` (You et al., ICML 2019): higher = better.

    Equal source and target distributions give weights about 1 and a score of about
    ``-mean(source_val_losses)``.
    """
    return dev_estimate(source_val_features, source_val_losses, target_features, source_train_features,
                        max_points=max_points, n_folds=n_folds, seed=seed).score


def _density_ratio(
    fit_source: np.ndarray, fit_target: np.ndarray, query: np.ndarray, max_points: int,
    rng: np.random.Generator, seed: int,
) -> tuple[np.ndarray, int]:
    """``p_t(x) / p_s(x)`` at ``query`` from a balanced logistic domain classifier; also the
    points per domain it was fit on."""
    n = min(len(fit_source), len(fit_target), max_points)
    source = fit_source[rng.choice(len(fit_source), n, replace=False)]
    target = fit_target[rng.choice(len(fit_target), n, replace=False)]
    x = np.concatenate([source, target])
    y = np.repeat([0, 1], n)
    scaler = StandardScaler().fit(x)
    classifier = LogisticRegression(max_iter=1000, random_state=seed).fit(scaler.transform(x), y)
    p_target = np.clip(classifier.predict_proba(scaler.transform(query))[:, 1], 1e-6, 1 - 1e-6)
    # balanced classes: the prior ratio n_s / n_t is 1, so the density ratio is the odds
    return p_target / (1 - p_target), n


def _control_variate_risk(weights: np.ndarray, losses: np.ndarray, n_fit: int) -> DEVEstimate:
    weighted = weights * losses
    var_w = float(np.var(weights, ddof=1))
    cov = float(np.cov(weighted, weights, ddof=1)[0, 1])
    eta = -cov / var_w if var_w > 1e-12 else 0.0
    risk = float(weighted.mean() + eta * weights.mean() - eta)
    return DEVEstimate(risk=risk, eta=float(eta), mean_weight=float(weights.mean()), n_fit=int(n_fit))


# -- Soft Neighborhood Density --------------------------------------------------------


def snd_score(
    target_features_or_probs: np.ndarray, temperature: float = 0.05, max_points: int = 2000, seed: int = 0
) -> float:
    """Soft Neighborhood Density (Saito et al., "Tune it the Right Way: Unsupervised
    Validation of Domain Adaptation via Soft Neighborhood Density", ICCV 2021).

    ``target_features_or_probs`` (N, D): the paper uses the target softmax outputs. Rows are
    L2-normalised (``f_i``), ``S_ij = f_i . f_j`` with ``S_ii = -inf`` (a point is not its
    own neighbour), ``P_i = softmax_j(S_ij / temperature)`` and
    ``SND = 1/N sum_i H(P_i)``: high when each point has many close neighbours (dense,
    well-separated clusters), low when similarities fall off smoothly (spread-out points).
    ``m`` coinciding points score ``log(m - 1)``, so a model that predicts one class for
    every parcel scores highest: read SND next to a criterion that rewards diverse
    predictions (``target_im_score``).
    At most ``max_points`` rows are used (a seeded subsample): memory and time grow as N^2.
    NaN for fewer than 2 rows or non-finite input.
    """
    x = np.asarray(target_features_or_probs, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"SND needs a 2-D array (N, D), got shape {x.shape}")
    if temperature <= 0 or max_points < 2:
        raise ValueError(f"temperature must be > 0 and max_points >= 2, got {temperature} and {max_points}")
    if len(x) < 2 or not np.isfinite(x).all():
        return float("nan")
    if len(x) > max_points:
        x = x[np.sort(np.random.default_rng(seed).choice(len(x), max_points, replace=False))]
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    logits = x @ x.T / temperature
    np.fill_diagonal(logits, -np.inf)
    logits -= logits.max(axis=1, keepdims=True)
    neighbours = np.exp(logits)
    neighbours /= neighbours.sum(axis=1, keepdims=True)
    return float(entropy(neighbours).mean())


# -- few labelled target parcels ------------------------------------------------------


def few_shot_indices(
    labels: np.ndarray,
    parcels: np.ndarray,
    shots_per_class: int,
    seed: int = 0,
    test_parcels: np.ndarray | None = None,
) -> np.ndarray:
    """A few labelled target *validation* parcels per class, for :func:`few_shot_f1`.

    ``parcels`` (P,) are the target validation parcel indices and ``labels`` (P,) their
    class indices (-1 = outside the class list: skipped). Per class ``c`` the choice is
    ``shots_per_class`` parcels drawn uniformly without replacement by
    ``numpy.random.default_rng([seed, c])`` from that class's parcels in ascending index
    order (all of them when there are fewer), so it depends only on the seed and the set
    of validation parcels of that class, not on their order or on the other classes.
    Returns the chosen parcel indices, sorted.

    ``test_parcels``, when given, are checked: a validation set that overlaps the test
    split raises ``ValueError`` instead of leaking test labels into model selection.
    """
    labels = np.asarray(labels, dtype=np.int64)
    parcels = np.asarray(parcels, dtype=np.int64)
    if labels.shape != parcels.shape or parcels.ndim != 1:
        raise ValueError(f"labels and parcels must be 1-D of the same length, got {labels.shape} and {parcels.shape}")
    if shots_per_class < 1:
        raise ValueError(f"shots_per_class must be >= 1, got {shots_per_class}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    if len(np.unique(parcels)) != len(parcels):
        raise ValueError("parcels must be distinct")
    if test_parcels is not None and np.isin(parcels, test_parcels).any():
        overlap = parcels[np.isin(parcels, test_parcels)]
        raise ValueError(f"{len(overlap)} validation parcel(s) are in the test split (e.g. {overlap[:5].tolist()}); "
                         "few-shot selection must use validation parcels only")
    order = np.argsort(parcels)
    parcels, labels = parcels[order], labels[order]
    chosen = [np.zeros(0, np.int64)]
    for label in np.unique(labels[labels >= 0]):
        members = parcels[labels == label]
        rng = np.random.default_rng([seed, int(label)])
        chosen.append(members[rng.choice(len(members), min(shots_per_class, len(members)), replace=False)])
    return np.sort(np.concatenate(chosen))


def few_shot_f1(probs: np.ndarray, labels: np.ndarray, classes: list[str] | None = None) -> float:
    """Macro F1 of predictions ``probs`` (N, K) on the few labelled target parcels of
    :func:`few_shot_indices` with ``labels`` (N,) (rows with -1 are left out).

    Through :func:`timematch.metrics.classification_metrics`, so macro F1 averages the
    classes present in the labels or predictions. The few-shot target risk of AdaTime
    (Ragab et al., ACM TKDD 2023). NaN when no row is labelled.
    """
    probs = np.asarray(probs)
    labels = np.asarray(labels)
    classes = classes if classes is not None else [str(k) for k in range(probs.shape[1])]
    labelled = labels >= 0
    return float(classification_metrics(labels[labelled], probs[labelled].argmax(1), classes)["macro_f1"])


# -- every criterion of one model -----------------------------------------------------


@torch.inference_mode()
def _logits_and_features(
    model: torch.nn.Module, domain: Domain, parcels: np.ndarray, device: torch.device
) -> tuple[np.ndarray, np.ndarray]:
    """Logits (N, K) and features (N, D) of ``parcels`` (all pixels and dates), float32,
    rows in the order of ``parcels``."""
    logits, features, index = [], [], []
    for batch in domain.eval_batches(parcels):
        args, kwargs = model_inputs(model, batch, device)
        out, feats = model(*args, **kwargs)
        logits.append(out.float())
        features.append(feats.float())
        index.append(batch["index"])
    if not index:
        return np.zeros((0, len(domain.classes)), np.float32), np.zeros((0, 0), np.float32)
    index_arr = np.concatenate(index)
    row_of = np.empty(int(index_arr.max()) + 1, dtype=np.int64)
    row_of[index_arr] = np.arange(len(index_arr))
    rows = row_of[np.asarray(parcels)]
    return torch.cat(logits).cpu().numpy()[rows], torch.cat(features).cpu().numpy()[rows]


def _validation(source: Domain) -> np.ndarray:
    """The labelled source validation parcels an epoch evaluates (the domain's evaluation sample)."""
    return source.evaluation_sample(source.labelled("val"), "val")


def _softmax(logits: np.ndarray) -> np.ndarray:
    return torch.from_numpy(logits).softmax(-1).numpy()


def selection_criteria(
    model: torch.nn.Module,
    source: Domain,
    target: Domain,
    device: torch.device,
    few_shot: int = 5,
    seed: int = 0,
    max_fit_points: int = 1000,
) -> dict[str, float]:
    """Every criterion of :data:`CRITERIA` for ``model``, keyed by name (higher = better).

    One forward pass over each parcel set: the target validation parcels (probabilities
    and features), the labelled source validation parcels (probabilities, features,
    per-parcel cross-entropy), each its domain's fixed evaluation sample
    (:meth:`~timematch.data.dataset.Domain.evaluation_sample`: the whole part, or a
    class-stratified sample of the profile's ``data.eval_parcels``) and a seeded subsample of at most ``max_fit_points``
    labelled source training parcels (features for DEV's domain classifier, fit against
    at most ``max_fit_points`` target validation features). ``few_shot_target_f1`` uses
    ``few_shot`` labelled target validation parcels per class (NaN when ``few_shot`` is 0).
    The model is evaluated in eval mode and left in the mode it came in.
    """
    was_training = model.training
    model.eval()
    try:
        target_parcels = target.evaluation_sample(target.split.val, "val")
        source_parcels = _validation(source)
        train_parcels = source.labelled("train")
        rng = np.random.default_rng(seed)
        if len(train_parcels) > max_fit_points:
            train_parcels = np.sort(rng.choice(train_parcels, max_fit_points, replace=False))
        target_logits, target_features = _logits_and_features(model, target, target_parcels, device)
        source_logits, source_features = _logits_and_features(model, source, source_parcels, device)
        _, train_features = _logits_and_features(model, source, train_parcels, device)
    finally:
        model.train(was_training)

    target_probs = _softmax(target_logits)
    source_probs = _softmax(source_logits)
    source_labels = source.labels[source_parcels]
    source_losses = F.cross_entropy(torch.from_numpy(source_logits), torch.from_numpy(source_labels),
                                    reduction="none").numpy()
    if few_shot > 0:
        shots = few_shot_indices(target.labels[target_parcels], target_parcels, few_shot, seed, target.split.test)
        rows = np.isin(target_parcels, shots)
        few_shot_value = few_shot_f1(target_probs[rows], target.labels[target_parcels][rows], target.classes)
    else:
        few_shot_value = float("nan")
    values = {
        "source_val_f1": score_labelled(source_probs, source_labels, source.classes)["macro_f1"],
        "target_im_score": information_maximization(target_probs),
        "target_entropy": target_entropy(target_probs),
        "dev": dev_score(source_features, source_losses, target_features, train_features,
                         max_points=max_fit_points, seed=seed),
        "snd": snd_score(target_probs, seed=seed),
        "few_shot_target_f1": few_shot_value,
    }
    oracle = score_labelled(target_probs, target.labels[target_parcels], target.classes)["macro_f1"]
    return {ORACLE: float(oracle), **{name: float(values[name]) for name in CRITERIA}}


def epoch_selection(model: torch.nn.Module, source: Domain, target: Domain, device: torch.device,
                    seed: int = 0) -> dict[str, float]:
    """What every epoch logs to choose by: with a target, the oracle and every criterion
    (:func:`selection_criteria`); when the target is the source itself (source-model
    training), ``source_val_f1`` alone (target criteria would be source values)."""
    if target is source:
        probs, labels = predict(model, source, _validation(source), device)
        return {"source_val_f1": score_labelled(probs, labels, source.classes)["macro_f1"]}
    return selection_criteria(model, source, target, device, seed=seed)

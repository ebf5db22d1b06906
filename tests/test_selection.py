"""Unsupervised model-selection criteria (timematch/selection.py): their defining
properties on seeded toy arrays, the few-shot split discipline, and every criterion of a
small untrained model on the synthetic tiles."""

import math

import numpy as np
import pytest
import torch

from timematch.data.dataset import DataConfig, open_domains
from timematch.errors import ConfigError
from timematch.models import build_model
from timematch.selection import (
    CRITERIA,
    NEEDS,
    Criterion,
    dev_estimate,
    dev_score,
    few_shot_f1,
    few_shot_indices,
    get_criterion,
    selection_criteria,
    snd_score,
    target_entropy,
)


def test_registry_names_and_label_use():
    assert list(CRITERIA) == ["source_val_f1", "target_im_score", "target_entropy", "dev", "snd",
                              "few_shot_target_f1"]
    assert [c.name for c in CRITERIA.values() if c.uses_target_labels] == ["few_shot_target_f1"]
    assert all(set(c.needs) <= set(NEEDS) and c.reference and c.description for c in CRITERIA.values())
    with pytest.raises(ConfigError, match="unknown selection criterion 'nope'; valid: source_val_f1, .*snd"):
        get_criterion("nope")
    with pytest.raises(ValueError, match="unknown needs"):
        Criterion("x", False, ("logits",), "", "")
    with pytest.raises(ValueError, match="uses_target_labels"):
        Criterion("x", False, ("target_labels",), "", "")


# -- target entropy -------------------------------------------------------------------


def test_target_entropy_prefers_confident_predictions():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(200, 4))
    scores = [target_entropy(torch.from_numpy(logits * scale).softmax(-1).numpy()) for scale in (0.1, 1, 10)]
    assert scores[0] < scores[1] < scores[2] <= 0
    assert target_entropy(np.full((5, 4), 0.25)) == pytest.approx(-math.log(4))
    assert target_entropy(np.eye(4)) == pytest.approx(0.0, abs=1e-9)
    assert math.isnan(target_entropy(np.zeros((0, 4))))


# -- DEV ------------------------------------------------------------------------------


def _gaussians(rng, n, d=8, mean=0.0):
    return rng.normal(size=(n, d)) + mean


@pytest.mark.parametrize("cross_fit", [False, True])
def test_dev_with_equal_domains_is_minus_source_risk(cross_fit):
    rng = np.random.default_rng(1)
    val, train, target = _gaussians(rng, 1000), _gaussians(rng, 1000), _gaussians(rng, 1000)
    losses = rng.exponential(size=1000)
    estimate = dev_estimate(val, losses, target, None if cross_fit else train, seed=0)
    assert estimate.mean_weight == pytest.approx(1.0, abs=0.05)
    assert estimate.risk == pytest.approx(losses.mean(), rel=0.02)
    assert dev_score(val, losses, target, None if cross_fit else train, seed=0) == -estimate.risk


def test_dev_moves_towards_the_target_risk_under_covariate_shift():
    # the loss grows along the first axis, where the target sits further out
    rng = np.random.default_rng(2)
    val, train = _gaussians(rng, 2000, 2), _gaussians(rng, 2000, 2)
    target = _gaussians(rng, 2000, 2, mean=np.array([1.0, 0.0]))

    def loss(x):
        return 1 / (1 + np.exp(-2 * x[:, 0]))

    source_risk, target_risk = loss(val).mean(), loss(target).mean()
    risk = dev_estimate(val, loss(val), target, train, seed=0).risk
    assert abs(risk - target_risk) < 0.25 * abs(source_risk - target_risk)


def test_dev_is_seeded_and_nan_when_undefined():
    rng = np.random.default_rng(3)
    val, target, losses = _gaussians(rng, 100), _gaussians(rng, 80, mean=0.5), rng.random(100)
    assert dev_score(val, losses, target, seed=4) == dev_score(val, losses, target, seed=4)
    assert math.isnan(dev_score(val[:1], losses[:1], target))
    assert math.isnan(dev_score(val, losses, target[:0]))
    assert math.isnan(dev_score(val, np.where(np.arange(100) == 3, np.nan, losses), target))
    with pytest.raises(ValueError, match="source_val_losses must have shape"):
        dev_score(val, losses[:50], target)
    with pytest.raises(ValueError, match="same width"):
        dev_score(val, losses, target[:, :3])


# -- SND ------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(3))
def test_snd_higher_for_clustered_than_spread_predictions(seed):
    rng = np.random.default_rng(seed)
    n, k = 400, 4
    spread = rng.dirichlet(np.ones(k), size=n)  # uniform over the simplex
    clustered = np.eye(k)[rng.integers(0, k, n)] * 5 + rng.dirichlet(np.ones(k), size=n)
    clustered /= clustered.sum(1, keepdims=True)
    assert snd_score(clustered) > snd_score(spread) + 0.05
    # features on a circle: five tight clusters against the same number of spread points
    angles = rng.uniform(0, 2 * np.pi, n)
    cluster_angles = rng.integers(0, 5, n) * 2 * np.pi / 5 + rng.normal(scale=0.05, size=n)
    assert (snd_score(np.c_[np.cos(cluster_angles), np.sin(cluster_angles)])
            > snd_score(np.c_[np.cos(angles), np.sin(angles)]) + 0.1)


def test_snd_excludes_self_and_subsamples():
    # m identical points: each row spreads evenly over the m - 1 others
    assert snd_score(np.ones((10, 3))) == pytest.approx(math.log(9))
    rng = np.random.default_rng(5)
    probs = rng.dirichlet(np.ones(4), size=300)
    assert snd_score(probs, max_points=100, seed=1) == snd_score(probs, max_points=100, seed=1)
    assert snd_score(probs, max_points=100, seed=1) != snd_score(probs)
    assert math.isnan(snd_score(probs[:1]))


# -- few-shot target F1 ---------------------------------------------------------------


def _target_split(seed=0, n=300):
    rng = np.random.default_rng(seed)
    order = rng.permutation(n)
    labels = rng.integers(-1, 4, n)  # -1: outside the class list
    return labels, order[:210], order[210:240], order[240:]  # labels, train, val, test


def test_few_shot_uses_validation_only_and_is_deterministic():
    labels, _, val, test = _target_split()
    chosen = few_shot_indices(labels[val], val, shots_per_class=3, seed=7, test_parcels=test)
    assert set(chosen) <= set(val) and not set(chosen) & set(test)
    assert (labels[chosen] >= 0).all()
    counts = np.bincount(labels[chosen], minlength=4)
    available = np.bincount(labels[val][labels[val] >= 0], minlength=4)
    assert (counts == np.minimum(3, available)).all()
    np.testing.assert_array_equal(chosen, few_shot_indices(labels[val], val, 3, seed=7))
    shuffled = np.random.default_rng(1).permutation(len(val))  # the choice ignores the order given
    np.testing.assert_array_equal(chosen, few_shot_indices(labels[val][shuffled], val[shuffled], 3, seed=7))
    assert any(not np.array_equal(chosen, few_shot_indices(labels[val], val, 3, seed=s)) for s in range(8, 12))


def test_few_shot_refuses_test_parcels():
    labels, _, val, test = _target_split()
    leaky = np.concatenate([val, test[:2]])
    with pytest.raises(ValueError, match="2 validation parcel\\(s\\) are in the test split"):
        few_shot_indices(labels[leaky], leaky, 3, seed=0, test_parcels=test)
    with pytest.raises(ValueError, match="shots_per_class"):
        few_shot_indices(labels[val], val, 0)


def test_few_shot_f1_is_macro_f1_on_labelled_rows():
    labels = np.array([0, 0, 1, 1, -1])
    probs = np.eye(2)[[0, 1, 1, 1, 0]]
    assert few_shot_f1(probs, labels) == pytest.approx((2 / 3 + 0.8) / 2)
    assert few_shot_f1(np.eye(2)[1 - labels[:4]], labels[:4]) == 0.0  # every one wrong
    assert math.isnan(few_shot_f1(probs[4:], labels[4:]))


# -- every criterion of a model -------------------------------------------------------


@pytest.mark.slow
def test_selection_criteria_of_a_model_on_synthetic_tiles(data_root, cache_dir):
    source, target = open_domains(data_root, "DK", "FR1", 0, DataConfig.from_dict({"min_parcels": 20}), cache_dir)
    torch.manual_seed(0)
    model = build_model("pse_ltae", num_classes=len(source.classes))
    model.train()
    device = torch.device("cpu")
    values = selection_criteria(model, source, target, device)
    assert list(values) == ["target_val_f1", *CRITERIA]  # the oracle first, then every criterion
    assert all(math.isfinite(v) for v in values.values()), values
    assert model.training  # left in the mode it came in
    assert selection_criteria(model, source, target, device) == values  # seeded, eval mode

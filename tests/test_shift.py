"""Shift estimation on a toy problem with a planted shift, batched vs one-at-a-time."""

import numpy as np
import pytest
import torch

from tests.support.host_reads import forbid_host_reads
from timematch.data.views import Batch
from timematch.errors import ConfigError
from timematch.shift import estimate_shift, estimate_shift_loop

CENTRES = torch.tensor([80.0, 150.0, 220.0, 290.0])


class BumpClassifier(torch.nn.Module):
    """Class k = a bump in the signal around day CENTRES[k]; logits compare the signal
    with one template per class, evaluated at the given positions."""

    def encode_pixels(self, pixels, mask, geom=None, padded=True):
        return pixels.mean(dim=(2, 3))[..., None]  # (B, T, 1)

    def encode_time(self, emb, positions):
        templates = torch.exp(-((positions[..., None].float() - CENTRES) ** 2) / (2 * 15.0**2))  # (B, T, K)
        return (emb * templates).sum(1) / templates.sum(1)  # (B, K)

    def classify(self, features):
        return 40.0 * features

    def forward(self, pixels, mask, positions, geom=None):
        feats = self.encode_time(self.encode_pixels(pixels, mask, geom), positions)
        return self.classify(feats), feats


def toy_batches(shift: int, n_batches: int = 3, size: int = 32, seed: int = 0):
    """Target samples whose bumps come ``shift`` days early; positions are true days."""
    rng = np.random.default_rng(seed)
    days = np.arange(0, 365, 7)
    batches = []
    for _ in range(n_batches):
        labels = rng.integers(0, 4, size)
        centre = CENTRES.numpy()[labels] - shift + rng.normal(0, 2, size)
        signal = np.exp(-((days[None] - centre[:, None]) ** 2) / (2 * 15.0**2)) + rng.normal(0, 0.05, (size, len(days)))
        pixels = np.repeat(signal[:, :, None, None], 4, axis=2).repeat(2, axis=3).astype(np.float32)
        batches.append(Batch(
            pixels=torch.from_numpy(pixels),
            mask=torch.ones(size, 4, dtype=torch.bool),
            positions=torch.from_numpy(np.broadcast_to(days, (size, len(days))).copy()),
            geom=torch.zeros(size, 4),
            label=torch.from_numpy(labels),
            index=torch.arange(size),
            padded=False,
        ))
    return batches


@pytest.mark.parametrize("planted", [-23, 0, 17])
@pytest.mark.parametrize("estimator", ["is", "am", "ent", "acc"])
def test_recovers_planted_shift(planted, estimator):
    batches = toy_batches(planted)
    prior = np.ones(4)
    scores = estimate_shift(BumpClassifier(), batches, range(-60, 61), estimator, class_prior=prior)
    assert len(scores.scores) == 121
    if estimator == "acc":  # accuracy is flat over a wide plateau: the planted shift is on it
        assert scores.scores[planted + 60] == scores.scores.max()
    else:
        assert abs(scores.estimate - planted) <= 3, (estimator, planted, scores.estimate)


def test_batched_equals_loop():
    batches = toy_batches(11)
    model = BumpClassifier()
    batched = estimate_shift(model, batches, range(-20, 21), "am", class_prior=np.ones(4), max_rows=100)
    loop = estimate_shift_loop(model, batches, range(-20, 21), "am", class_prior=np.ones(4))
    np.testing.assert_allclose(batched.scores, loop.scores, rtol=1e-5, atol=1e-6)
    assert batched.estimate == loop.estimate


def test_bad_estimator_and_missing_prior():
    with pytest.raises(ConfigError, match="valid: am, is, ent, acc"):
        estimate_shift(BumpClassifier(), toy_batches(0), range(3), "xyz")
    with pytest.raises(ConfigError, match="class_prior"):
        estimate_shift(BumpClassifier(), toy_batches(0), range(3), "am")


def test_batched_equals_loop_with_pse_ltae():
    from timematch.models import build_model

    torch.manual_seed(0)
    model = build_model(num_classes=5).eval()
    batches = []
    for seed in range(2):
        g = torch.Generator().manual_seed(seed)
        batches.append(Batch(pixels=torch.randn(12, 20, 16, 10, generator=g), mask=torch.ones(12, 16, dtype=torch.bool),
                             positions=torch.sort(torch.randint(0, 360, (12, 20), generator=g), 1).values,
                             geom=torch.zeros(12, 4), label=torch.full((12,), -1), index=torch.arange(12)))
    batched = estimate_shift(model, batches, range(-60, 61, 5), "is", max_rows=100)
    loop = estimate_shift_loop(model, batches, range(-60, 61, 5), "is")
    np.testing.assert_allclose(batched.scores, loop.scores, rtol=1e-4, atol=1e-5)


def test_scores_stay_on_the_device_until_the_end():
    """The per-shift sums accumulate as tensors: inside the batches, nothing is read back."""
    from timematch import shift as shift_module

    batches = toy_batches(5)
    original = shift_module._Accumulator.scores
    calls = []

    def scores(self, estimator, prior):
        calls.append(estimator)
        return original(self, estimator, prior)

    shift_module._Accumulator.scores = scores
    try:
        with forbid_host_reads():
            accumulator = shift_module._Accumulator(121, 4, torch.device("cpu"))
            for batch in batches:
                probs = torch.rand(121, len(batch), 4).softmax(-1)
                accumulator.add(probs, batch.label, slice(0, 121))
        estimate_shift(BumpClassifier(), batches, range(-60, 61), "is")
    finally:
        shift_module._Accumulator.scores = original
    assert calls == ["is"]

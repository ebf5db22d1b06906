"""Sanity of the competitors' shared parts, each where its answer is known: gradient
reversal and its warm start (resumed at the right coefficient), the linear-time MMD, the
unbalanced OT plan's marginals, the (randomized) multilinear map, entropy weights, ALDA's
corrected labels; and bad configs rejected with the key and its range."""

import math

import numpy as np
import pytest
import torch

from timematch.errors import ConfigError
from timematch.methods import build_config
from timematch.methods.alda import alda_losses
from timematch.methods.alignment import (
    MultilinearMap, RandomizedMultilinearMap, conditional_map, domain_adversarial_loss, entropy, linear_mk_mmd,
    reverse_gradient, warm_start_coefficient,
)
from timematch.methods.jumbot import unbalanced_plan


def test_reversal_flips_and_scales_gradients():
    x = torch.randn(5, 3, requires_grad=True)
    y = reverse_gradient(x, 0.3)
    assert torch.equal(y, x)
    (y * torch.arange(3.0)).sum().backward()
    assert torch.allclose(x.grad, -0.3 * torch.arange(3.0).expand(5, 3))


def test_warm_start_schedule_and_resume_coefficient():
    assert warm_start_coefficient(0) == 0.0
    values = [warm_start_coefficient(i, max_iters=1000) for i in (0, 100, 1000, 5000, 100_000)]
    assert values == sorted(values) and values[-1] == pytest.approx(1.0, abs=1e-6)
    assert values[2] == pytest.approx(2 / (1 + math.exp(-1)) - 1)
    assert warm_start_coefficient(10**9, lo=0.2, hi=0.7) == pytest.approx(0.7)
    # the coefficient of a captured step is computed from the device's step counter: the same values
    steps = torch.arange(0, 100_000, 997)
    on_device = warm_start_coefficient(steps, lo=0.2, hi=0.7, max_iters=1000)
    assert on_device.dtype == torch.float32
    np.testing.assert_allclose(on_device.numpy(), [warm_start_coefficient(int(i), lo=0.2, hi=0.7) for i in steps],
                               rtol=1e-6)


def test_reversal_coefficient_may_be_a_tensor():
    x = torch.randn(4, 2, requires_grad=True)
    reverse_gradient(x, torch.tensor(0.5)).sum().backward()
    assert torch.allclose(x.grad, torch.full((4, 2), -0.5))


def test_mmd_near_zero_for_one_distribution_and_grows_with_a_mean_shift():
    g = torch.Generator().manual_seed(0)
    source = torch.randn(2048, 16, generator=g)
    same = torch.randn(2048, 16, generator=g)
    assert abs(float(linear_mk_mmd(source, same))) < 0.02
    values = [float(linear_mk_mmd(source, torch.randn(2048, 16, generator=g) + shift)) for shift in (0.25, 0.5, 1, 2)]
    assert values == sorted(values) and values[0] > 0.02
    with pytest.raises(ValueError, match="B >= 2"):
        linear_mk_mmd(source[:1], same[:1])


def test_unbalanced_plan_marginals_within_the_relaxation():
    rng = np.random.default_rng(0)
    cost = rng.uniform(0.0, 1.0, (32, 40))
    a, b = np.full(32, 1 / 32), np.full(40, 1 / 40)
    tight = unbalanced_plan(cost, epsilon=0.05, tau=1000.0)  # nearly balanced
    assert (tight >= 0).all()
    np.testing.assert_allclose(tight.sum(1), a, rtol=0.02)
    np.testing.assert_allclose(tight.sum(0), b, rtol=0.02)
    loose = unbalanced_plan(cost, epsilon=0.05, tau=0.05)  # cheap to leave mass behind
    assert 0 < loose.sum() < tight.sum() <= 1 + 1e-6

    def kl(p, q):
        return float((p * np.log(p / q) - p + q).sum())

    # a larger relaxation weight keeps the marginals closer to the uniform weights
    assert kl(loose.sum(1), a) > kl(tight.sum(1), a)


def test_multilinear_maps_have_the_stated_size():
    f, g = torch.randn(6, 128), torch.softmax(torch.randn(6, 10), -1)
    plain = conditional_map(128, 10)
    assert isinstance(plain, MultilinearMap) and plain.out_features == 1280
    out = plain(f, g)
    assert out.shape == (6, 1280)
    assert torch.allclose(out[2].view(10, 128), torch.outer(g[2], f[2]))
    randomized = conditional_map(128, 40)  # 5120 > 4096: randomized
    assert isinstance(randomized, RandomizedMultilinearMap) and randomized.out_features == 1024
    assert randomized(f, torch.softmax(torch.randn(6, 40), -1)).shape == (6, 1024)
    assert set(dict(randomized.named_buffers())) == {"Rf", "Rg"}  # checkpointed with the method


def test_entropy_and_domain_loss():
    uniform, certain = torch.full((1, 4), 0.25), torch.tensor([[1.0, 0, 0, 0]])
    assert float(entropy(uniform)) == pytest.approx(math.log(4))
    assert float(entropy(certain)) == pytest.approx(0.0, abs=1e-6)
    logits = torch.tensor([[5.0], [5.0], [-5.0], [-5.0]])  # a perfect discriminator
    loss, accuracy = domain_adversarial_loss(logits, n_source=2)
    assert float(accuracy) == 1.0 and float(loss) < 0.01
    _, chance = domain_adversarial_loss(torch.zeros(4, 1), n_source=2)
    assert float(chance) == 0.5


def test_alda_corrected_labels_and_threshold():
    torch.manual_seed(0)
    probs = torch.softmax(torch.randn(8, 3) * 4, -1)
    labels = torch.tensor([0, 1, 2, 0])
    disc = torch.randn(8, 3)
    none = alda_losses(disc, probs, labels, threshold=1.0)
    assert float(none["accepted"]) == 0.0 and float(none["corrected"]) == 0.0
    every = alda_losses(disc, probs, labels, threshold=0.0)
    assert float(every["accepted"]) == 1.0 and float(every["corrected"]) < 0
    # a discriminator sure every prediction is right makes the corrected label the prediction
    sure = alda_losses(torch.full((8, 3), 50.0), probs, labels, threshold=0.0)
    assert float(sure["corrected"]) == pytest.approx(-float(probs[4:].max(1).values.mean()) / 3, rel=1e-4)


@pytest.mark.parametrize("method, overrides, pattern", [
    ("dann", {"trade_off": -1.0}, r"DANNConfig.trade_off=-1.0 is out of range; allowed: \[0.0, 100.0\]"),
    ("mmd", {"lr": 0.0}, r"MMDConfig.lr=0.0 is out of range; allowed: \(0.0, 10.0\]"),
    ("jumbot", {"epsilon": 0.0}, r"JUMBOTConfig.epsilon=0.0 is out of range; allowed: \(0.0, 100.0\]"),
    ("jumbot", {"tau": -2}, r"JUMBOTConfig.tau=-2 is out of range"),
    ("jumbot", {"ot_solver": "mine"}, r"ot_solver='mine'; valid: sinkhorn, sinkhorn_stabilized"),
    ("alda", {"pseudo_threshold": 1.5}, r"ALDAConfig.pseudo_threshold=1.5 is out of range; allowed: \[0.0, 1.0\]"),
    ("cdan", {"optimizer": "lbfgs"}, r"optimizer='lbfgs'; valid: adam, sgd"),
    ("cdan_e", {"trade_off": "abc"}, r"CDANEConfig.trade_off='abc' is not a number"),
    ("shift_aug", {"shift_aug_p": 2.0}, r"shift_aug_p=2.0 is out of range"),
    ("dann", {"grl_max_iters": 2.5}, r"DANNConfig.grl_max_iters=2.5 is not an integer; allowed: \[1, 10000000\]"),
    ("mmd", {"epochs": 1.5}, r"MMDConfig.epochs=1.5 is not an integer"),
])
def test_bad_competitor_configs_name_the_key_and_range(method, overrides, pattern):
    with pytest.raises(ConfigError, match=pattern):
        build_config(method, overrides)


def test_published_competitor_defaults():
    dann = build_config("dann")
    assert (dann.optimizer, dann.lr, dann.momentum, dann.nesterov, dann.schedule, dann.lr_gamma, dann.lr_decay,
            dann.backbone_lr_scale, dann.weight_decay, dann.trade_off, dann.grl_max_iters,
            dann.discriminator_hidden) == ("sgd", 1e-3, 0.9, True, "inverse_decay", 0.001, 0.75, 0.1, 1e-4, 1.0,
                                           1000, 1024)
    assert (dann.epochs, dann.steps_per_epoch, dann.batch_size) == (20, 500, 128)
    jumbot = build_config("jumbot")
    assert (jumbot.eta1, jumbot.eta2, jumbot.epsilon, jumbot.tau) == (0.01, 1.0, 0.01, 0.5)
    assert build_config("alda").pseudo_threshold == 0.7
    assert build_config("cdan_e").entropy_conditioning and not build_config("cdan").entropy_conditioning
    assert build_config("shift_aug").shift_aug and not build_config("source_only").shift_aug

"""DTW on the device, and MAD / C-MAD's alignment: against brute force on small inputs, the
transport plan's marginals, and the DTW offset of series with a known translation."""

from __future__ import annotations


import numpy as np
import pytest
import torch

from timematch.dtw import diagonal_path, dtw_path, path_offset
from timematch.methods.mad import exact_plan, pair_costs, path_costs


def _all_paths(T: int, U: int):
    """Every monotone path from (0, 0) to (T-1, U-1) with moves (1,1), (1,0), (0,1)."""
    def extend(path):
        s, t = path[-1]
        if (s, t) == (T - 1, U - 1):
            yield path
            return
        for ds, dt in ((1, 1), (1, 0), (0, 1)):
            if s + ds < T and t + dt < U:
                yield from extend(path + [(s + ds, t + dt)])
    yield from extend([(0, 0)])


@pytest.mark.parametrize("T,U", [(1, 1), (1, 4), (3, 3), (4, 5), (5, 3)])
def test_dtw_finds_the_least_cost_path_of_brute_force(T, U):
    generator = torch.Generator().manual_seed(T * 10 + U)
    costs = torch.rand(6, T, U, generator=generator)
    paths, totals = dtw_path(costs)
    for k in range(costs.shape[0]):
        best = min(sum(float(costs[k, s, t]) for s, t in p) for p in _all_paths(T, U))
        assert float(totals[k]) == pytest.approx(best, rel=1e-6)
        chosen = paths[k].nonzero().tolist()
        assert chosen[0] == [0, 0] and chosen[-1] == [T - 1, U - 1]
        assert sum(float(costs[k, s, t]) for s, t in chosen) == pytest.approx(best, rel=1e-6)
        for (s0, t0), (s1, t1) in zip(chosen, chosen[1:]):  # sorted cells of a path are its moves
            assert (s1 - s0, t1 - t0) in {(1, 1), (1, 0), (0, 1)}


def test_dtw_of_k_problems_at_once_is_each_alone():
    costs = torch.rand(5, 7, 9, generator=torch.Generator().manual_seed(1))
    paths, totals = dtw_path(costs)
    for k in range(5):
        alone, total = dtw_path(costs[k])
        assert torch.equal(alone, paths[k]) and float(total) == pytest.approx(float(totals[k]))


def test_dtw_rejects_an_empty_axis():
    with pytest.raises(ValueError, match="T, U >= 1"):
        dtw_path(torch.zeros(2, 0, 3))


def test_the_diagonal_path_and_the_offset_of_a_path():
    path = diagonal_path(4, 4)
    assert torch.equal(path, torch.eye(4))
    days = torch.tensor([0.0, 10.0, 20.0, 30.0])
    assert float(path_offset(path, days, days - 5.0)) == pytest.approx(5.0)


def test_pair_and_path_costs_match_the_pairwise_sums():
    generator = torch.Generator().manual_seed(2)
    n, m, T, U, D, K = 5, 4, 3, 6, 2, 3
    xs, xt = torch.randn(n, T, D, generator=generator), torch.randn(m, U, D, generator=generator)
    L = ((xs[:, None, :, None, :] - xt[None, :, None, :, :]) ** 2).sum(-1)  # (n, m, T, U)
    shared = dtw_path(torch.rand(T, U, generator=generator))[0]
    assert torch.allclose(pair_costs(xs, xt, shared), (L * shared).sum((-2, -1)), atol=1e-4)
    per_sample = dtw_path(torch.rand(n, T, U, generator=generator))[0]
    assert torch.allclose(pair_costs(xs, xt, per_sample), (L * per_sample[:, None]).sum((-2, -1)), atol=1e-4)
    plan = torch.rand(n, m, generator=generator)
    labels = torch.tensor([0, 2, 2, 1, 0])
    groups = torch.nn.functional.one_hot(labels, K).float()
    expected = torch.stack([(plan[:, :, None, None] * L * groups[:, c, None, None, None]).sum((0, 1))
                            for c in range(K)])
    assert torch.allclose(path_costs(xs, xt, plan, groups), expected, atol=1e-4)


def test_the_exact_plan_has_the_marginals_asked_for():
    rng = np.random.default_rng(3)
    weights = rng.random(7)
    weights /= weights.sum()
    plan = exact_plan(weights, rng.random((7, 5)))
    assert plan is not None
    assert np.allclose(plan.sum(1), weights) and np.allclose(plan.sum(0), 1 / 5)


def test_an_unsolvable_transport_is_reported_not_returned():
    cost = np.ones((3, 3))
    cost[0, 0] = np.nan
    assert exact_plan(np.full(3, 1 / 3), cost) is None


def _season(days: np.ndarray, dims: int = 4) -> np.ndarray:
    """Smooth per-date embeddings of a season: one bump per dimension, peaks spread over the year."""
    peaks = np.linspace(90, 270, dims)
    return np.exp(-((days[:, None] - peaks[None, :]) / 30.0) ** 2)


@pytest.mark.parametrize("per_class", [False, True])
@pytest.mark.parametrize("planted", [25, -15])
def test_mad_recovers_a_known_translation_as_its_path_offset(planted, per_class):
    """Target phenology d days later than the source's (d = s_target - s_source in the
    generator's convention is the negative: TimeMatch adds d to target positions): the DTW
    path's mean offset is d to within a grid step."""
    from timematch.methods.mad import MAD, MADConfig

    rng = np.random.default_rng(4)
    days = np.arange(0, 365, 5.0)
    n = m = 24
    labels = torch.as_tensor(rng.integers(0, 3, n))
    # a target parcel at day p shows what a source parcel shows at day p + d
    xs = torch.as_tensor(np.stack([_season(days) + rng.normal(0, 0.01, (len(days), 4)) for _ in range(n)])).float()
    xt = torch.as_tensor(np.stack([_season(days + planted) + rng.normal(0, 0.01, (len(days), 4))
                                   for _ in range(m)])).float()
    method = MAD.__new__(MAD)
    method.config = MADConfig(per_class_paths=per_class, beta=0.0)
    method.n_classes, method.paths = 3, None
    plan, paths, rounds, converged = method.align(xs, xt, labels, torch.zeros(n, m), np.full(n, 1 / n))
    assert plan is not None and converged and rounds >= 1
    gamma = torch.from_numpy(plan).float()
    offset = float(method._offset(paths, gamma, labels, torch.as_tensor(days), torch.as_tensor(days)))
    assert offset == pytest.approx(planted, abs=5.0)


# -- RAINCOAT's parts and the per-date contract ------------------------------------------------


def test_fourier_coefficients_at_irregular_dates_match_the_continuous_series():
    """cos(2 pi k p / 365) sampled at irregular, sample-specific dates: mode k has real part
    1/2 and the other modes about 0; a translation by d days keeps the amplitudes and turns
    mode k's phase by -2 pi k d / 365."""
    from timematch.models.frequency import fourier_coefficients

    rng = np.random.default_rng(5)
    days = torch.as_tensor(np.sort(rng.uniform(0, 365, (3, 120)), axis=1))
    signal = torch.cos(2 * np.pi * 2 * days / 365)[:, :, None]
    real, imag = fourier_coefficients(signal.double(), days, modes=5)
    assert torch.allclose(real[:, 2, 0], torch.full((3,), 0.5, dtype=torch.float64), atol=0.03)
    others = torch.cat([real[:, [1, 3, 4], 0], imag[:, :, 0]], 1)
    assert others.abs().max() < 0.05
    moved = torch.cos(2 * np.pi * 2 * (days + 20) / 365)[:, :, None]
    real2, imag2 = fourier_coefficients(moved.double(), days, modes=5)
    amplitude = lambda r, i: (r ** 2 + i ** 2).sqrt()  # noqa: E731
    assert torch.allclose(amplitude(real2, imag2)[:, 2], amplitude(real, imag)[:, 2], atol=0.03)
    turn = torch.atan2(imag2[:, 2, 0], real2[:, 2, 0]) - torch.atan2(imag[:, 2, 0], real[:, 2, 0])
    assert torch.allclose(torch.remainder(turn, 2 * np.pi), torch.full((3,), 2 * np.pi * 2 * 20 / 365,
                                                                    dtype=torch.float64), atol=0.05)


def test_raincoats_frequency_branch_starts_at_zero_and_rebuilds_from_the_models_records():
    """RAINCOAT attaches its branch to the classifier (an extension the classifier knows nothing
    of); the outputs do not change until it learns, DateOutputs carries its share, and the model
    rebuilt from its ``build_options`` and ``extension_options`` computes the same."""
    from timematch.methods import build_config, get_method
    from timematch.models import build_model
    from timematch.serving import rebuild_model

    torch.manual_seed(0)
    model = build_model("pse_ltae", num_classes=4).eval()
    x = torch.randn(3, 6, 8, 10)
    mask = torch.ones(3, 8, dtype=torch.bool)
    positions = torch.sort(torch.randint(0, 300, (3, 6)), 1).values
    before = model(x, mask, positions)[0]
    raincoat = get_method("raincoat")
    raincoat.extend_model(model, build_config("raincoat", {"fourier_modes": 4}))
    raincoat.extend_model(model, build_config("raincoat"))  # a model that has the branch keeps it
    assert list(model.extensions) == ["raincoat"]
    assert model.extension_options == {"raincoat": {"fourier_modes": 4, "fourier_channels": 16}}
    assert torch.equal(model(x, mask, positions)[0], before)
    with torch.no_grad():
        model.extensions["raincoat"].out.weight.normal_()
    out = model.forward_dates(x, mask, positions)
    assert torch.allclose(out.features - out.extensions["raincoat"], model.temporal_encoder(out.dates, positions),
                          atol=1e-4)
    rebuilt = rebuild_model("pse_ltae", 4, model.build_options, model.extension_options).eval()
    rebuilt.load_state_dict(model.state_dict())
    assert torch.allclose(rebuilt(x, mask, positions)[0], model(x, mask, positions)[0])
    assert not torch.allclose(model(x, mask, positions)[0], before)


def test_date_outputs_are_the_forward_pass_with_the_per_date_embeddings():
    from timematch.models import MODEL_NAMES, build_model

    x = torch.randn(2, 5, 8, 10)
    mask = torch.ones(2, 8, dtype=torch.bool)
    positions = torch.tensor([[1, 30, 60, 90, 200], [5, 40, 41, 100, 300]])
    for name in MODEL_NAMES:
        model = build_model(name, num_classes=3).eval()
        out = model.forward_dates(x, mask, positions)
        logits, features = model(x, mask, positions)
        assert torch.equal(out.logits, logits) and torch.equal(out.features, features)
        assert out.dates.shape == (2, 5, 128) and torch.equal(out.positions, positions)
        assert torch.equal(out.dates, model.encode_pixels(x, mask))


def test_the_sinkhorn_plan_is_pots():
    import ot

    from timematch.methods.raincoat import sinkhorn_plan

    rng = np.random.default_rng(6)
    cost = rng.random((6, 9))
    ours = sinkhorn_plan(torch.as_tensor(cost), epsilon=0.05, iterations=500).numpy()
    theirs = ot.sinkhorn(np.full(6, 1 / 6), np.full(9, 1 / 9), cost, reg=0.05, method="sinkhorn_log",
                         numItermax=5000, stopThr=1e-12)
    np.testing.assert_allclose(ours, theirs, atol=1e-6)
    np.testing.assert_allclose(ours.sum(1), 1 / 6, atol=1e-6)


def test_shared_dates_give_a_batch_one_time_axis(synthetic_root, tmp_path):
    from timematch.data.dataset import DataConfig, open_domains
    from timematch.data.views import DomainViews

    source, _ = open_domains(synthetic_root, "DK", "FR1", 0, DataConfig(min_parcels=10), tmp_path)
    views = DomainViews.on(source, "cpu", torch.Generator().manual_seed(0))
    batch = views.strong(views.draw_train(8), shared_dates=True)
    assert (batch.positions == batch.positions[:1]).all() and batch.positions.shape[1] == views.timesteps
    assert not (views.strong(views.draw_train(8)).positions == batch.positions[:1]).all()

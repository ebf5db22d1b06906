"""Device-built training batches (timematch.data.views) against today's host-built ones
(tests/support/reference_batches.py): the same content for the same draws, the same distributions.

On the CPU; tests/test_gpu.py builds the same views on a GPU.
"""

import numpy as np
import pytest
import torch

from tests.support.fake_dataset import write_two_tiles
from tests.support.host_reads import forbid_host_reads
from tests.support.reference_batches import ClassBalancedSampler, Reference
from timematch.data import views as views_module
from timematch.data.dataset import DataConfig, open_domains
from timematch.data.views import Batch, DomainViews, place_views



@pytest.fixture
def dataset(tmp_path):
    return write_two_tiles(tmp_path / "data")


def domains(root, **config):
    return open_domains(root, "DK", "FR1", fold=0, config=DataConfig(min_parcels=5, **config))


def as_numpy(batch: Batch) -> dict:
    return {k: v.numpy() for k, v in batch.tensors().items()}


def test_without_randomness_the_batches_are_identical(dataset, cache_dir):
    # every pixel (64 >= the largest parcel) and every date: nothing is drawn, so both
    # builders must give the very same arrays, padding layout included
    source, _ = domains(dataset, pixels_per_parcel=96, timesteps=40)
    parcels = source.split.train[:12]
    reference = Reference(source)
    device = DomainViews.on(source, "cpu", torch.Generator().manual_seed(0))
    rng = np.random.default_rng(0)
    for got, want in ((device.strong(torch.as_tensor(parcels)), reference.strong_batch(parcels, rng)),
                      (device.weak(torch.as_tensor(parcels)), reference.weak_batch(parcels, rng))):
        got = as_numpy(got)
        assert set(got) == set(want)
        for key in want:
            assert got[key].dtype == want[key].dtype, key
            np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def test_the_same_draws_give_the_same_content(dataset, cache_dir):
    source, _ = domains(dataset, pixels_per_parcel=16, timesteps=8)
    views = DomainViews.on(source, "cpu", torch.Generator().manual_seed(1))
    parcels = torch.as_tensor(source.split.train[:20])
    pixel_index, mask = views.sample_pixels(parcels)
    dates = views.sample_dates(len(parcels))
    got = as_numpy(views.gather(parcels, pixel_index, mask, dates))
    want = source._gather(parcels.numpy(), pixel_index.numpy(), mask.numpy(), dates.numpy())
    for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def test_views_shapes_masks_and_distinct_pixels(dataset, cache_dir):
    source, _ = domains(dataset, pixels_per_parcel=16, timesteps=8)
    views = DomainViews.on(source, "cpu", torch.Generator().manual_seed(0))
    parcels = torch.as_tensor(source.split.train[:10])
    batch = views.strong(parcels)
    assert batch.pixels.shape == (10, 8, 16, 10) and batch.pixels.dtype == torch.float32
    assert batch.mask.shape == (10, 16) and batch.positions.shape == (10, 8)
    assert (batch.positions.diff(dim=1) > 0).all()  # dates in time order
    n = torch.as_tensor(source.packed.n_pixels[parcels.numpy()])
    assert torch.equal(batch.mask.sum(1), n.clamp(max=16))
    assert batch.padded == bool(source.packed.n_pixels.min() < 16)
    index, mask = views.sample_pixels(parcels)
    for row, parcel in enumerate(parcels.tolist()):
        chosen = index[row][mask[row]]
        assert len(chosen.unique()) == len(chosen)
        assert (chosen >= source.packed.offsets[parcel]).all() and (chosen < source.packed.offsets[parcel + 1]).all()
        assert (index[row][~mask[row]] == source.packed.offsets[parcel]).all()  # padding repeats the first pixel
    assert views.weak(parcels).pixels.shape == (10, 20, 16, 10)


def _pixel_frequencies(draw, parcel_start, count, size, times):
    hits = np.zeros(count)
    for _ in range(times):
        chosen = draw()
        assert len(np.unique(chosen)) == size
        hits[np.asarray(chosen) - parcel_start] += 1
    return hits / times


def test_pixel_and_date_draws_follow_the_reference_distribution(dataset, cache_dir):
    source, _ = domains(dataset, pixels_per_parcel=8, timesteps=6)
    big = int(np.argmax(source.packed.n_pixels))
    count, start = int(source.packed.n_pixels[big]), int(source.packed.offsets[big])
    views = DomainViews.on(source, "cpu", torch.Generator().manual_seed(2))
    rng = np.random.default_rng(2)
    from tests.support.reference_batches import sample_pixels

    parcel = torch.tensor([big])
    device_freq = _pixel_frequencies(lambda: views.sample_pixels(parcel)[0][0].numpy(), start, count, 8, 3000)
    host_freq = _pixel_frequencies(lambda: sample_pixels(source.packed, np.array([big]), 8, rng)[0][0], start,
                                   count, 8, 3000)
    expected = 8 / count  # every pixel equally likely
    spread = 4 * np.sqrt(expected * (1 - expected) / 3000)
    assert np.abs(device_freq - expected).max() < spread
    assert np.abs(host_freq - expected).max() < spread
    dates = views.sample_dates(4000).numpy()
    assert (np.diff(dates, axis=1) > 0).all()
    date_freq = np.bincount(dates.ravel(), minlength=20) / 4000
    assert np.abs(date_freq - 6 / 20).max() < 4 * np.sqrt(0.3 * 0.7 / 4000)


def test_huge_parcels_keep_uniform_marginals(dataset, cache_dir, monkeypatch):
    # parcels above KEY_WIDTH_CAP pixels are drawn by strata: each pixel still has probability size / n
    monkeypatch.setattr(views_module, "KEY_WIDTH_CAP", 24)
    source, _ = domains(dataset, pixels_per_parcel=8, timesteps=6)
    big = int(np.argmax(source.packed.n_pixels))
    count, start = int(source.packed.n_pixels[big]), int(source.packed.offsets[big])
    assert count > 24
    views = DomainViews.on(source, "cpu", torch.Generator().manual_seed(3))
    assert views.stratified
    freq = _pixel_frequencies(lambda: views.sample_pixels(torch.tensor([big]))[0][0].numpy(), start, count, 8, 4000)
    # within one pixel's share of a stratum of the exact 8 / count
    assert np.abs(freq - 8 / count).max() < 8 / count * (24 / count) + 4 * np.sqrt(8 / count / 4000)


def test_shift_augmentation(dataset, cache_dir):
    source, _ = domains(dataset, timesteps=20)
    views = DomainViews.on(source, "cpu", torch.Generator().manual_seed(1))
    parcels = torch.as_tensor(np.repeat(source.split.train[:1], 4000))
    base = torch.as_tensor(source.packed.positions)[None, :]
    shifted = (views.strong(parcels, 60, 1.0).positions - base).numpy()
    assert (shifted == shifted[:, :1]).all()  # one shift per sample, all dates alike
    assert shifted.min() == -60 and shifted.max() == 60
    assert abs(shifted[:, 0].std() - np.sqrt((121**2 - 1) / 12)) < 2  # uniform on [-60, 60]
    half = (views.strong(parcels, 60, 0.5).positions - base).numpy()[:, 0]
    assert abs((half == 0).mean() - (0.5 + 0.5 / 121)) < 0.03
    assert (views.strong(parcels).positions == base).all()


def test_class_balanced_draws_match_the_reference():
    labels = np.array([0] * 90 + [1] * 10)

    class Fake:  # a domain holding just what the samplers read
        pass

    fake_packed = type("P", (), {"tile": "x/y/2017"})()
    domain = Fake()
    domain.packed, domain.tile, domain.labels = fake_packed, "x/y/2017", labels
    domain.config = DataConfig()
    domain.split = type("S", (), {"train": np.arange(100)})()
    domain.labelled = lambda part: np.arange(100)
    domain.normalizer = type("N", (), {"mean": np.zeros(10, np.float32), "std": np.ones(10, np.float32)})()
    tile = views_module.TileTensors("x/y/2017", torch.zeros(1, 10, dtype=torch.int16), torch.zeros(100, dtype=torch.int64),
                                    torch.ones(100, dtype=torch.int64), torch.arange(1), torch.zeros(100, 4), 1, 1, 1)
    views = DomainViews(domain, tile, torch.Generator().manual_seed(0))
    balanced = labels[views.draw_labelled(20000, balanced=True).numpy()].mean()
    plain = labels[views.draw_labelled(20000, balanced=False).numpy()].mean()
    reference = labels[ClassBalancedSampler(labels, np.arange(100))(20000, np.random.default_rng(0))].mean()
    assert abs(balanced - 0.5) < 0.02 and abs(reference - 0.5) < 0.02
    assert abs(plain - 0.1) < 0.02
    assert set(views.draw_train(500).tolist()) <= set(range(100))


def test_views_read_nothing_back_to_the_host(dataset, cache_dir):
    source, target = domains(dataset, pixels_per_parcel=16, timesteps=8)
    placed = place_views(source, target, torch.device("cpu"), seed=0)
    assert placed.inline and "host memory" in placed.placement  # on a CPU the step builds them itself
    with forbid_host_reads():
        for views in (placed.source, placed.target):
            parcels = views.draw_labelled(8, balanced=True)
            views.strong(parcels, 30, 0.5)
            views.weak(views.draw_train(8))


def test_two_domains_of_one_tile_share_its_tensors(dataset, cache_dir):
    source, target = open_domains(dataset, "DK", "DK", fold=0, config=DataConfig(min_parcels=5))
    placed = place_views(source, target, torch.device("cpu"))
    assert placed.source.tile is placed.target.tile


def test_the_tiles_of_several_trials_on_one_gpu_keep_to_their_shares():
    from timematch.data.views import TILE_MEMORY_SHARE, tile_budget

    total = 80 * 10**9  # an H100's memory
    tile = 12 * 10**9  # the source and target tiles of one trial, as TileTensors.nbytes counts them
    assert tile_budget(1.0, total) == int(TILE_MEMORY_SHARE * total) >= tile  # alone: on the GPU
    for trials in (2, 4, 8):  # Ray places trials of 1/K GPU each on it
        budget = tile_budget(1.0 / trials, total)
        resident = [tile <= budget] * trials
        assert sum(tile for r in resident if r) <= TILE_MEMORY_SHARE * total
    assert tile <= tile_budget(0.5, total) and tile > tile_budget(0.25, total)  # 4 trials: host memory
    assert tile_budget(2.0, total) == tile_budget(1.0, total)  # a trial's tiles live on one of its GPUs

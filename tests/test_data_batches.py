"""Packed cache, batches, masks, shift augmentation, class-balanced sampling."""

import os

import numpy as np
import pytest

from tests.fake_dataset import write_parcel, write_tile
from timematch.data.dataset import ClassBalancedSampler, DataConfig, open_domains
from timematch.data.format import TileReader
from timematch.data.packed import PackedTile
from timematch.errors import DatasetError

DK_LABELS = [10] * 12 + [251] * 15 + [1] * 8 + [216] * 3 + [999999] * 2  # winter_barley, meadow, spring_barley, ...
FR_LABELS = ["ORH"] * 10 + ["PPH"] * 12 + ["ORP"] * 6 + ["MIS"] * 4


@pytest.fixture
def dataset(tmp_path):
    root = tmp_path / "data"
    write_tile(root, "denmark/32VNH/2017", labels=DK_LABELS, n_dates=20, seed=1)
    write_tile(root, "france/30TXT/2017", labels=FR_LABELS, n_dates=25, seed=2)
    return root


def test_packed_cache_matches_reader_and_stays_out_of_dataset(dataset, cache_dir):
    before = sorted(p for p in dataset.rglob("*"))
    packed = PackedTile.open(dataset, "DK")
    reader = TileReader(dataset, "DK")
    assert len(packed) == len(reader)
    for i in range(len(packed)):
        assert np.array_equal(packed.parcel(i), reader.read_parcel(i))
    assert packed.positions.tolist() == reader.positions.tolist()
    assert packed.codes[0] == "10"
    assert isinstance(packed.pixels, np.memmap)
    assert str(packed.path).startswith(str(cache_dir))
    assert sorted(p for p in dataset.rglob("*")) == before


def test_cache_invalidated_when_source_changes(dataset, cache_dir):
    first = PackedTile.open(dataset, "DK")
    built = (first.path / "manifest.json").stat().st_mtime_ns
    assert (PackedTile.open(dataset, "DK").path / "manifest.json").stat().st_mtime_ns == built  # reused
    new = np.full((20, 10, first.n_pixels[0]), 7, np.uint16)
    write_parcel(dataset / "denmark/32VNH/2017/data/0.zarr", new)
    os.utime(dataset / "denmark/32VNH/2017/data/0.zarr/0.0.0", ns=(1, 1))  # a change even at coarse mtime
    again = PackedTile.open(dataset, "DK")
    assert np.array_equal(again.parcel(0), new)


def test_broken_parcel_fails_packing_with_its_path(dataset, cache_dir):
    import shutil

    shutil.rmtree(dataset / "denmark/32VNH/2017/data/5.zarr")
    with pytest.raises(DatasetError, match=r"5\.zarr: parcel array is missing"):
        PackedTile.open(dataset, "DK")
    assert not list((cache_dir / "packed").glob("denmark*/manifest.json"))


def test_domains_classes_labels_and_errors(dataset, cache_dir):
    config = DataConfig(min_parcels=5, n_folds=2)
    source, target = open_domains(dataset, "DK", "FR1", fold=0, config=config)
    assert source.classes == ["meadow", "spring_barley", "winter_barley"]
    assert target.classes == source.classes
    # France's corn is not a source class and unknown is not in the list: label -1
    corn = target.class_names == "corn"
    assert (target.labels[corn] == -1).all()
    assert (target.labels[~corn] >= 0).all()
    with pytest.raises(DatasetError, match="only 1 class"):
        open_domains(dataset, "DK", "FR1", fold=0, config=DataConfig(min_parcels=13))


def test_strong_weak_and_eval_batches(dataset, cache_dir):
    config = DataConfig(min_parcels=5, pixels_per_parcel=16, timesteps=8)
    source, _ = open_domains(dataset, "DK", "FR1", fold=0, config=config)
    rng = np.random.default_rng(0)
    parcels = source.split.train[:10]
    batch = source.strong_batch(parcels, rng)
    assert batch["pixels"].shape == (10, 8, 16, 10) and batch["pixels"].dtype == np.float32
    assert batch["mask"].shape == (10, 16)
    assert batch["positions"].shape == (10, 8)
    assert (np.diff(batch["positions"], axis=1) > 0).all()  # dates in time order
    n = source.packed.n_pixels[parcels]
    assert (batch["mask"].sum(1) == np.minimum(n, 16)).all()
    # sampled pixels are distinct pixels of the parcel
    index, mask = __import__("timematch.data.dataset", fromlist=["x"]).sample_pixels(source.packed, parcels, 16, rng)
    for row, parcel in enumerate(parcels):
        chosen = index[row][mask[row]]
        assert len(np.unique(chosen)) == len(chosen)
        assert (chosen >= source.packed.offsets[parcel]).all() and (chosen < source.packed.offsets[parcel + 1]).all()
    weak = source.weak_batch(parcels, rng)
    assert weak["pixels"].shape == (10, 20, 16, 10)
    seen = 0
    for eval_batch in source.eval_batches(source.split.test):
        width = eval_batch["mask"].shape[1]
        assert eval_batch["pixels"].shape[1:] == (20, width, 10)
        assert (eval_batch["mask"].sum(1) == source.packed.n_pixels[eval_batch["index"]]).all()
        seen += len(eval_batch["index"])
    assert seen == len(source.split.test)


def test_eval_view_holds_exact_normalised_pixels(dataset, cache_dir):
    source, _ = open_domains(dataset, "DK", "FR1", fold=0, config=DataConfig(min_parcels=5))
    batch = next(source.eval_batches(source.split.test[:1]))
    parcel = source.split.test[0]
    raw = source.packed.parcel(parcel)  # (T, C, S)
    expected = source.normalizer(raw.transpose(0, 2, 1))
    assert np.allclose(batch["pixels"][0][:, : raw.shape[2]], expected, atol=1e-5)


def test_shift_augmentation(dataset, cache_dir):
    config = DataConfig(min_parcels=5, timesteps=20)
    source, _ = open_domains(dataset, "DK", "FR1", fold=0, config=config)
    rng = np.random.default_rng(1)
    parcels = np.repeat(source.split.train[:1], 200)
    shifted = source.strong_batch(parcels, rng, 60, 1.0)["positions"] - source.packed.positions[None, :]
    assert (shifted == shifted[:, :1]).all()  # one shift per sample, all dates alike
    assert shifted.min() >= -60 and shifted.max() <= 60 and shifted.std() > 20
    plain = source.strong_batch(parcels, rng)["positions"]
    assert (plain == source.packed.positions[None, :]).all()


def test_class_balanced_sampler():
    labels = np.array([0] * 90 + [1] * 10)
    sampler = ClassBalancedSampler(labels, np.arange(100))
    drawn = labels[sampler(20000, np.random.default_rng(0))]
    assert abs(drawn.mean() - 0.5) < 0.02
    plain = ClassBalancedSampler(labels, np.arange(100), balanced=False)
    assert abs(labels[plain(20000, np.random.default_rng(0))].mean() - 0.1) < 0.02

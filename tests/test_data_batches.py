"""Packed cache, domains, evaluation batches. (Training views: tests/test_data_views.py.)"""

import os

import numpy as np
import pytest

from tests.support.fake_dataset import write_parcel, write_two_tiles
from timematch.data.dataset import DataConfig, open_domains
from timematch.data.format import TileReader
from timematch.data.packed import PackedTile
from timematch.errors import DatasetError



@pytest.fixture
def dataset(tmp_path):
    return write_two_tiles(tmp_path / "data")


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


def test_eval_batches(dataset, cache_dir):
    source, _ = open_domains(dataset, "DK", "FR1", fold=0, config=DataConfig(min_parcels=5))
    seen = 0
    for eval_batch in source.eval_batches(source.split.test):
        width = eval_batch["mask"].shape[1]
        assert eval_batch["pixels"].shape[1:] == (20, width, 10)
        assert (eval_batch["mask"].sum(1) == source.packed.n_pixels[eval_batch["index"]]).all()
        seen += len(eval_batch["index"])
    assert seen == len(source.split.test)


def test_eval_batches_are_built_once_per_parcel_set_and_normaliser(dataset, cache_dir):
    """Every epoch, and every member of an array, evaluates the same parcels: their batches are
    kept (within a byte budget) and handed out again; another normaliser gets its own."""
    from timematch.data import dataset as module
    from timematch.data.dataset import EvalBatchCache, Normalizer

    source, _ = open_domains(dataset, "DK", "FR1", fold=0, config=DataConfig(min_parcels=5))
    again, _ = open_domains(dataset, "DK", "FR1", fold=0, config=DataConfig(min_parcels=5))
    first = list(source.eval_batches(source.split.test))
    assert all(a is b for a, b in zip(first, again.eval_batches(source.split.test)))  # another Domain, same tile
    assert list(source.eval_batches(source.split.val))[0] is not first[0]
    source.normalizer = Normalizer(source.normalizer.mean + 1, source.normalizer.std)
    shifted = list(source.eval_batches(source.split.test))
    assert shifted[0] is not first[0] and np.allclose(shifted[0]["pixels"], first[0]["pixels"] - 1 / source.normalizer.std,
                                                      atol=1e-5)
    size = sum(a.nbytes for b in first for a in b.values() if isinstance(a, np.ndarray))
    small = EvalBatchCache(budget=size)  # room for one parcel set
    small.get(("a",), lambda: iter(first))
    assert small.get(("a",), lambda: iter([])) == first
    small.get(("b",), lambda: iter(first))
    assert small.get(("a",), lambda: iter([])) == []  # dropped for b, built again
    assert module.EVAL_BATCHES.budget == 512 * 2**20


def test_eval_view_holds_exact_normalised_pixels(dataset, cache_dir):
    source, _ = open_domains(dataset, "DK", "FR1", fold=0, config=DataConfig(min_parcels=5))
    batch = next(source.eval_batches(source.split.test[:1]))
    parcel = source.split.test[0]
    raw = source.packed.parcel(parcel)  # (T, C, S)
    expected = source.normalizer(raw.transpose(0, 2, 1))
    assert np.allclose(batch["pixels"][0][:, : raw.shape[2]], expected, atol=1e-5)

"""Packed cache, domains, evaluation batches. (Training views: tests/test_data_views.py.)"""

import hashlib
import os

import numpy as np
import pytest

from tests.support.fake_dataset import write_parcel, write_two_tiles
from timematch.data.dataset import DataConfig, open_domains
from timematch.data import packed as packing
from timematch.data.format import ONE_CHUNK, TileReader
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


#: sha256 over the packed arrays (pixels, offsets, geom, ids, blocks, codes, positions; their
#: .npy files in that order) of the generator's 300-parcel DK and FR1 tiles (seed 0), as the
#: packing before issue 34 (one zarr.open_array per parcel, commit f7e6470) wrote them.
PACKED_BEFORE_34 = {
    "DK": "da929e547e8736be658aaaa7243ba8dcd84dde771e88cfe125e7b3f5890c7977",
    "FR1": "41c0f4f95b124603b58a6fe1453b1e969a3438c985ae527c554beb90a820ba82",
}


def test_packing_writes_the_same_bytes_as_before(tmp_path, cache_dir):
    from timematch.data.synthetic import generate_dataset

    generate_dataset(tmp_path / "data", parcels_per_tile=300, tiles=["DK", "FR1"])
    for tile, expected in PACKED_BEFORE_34.items():
        packed = PackedTile.open(tmp_path / "data", tile)
        digest = hashlib.sha256()
        for name in packing._ARRAYS:
            digest.update((packed.path / f"{name}.npy").read_bytes())
        assert digest.hexdigest() == expected, tile


def test_one_chunk_reader_reads_what_zarr_reads_and_leaves_the_rest_to_zarr(dataset):
    import zarr

    reader = TileReader(dataset, "DK")
    for i in range(len(reader)):
        direct = ONE_CHUNK.read(reader.parcel_path(i))
        assert direct is not None and direct.flags.writeable
        assert np.array_equal(direct, np.asarray(zarr.open_array(str(reader.parcel_path(i)), mode="r")[...]))
    # an array of several chunks is zarr's to read; the reader still returns the same pixels
    pixels = reader.read_parcel(2)
    path = reader.parcel_path(2)
    array = zarr.create_array(store=str(path), shape=pixels.shape, dtype=pixels.dtype,
                              chunks=(pixels.shape[0] // 2 or 1, *pixels.shape[1:]), zarr_format=2, overwrite=True)
    array[...] = pixels
    assert ONE_CHUNK.read(path) is None
    assert np.array_equal(TileReader(dataset, "DK").read_parcel(2), pixels)
    # a chunk that does not decode is zarr's error, naming the file
    (reader.parcel_path(3) / "0.0.0").write_bytes(b"not blosc")
    assert ONE_CHUNK.read(reader.parcel_path(3)) is None
    with pytest.raises(DatasetError, match=r"3\.zarr: corrupt or unreadable zarr array"):
        reader.read_parcel(3)


def test_packing_reports_progress_while_it_runs(dataset, cache_dir, monkeypatch):
    monkeypatch.setattr(packing, "PROGRESS_SECONDS", 0.0)
    monkeypatch.setattr(packing, "PACK_BLOCK", 1)
    lines = []
    PackedTile.open(dataset, "DK", progress=lines.append)
    assert lines[0].startswith("packing denmark/32VNH/2017:") and "parcels" in lines[0]
    assert any(" parcels/s, about " in line and "%)" in line for line in lines[1:-1]), lines
    assert lines[-1].startswith("packed denmark/32VNH/2017 in ")


def test_trial_workers_trust_the_fingerprints_the_driver_computed(dataset, cache_dir, monkeypatch):
    calls = []
    original = packing.fingerprint
    monkeypatch.setattr(packing, "fingerprint", lambda reader: calls.append(reader.tile) or original(reader))
    monkeypatch.setattr(packing, "DRIVER_FINGERPRINTS", {})
    checked = PackedTile.open(dataset, "DK").checked()  # the driver packs and checks (launcher.pack_tiles)
    PackedTile.open(dataset, "DK")
    assert len(calls) == 2  # by default every open checks the source files
    assert list(checked) == [str((dataset / "denmark/32VNH/2017").resolve())]
    packing.trust_fingerprints(checked)  # a trial worker (runner.trainables.start_worker)
    tile = PackedTile.open(dataset, "DK")
    assert len(calls) == 2 and tile.tile == "denmark/32VNH/2017" and tile.country == "denmark" and len(tile) > 0
    PackedTile.open(dataset, "FR1")  # a tile the driver did not check: checked
    assert len(calls) == 3
    packing.trust_fingerprints({str((dataset / "denmark/32VNH/2017").resolve()): "another"})  # rebuilt since
    PackedTile.open(dataset, "DK")
    assert len(calls) == 4


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
    # a set larger than the budget (a large tile's test split) is streamed as it is built, not held
    made = []

    def build():
        for batch in first:
            made.append(batch)
            yield batch

    streamed = small.get(("c",), build, least_bytes=size + 1)
    assert made == [] and next(iter(streamed)) is first[0] and len(made) == 1
    assert list(small.get(("c",), lambda: iter([]), least_bytes=size + 1)) == []  # never kept


def test_eval_view_holds_exact_normalised_pixels(dataset, cache_dir):
    source, _ = open_domains(dataset, "DK", "FR1", fold=0, config=DataConfig(min_parcels=5))
    batch = next(source.eval_batches(source.split.test[:1]))
    parcel = source.split.test[0]
    raw = source.packed.parcel(parcel)  # (T, C, S)
    expected = source.normalizer(raw.transpose(0, 2, 1))
    assert np.allclose(batch["pixels"][0][:, : raw.shape[2]], expected, atol=1e-5)

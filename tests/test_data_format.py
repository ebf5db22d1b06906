"""The published format: reader, restricted unpickler, class mapping, folds, bad input."""

import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest

from tests.support.fake_dataset import write_parcel, write_tile
from timematch.data.classes import CropCodes, label_indices, select_classes
from timematch.data.format import TileReader, date_positions, read_metadata, safe_load_pickle
from timematch.data.splits import make_folds, make_split
from timematch.errors import ConfigError, DatasetError


class Exploit:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_reader_reads_blosc_lz4_zarr2_parcels(tmp_path):
    path = write_tile(tmp_path)
    assert (path / "data" / "0.zarr" / ".zarray").is_file()
    reader = TileReader(tmp_path, "DK")
    assert len(reader) == 7
    assert reader.country == "denmark"
    for i, parcel in enumerate(reader.parcels):
        pixels = reader.read_parcel(i)
        assert pixels.dtype == np.uint16
        assert pixels.shape == (12, 10, parcel["n_pixels"])


def test_positions_are_days_after_start_date():
    assert date_positions([20170101, 20170102, 20170301, 20171231], 20170101).tolist() == [0, 1, 59, 364]
    assert date_positions([20170110], "20170101").tolist() == [9]


def test_restricted_unpickler_refuses_globals(tmp_path):
    with pytest.raises(pickle.UnpicklingError, match="os.system|posix.system"):
        safe_load_pickle(pickle.dumps(Exploit()))
    path = write_tile(tmp_path)
    (path / "meta" / "metadata.pkl").write_bytes(pickle.dumps({"start_date": 1, "dates": [1], "parcels": Exploit()}))
    with pytest.raises(DatasetError, match="metadata.pkl.*refusing"):
        TileReader(tmp_path, "DK")


def test_restricted_unpickler_admits_numpy_data():
    data = {"a": np.arange(3), "b": np.float32(1.5), "c": [1, "x", (2.0,)]}
    loaded = safe_load_pickle(pickle.dumps(data))
    assert loaded["a"].tolist() == [0, 1, 2] and loaded["b"] == 1.5 and loaded["c"] == [1, "x", (2.0,)]


def test_crop_codes_split_and_merge_seasons():
    dk = CropCodes("denmark")
    assert dk.class_of(10) == "winter_barley"
    assert dk.class_of("1") == "spring_barley"
    assert dk.class_of(999999) == "unknown"
    assert CropCodes("denmark", merge_seasons=True).class_of(10) == "barley"
    fr = CropCodes("france")
    assert fr.class_of("MIS") == "corn"
    at = CropCodes("austria")
    assert at.class_of("105") == at.class_of(105) == "corn"
    with pytest.raises(DatasetError, match="unknown country"):
        CropCodes("spain")


def test_class_rule_and_unknown_target_classes():
    names = ["meadow"] * 5 + ["corn"] * 3 + ["unknown"] * 1 + ["peas"] * 2
    assert select_classes(names, min_parcels=3) == ["corn", "meadow"]
    assert select_classes(names, min_parcels=1) == ["corn", "meadow", "peas", "unknown"]
    # a target class outside the list counts as unknown, or -1 when unknown is not a class
    assert label_indices(["corn", "rye"], ["corn", "unknown"]) == [0, 1]
    assert label_indices(["corn", "rye"], ["corn", "meadow"]) == [0, -1]


def test_folds_disjoint_complete_deterministic():
    folds = make_folds(1000, n_folds=3, seed=7, tile="x")
    for split in folds:
        parts = [split.train, split.val, split.test]
        assert sum(len(p) for p in parts) == 1000
        assert len(np.unique(np.concatenate(parts))) == 1000
        assert (len(split.train), len(split.val), len(split.test)) == (700, 100, 200)
    assert not np.array_equal(folds[0].test, folds[1].test)
    again = make_split(1000, 1, seed=7, tile="x")
    assert np.array_equal(again.train, folds[1].train)
    assert not np.array_equal(make_split(1000, 1, seed=8, tile="x").train, again.train)
    with pytest.raises(ConfigError, match="fold"):
        make_split(1000, 3, n_folds=3)


# -- bad input --------------------------------------------------------------------------


def test_missing_root_and_tile(tmp_path):
    with pytest.raises(DatasetError, match="does not exist.*--data-root"):
        TileReader(tmp_path / "nope", "DK")
    write_tile(tmp_path)
    with pytest.raises(DatasetError, match="tile folder is missing.*denmark/32VNH/2017"):
        TileReader(tmp_path, "FR1")


def test_unknown_country_or_tile_name(tmp_path):
    with pytest.raises(ConfigError, match="unknown tile 'spain/1/2017'"):
        TileReader(tmp_path, "spain/1/2017")


def test_missing_and_malformed_metadata(tmp_path):
    path = write_tile(tmp_path)
    meta = path / "meta" / "metadata.pkl"
    good = meta.read_bytes()
    meta.write_bytes(good[:20])
    with pytest.raises(DatasetError, match="metadata.pkl: not a readable metadata pickle"):
        TileReader(tmp_path, "DK")
    meta.write_bytes(pickle.dumps({"dates": [1]}))
    with pytest.raises(DatasetError, match="lacks key"):
        read_metadata(meta)
    meta.unlink()
    with pytest.raises(DatasetError, match="metadata file is missing"):
        TileReader(tmp_path, "DK")


def test_missing_corrupt_and_misshaped_parcels(tmp_path):
    path = write_tile(tmp_path)
    reader = TileReader(tmp_path, "DK")
    import shutil

    shutil.rmtree(path / "data" / "1.zarr")
    with pytest.raises(DatasetError, match=r"1\.zarr: parcel array is missing"):
        reader.read_parcel(1)
    (path / "data" / "2.zarr" / ".zarray").write_text("{not json")
    with pytest.raises(DatasetError, match=r"2\.zarr: corrupt or unreadable"):
        reader.read_parcel(2)
    write_parcel(path / "data" / "3.zarr", np.zeros((12, 10, 999), np.uint16))
    with pytest.raises(DatasetError, match=r"3\.zarr: shape \(12, 10, 999\) disagrees"):
        reader.read_parcel(3)


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "timematch.data", *args], capture_output=True, text=True, cwd=cwd)


def test_info_cli(tmp_path):
    write_tile(tmp_path)
    write_tile(tmp_path, "france/30TXT/2017", labels=["MIS", "MIS", "PPH", "XXX"], n_dates=9)
    out = run_cli("info", str(tmp_path), "--json")
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert set(info) == {"denmark/32VNH/2017", "france/30TXT/2017"}
    fr = info["france/30TXT/2017"]
    assert fr["parcels"] == 4 and fr["dates"] == 9
    assert fr["class_counts"] == {"corn": 2, "meadow": 1, "unknown": 1}
    assert fr["unknown_codes"] == {"XXX": 1}
    text = run_cli("info", str(tmp_path))
    assert text.returncode == 0 and "parcels 7" in text.stdout


def test_info_cli_errors_without_traceback(tmp_path):
    out = run_cli("info", str(tmp_path / "missing"))
    assert out.returncode == 2
    assert "does not exist" in out.stderr and "Traceback" not in out.stderr
    path = write_tile(tmp_path)
    (path / "meta" / "metadata.pkl").write_bytes(b"garbage")
    out = run_cli("info", str(tmp_path))
    assert out.returncode == 2 and "metadata.pkl" in out.stderr and "Traceback" not in out.stderr

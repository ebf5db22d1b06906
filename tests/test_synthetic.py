"""The synthetic benchmark generator: published layout and schema, determinism, planted shifts."""

import hashlib
import json
import pickle
import pickletools
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import zarr

from timematch.data import synthetic
from timematch.data.synthetic import simulation, writing
from timematch.data.synthetic.codes import CLASS_SHARES
from timematch.data.synthetic.phenology import PHENOLOGY
from timematch.data.synthetic.writing import COMPRESSOR, write_parcel_array
from timematch.data.classes import CropCodes, select_classes
from timematch.data.format import TileReader, date_positions, safe_load_pickle
from timematch.data.tiles import TILES
from timematch.errors import ConfigError, DatasetError

N_PARCELS = 60
BRIGHT_B02 = 2500  # clear land in these tiles stays below this blue reflectance (x 10000)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    summary = synthetic.generate_dataset(root, parcels_per_tile=N_PARCELS, seed=0)
    return root, summary


def all_files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def parcel_ndvi(reader: TileReader, index: int) -> np.ndarray:
    """Median NDVI over the pixels of a parcel, per date (T,)."""
    pixels = reader.read_parcel(index).astype(np.float64)
    red, nir = pixels[:, 2], pixels[:, 6]
    return np.median((nir - red) / (nir + red), axis=1)


def green_season(reader: TileReader, class_name: str) -> tuple[float, float]:
    """Days where a class's mean NDVI (clear dates) crosses half its range going up and down."""
    codes = CropCodes(reader.country)
    members = [i for i, p in enumerate(reader.parcels) if codes.class_of(p["label"]) == class_name]
    assert len(members) >= 3, f"{reader.tile}: too few {class_name} parcels for the check"
    clear = np.asarray(reader.metadata["cloudy_pct"]) <= 20
    days = reader.positions[clear].astype(np.float64)
    curve = np.mean([parcel_ndvi(reader, i)[clear] for i in members], axis=0)
    level = (curve.min() + curve.max()) / 2
    above = curve > level
    rise = int(np.flatnonzero(above[1:] & ~above[:-1])[0])
    fall = int(np.flatnonzero(~above[1:] & above[:-1])[-1])

    def crossing(k: int) -> float:
        return float(np.interp(level, sorted([curve[k], curve[k + 1]]),
                               [days[k], days[k + 1]] if curve[k] < curve[k + 1] else [days[k + 1], days[k]]))

    return crossing(rise), crossing(fall)


def test_constants():
    assert synthetic.TILE_CALENDAR_SIZES == {"DK": 52, "FR1": 62, "FR2": 39, "AT1": 58}
    assert synthetic.DEFAULT_SHIFTS == {"DK": 0, "FR1": 25, "FR2": 15, "AT1": 10}
    assert synthetic.GROUND_TRUTH_FILE == "synthetic_ground_truth.json"
    assert 1000 <= synthetic.DEFAULT_PARCELS_PER_TILE <= 3000


def test_layout_and_metadata_schema(dataset):
    root, summary = dataset
    assert summary["parcels"] == 4 * N_PARCELS and set(summary["tiles"]) == set(TILES)
    for short, tile in TILES.items():
        path = root / tile
        raw = (path / "meta" / "metadata.pkl").read_bytes()
        # plain builtins only: no global is referenced, so the restricted unpickler always admits it
        assert not [op for op, _, _ in pickletools.genops(raw) if "GLOBAL" in op.name or op.name == "REDUCE"]
        meta = safe_load_pickle(raw)
        assert meta == pickle.loads(raw)
        assert set(meta) == {"start_date", "end_date", "dates", "cloudy_pct", "parcels"}
        assert (meta["start_date"], meta["end_date"]) == (20170101, 20171231)
        dates = meta["dates"]
        assert len(dates) == synthetic.TILE_CALENDAR_SIZES[short]
        assert all(type(d) is int for d in dates) and dates == sorted(set(dates))
        positions = date_positions(dates, meta["start_date"])
        assert positions[0] >= 0 and positions[-1] <= 364
        assert len(meta["cloudy_pct"]) == len(dates)
        assert all(type(c) is float and 0.0 <= c <= 80.0 for c in meta["cloudy_pct"])
        assert max(meta["cloudy_pct"]) > 40 and min(meta["cloudy_pct"]) < 5
        parcels = meta["parcels"]
        assert len(parcels) == N_PARCELS
        assert len({p["id"] for p in parcels}) == N_PARCELS
        for parcel in parcels:
            assert set(parcel) == {"id", "label", "n_pixels", "block", "geometric_features"}
            assert type(parcel["id"]) is int and type(parcel["block"]) is int and parcel["block"] >= 0
            assert type(parcel["n_pixels"]) is int and 10 <= parcel["n_pixels"] <= 500
            perimeter, area, ratio, cover = parcel["geometric_features"]
            assert all(type(x) is float for x in parcel["geometric_features"])
            assert area >= 100 * parcel["n_pixels"] and perimeter > 4 * np.sqrt(area) * 0.99
            assert ratio == pytest.approx(perimeter / area, rel=1e-3) and 0 < cover <= 1
        assert sorted(p.name for p in (path / "data").iterdir()) == sorted(f"{i}.zarr" for i in range(N_PARCELS))
        assert TileReader(root, short).positions.tolist() == positions.tolist()


def test_parcels_are_one_chunk_zarr_format_2_uint16(dataset):
    root, _ = dataset
    for short, tile in TILES.items():
        reader = TileReader(root, short)
        n_dates = len(reader.dates)
        for i in (0, 7, N_PARCELS - 1):
            folder = root / tile / "data" / f"{i}.zarr"
            zarray = json.loads((folder / ".zarray").read_text())
            n_pixels = reader.parcels[i]["n_pixels"]
            assert zarray["zarr_format"] == 2 and zarray["dtype"] == "<u2"
            assert zarray["shape"] == zarray["chunks"] == [n_dates, 10, n_pixels]
            assert sorted(p.name for p in folder.iterdir()) == [".zarray", "0.0.0"]
            array = zarr.open(str(folder), mode="r")
            assert array.dtype == np.uint16 and array.shape == (n_dates, 10, n_pixels)
            assert reader.read_parcel(i).shape == (n_dates, 10, n_pixels)


def test_parcel_files_are_what_zarr_writes(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 9000, (5, 10, 7), dtype=np.uint16)
    ours, theirs = tmp_path / "ours.zarr", tmp_path / "theirs.zarr"
    write_parcel_array(ours, pixels)
    zarr.create_array(store=str(theirs), data=pixels, zarr_format=2, compressors=COMPRESSOR)
    assert json.loads((ours / ".zarray").read_text()) == json.loads((theirs / ".zarray").read_text())
    assert (ours / "0.0.0").read_bytes() == (theirs / "0.0.0").read_bytes()
    assert np.array_equal(zarr.open(str(ours), mode="r")[...], pixels)


def test_same_seed_same_bytes_other_seed_other_bytes(dataset, tmp_path):
    root, _ = dataset
    # a tile alone is byte-identical to the same tile written with the other three
    synthetic.generate_dataset(tmp_path / "a", parcels_per_tile=N_PARCELS, seed=0, tiles=["FR2"])
    assert all_files(tmp_path / "a" / TILES["FR2"]) == all_files(root / TILES["FR2"])
    synthetic.generate_dataset(tmp_path / "b", parcels_per_tile=N_PARCELS, seed=1, tiles=["FR2"])
    other = all_files(tmp_path / "b" / TILES["FR2"])
    assert other.keys() == all_files(root / TILES["FR2"]).keys()
    assert other["meta/metadata.pkl"] != all_files(root / TILES["FR2"])["meta/metadata.pkl"]
    # a rerun over its own output replaces it
    synthetic.generate_dataset(tmp_path / "a", parcels_per_tile=N_PARCELS, seed=0, tiles=["FR2"])
    assert all_files(tmp_path / "a" / TILES["FR2"]) == all_files(root / TILES["FR2"])


def test_ground_truth_and_shift_sign(dataset, tmp_path):
    root, summary = dataset
    truth = json.loads((root / synthetic.GROUND_TRUTH_FILE).read_text())
    assert truth["planted_shifts"] == synthetic.DEFAULT_SHIFTS == summary["planted_shifts"]
    assert truth["seed"] == 0 and truth["parcels_per_tile"] == N_PARCELS
    assert truth["generator_version"] == synthetic.GENERATOR_VERSION
    assert "d = s_target - s_source" in truth["sign_convention"]
    expected = truth["expected_shifts"]
    assert len(expected) == 12 and expected == summary["expected_shifts"]
    assert (expected["DK->FR1"], expected["DK->FR2"], expected["DK->AT1"]) == (25, 15, 10)
    assert (expected["FR1->DK"], expected["FR1->FR2"]) == (-25, -10)
    assert truth["tiles"]["AT1"] == {"path": TILES["AT1"], "dates": 58, "planted_shift_days": 10}

    custom = synthetic.generate_dataset(tmp_path, parcels_per_tile=5, tiles=["DK", "AT1"],
                                        shifts={"AT1": -5, "DK": 3})
    assert custom["expected_shifts"] == {"DK->AT1": -8, "AT1->DK": 8}
    assert synthetic.read_ground_truth(tmp_path)["planted_shifts"] == {"DK": 3, "AT1": -5}


def test_bad_arguments_and_foreign_folders(tmp_path):
    with pytest.raises(ConfigError, match="UK"):
        synthetic.generate_dataset(tmp_path / "x", parcels_per_tile=5, shifts={"UK": 3})
    with pytest.raises(ConfigError, match="integer number of days"):
        synthetic.generate_dataset(tmp_path / "x", parcels_per_tile=5, shifts={"FR1": 500})
    with pytest.raises(ConfigError):
        synthetic.generate_dataset(tmp_path / "x", parcels_per_tile=5, tiles=["spain/30ABC/2017"])
    real = tmp_path / "real"
    (real / TILES["DK"] / "data").mkdir(parents=True)
    with pytest.raises(DatasetError, match="refusing to overwrite"):
        synthetic.generate_dataset(real, parcels_per_tile=5, tiles=["DK"])
    assert (real / TILES["DK"] / "data").is_dir()


def test_cloudy_dates_have_bright_outliers(dataset):
    root, _ = dataset
    for short in TILES:
        reader = TileReader(root, short)
        blue = np.concatenate([reader.read_parcel(i)[:, 0, :] for i in range(len(reader))], axis=1)
        bright = (blue > BRIGHT_B02).mean(axis=1)  # share of bright pixels per date
        cloudy_pct = np.asarray(reader.metadata["cloudy_pct"])
        assert bright[cloudy_pct < 5].mean() < 0.05, short
        assert bright[cloudy_pct >= 50].mean() > 0.25, short
        assert np.corrcoef(cloudy_pct, bright)[0, 1] > 0.8, short


def class_curve(reader: TileReader, class_name: str, max_cloudy_pct: float = 30) -> tuple[np.ndarray, np.ndarray]:
    """Median over parcels of the per-parcel median NDVI, on the dates with few clouds."""
    codes = CropCodes(reader.country)
    members = [i for i, p in enumerate(reader.parcels) if codes.class_of(p["label"]) == class_name]
    keep = np.asarray(reader.metadata["cloudy_pct"]) <= max_cloudy_pct
    curve = np.median([parcel_ndvi(reader, i)[keep] for i in members], axis=0)
    return reader.positions[keep].astype(np.float64), curve


def aligning_shift(source: TileReader, target: TileReader, class_name: str) -> float:
    """The d for which the target's curve at positions + d best matches the source's (least squares)."""
    src_days, src = class_curve(source, class_name)
    tgt_days, tgt = class_curve(target, class_name)
    src, tgt = (src - src.min()) / np.ptp(src), (tgt - tgt.min()) / np.ptp(tgt)  # tiles differ in gain
    candidates = np.arange(-40.0, 40.5, 0.5)
    errors = [np.mean((tgt - np.interp(tgt_days + d, src_days, src)) ** 2) for d in candidates]
    return float(candidates[int(np.argmin(errors))])


def test_planted_shift_is_visible_in_ndvi(tmp_path, monkeypatch):
    """Target positions + (s_target - s_source) align the target's corn NDVI with the source's."""
    for short in TILES:  # tiles of corn only, so that 40 parcels give a precise median curve
        monkeypatch.setitem(CLASS_SHARES, short, {"corn": 1.0})
    synthetic.generate_dataset(tmp_path, parcels_per_tile=40, seed=0)
    truth = synthetic.read_ground_truth(tmp_path)["expected_shifts"]
    readers = {short: TileReader(tmp_path, short) for short in TILES}
    rise, fall = green_season(readers["DK"], "corn")
    assert 165 < rise < 185 and 255 < fall < 275  # DK corn: green-up in June, green until September
    for pair in ("DK->FR1", "DK->FR2", "DK->AT1", "FR1->DK", "FR1->FR2"):
        source, target = pair.split("->")
        assert aligning_shift(readers[source], readers[target], "corn") == pytest.approx(truth[pair], abs=4), pair


def test_winter_barley_matures_before_winter_wheat(dataset):
    root, _ = dataset
    for short in ("DK", "FR1"):
        reader = TileReader(root, short)
        assert green_season(reader, "winter_barley")[1] < green_season(reader, "winter_wheat")[1] - 5


def test_labels_are_real_national_codes(dataset):
    root, _ = dataset
    for short, tile in TILES.items():
        reader = TileReader(root, short)
        codes = CropCodes(reader.country)
        labels = [p["label"] for p in reader.parcels]
        if short == "DK":
            assert all(type(x) is int for x in labels)
        elif short.startswith("FR"):
            assert all(type(x) is str and len(x) == 3 for x in labels)
        else:
            kinds = Counter(type(x).__name__ for x in labels)
            assert kinds["int"] > 0 and kinds["str"] > 0 and set(kinds) == {"int", "str"}
            assert all(str(x).isdigit() for x in labels)
        in_table = [codes.is_known(x) for x in labels]
        assert np.mean(in_table) >= 0.95
        names = Counter(codes.class_of(x) for x in labels)
        assert names == Counter(synthetic.tile_class_counts(short, N_PARCELS)), short
        assert names.most_common(1)[0][0] == "meadow"


def test_default_size_has_enough_classes_in_every_tile():
    for short in TILES:
        shares = CLASS_SHARES[short]
        assert sum(shares.values()) == pytest.approx(1.0)
        assert 0.04 <= shares["unknown"] <= 0.06 and 0.25 <= shares["meadow"] <= 0.35
        counts = synthetic.tile_class_counts(short)
        assert sum(counts.values()) == synthetic.DEFAULT_PARCELS_PER_TILE
        names = [n for n, c in counts.items() for _ in range(c)]
        assert len([c for c in select_classes(names, 50) if c != "unknown"]) >= 8, short
        assert set(counts) - {"unknown"} <= set(PHENOLOGY)


def test_plot_class_ndvi(dataset, tmp_path):
    root, _ = dataset
    png = synthetic.plot_class_ndvi(root, tmp_path / "plots" / "ndvi.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000


# -- beyond one translation per tile: per-class shifts and a season stretch --------------------


def _parcel_bytes(root, tile="FR1"):
    reader = TileReader(root, TILES[tile])
    return [reader.read_parcel(i).tobytes() for i in range(len(reader.parcels))], reader


def test_a_class_shift_moves_that_class_alone_and_a_stretch_warps_the_season(tmp_path):
    base, shifted, stretched = (tmp_path / n for n in ("base", "shifted", "stretched"))
    common = dict(parcels_per_tile=120, seed=3, tiles=["FR1"])
    synthetic.generate_dataset(base, **common)
    summary = synthetic.generate_dataset(shifted, class_shifts={"FR1": {"corn": 20}}, **common)
    synthetic.generate_dataset(stretched, stretch={"FR1": 1.2}, **common)
    assert summary["class_shifts"] == {"FR1": {"corn": 20}}
    assert synthetic.read_ground_truth(stretched)["stretch"] == {"FR1": 1.2}
    before, reader = _parcel_bytes(base)
    after, _ = _parcel_bytes(shifted)
    codes = CropCodes(reader.country)
    is_corn = [codes.class_of(p["label"]) == "corn" for p in reader.parcels]
    assert any(is_corn)
    for corn, a, b in zip(is_corn, before, after):
        assert (a != b) == corn, "a class shift changed another class, or left its own"
    # corn's season comes 20 days earlier: its NDVI rise moves back by about that
    days, curves = synthetic.class_ndvi_curves(base, TILES["FR1"], min_parcels=3)
    _, moved = synthetic.class_ndvi_curves(shifted, TILES["FR1"], min_parcels=3)
    _, warped = synthetic.class_ndvi_curves(stretched, TILES["FR1"], min_parcels=3)

    def rise(curve):  # the first day the NDVI passes half-way from its spring minimum to its peak
        peak = int(np.argmax(curve))
        low = curve[:peak + 1].min()
        return days[np.argmax(curve[:peak + 1] >= low + 0.5 * (curve[peak] - low))]

    assert 10 <= rise(curves["corn"]) - rise(moved["corn"]) <= 30
    # a season stretched by 1.2 around mid-year: a spring event (corn's rise, before the pivot)
    # comes earlier than in the base tile, by about 0.2 x its distance to the pivot
    assert rise(warped["corn"]) < rise(curves["corn"])


@pytest.mark.parametrize("kwargs,message", [
    ({"class_shifts": {"FR1": {"rice": 10}}}, "the tile has no class 'rice'"),
    ({"class_shifts": {"FR1": {"corn": 500}}}, "expected an integer number of days"),
    ({"stretch": {"FR1": 3.0}}, "expected a factor in [0.5, 2.0]"),
    ({"stretch": {"XX": 1.1}}, "XX"),
])
def test_bad_warps_are_one_line_before_anything_is_written(tmp_path, kwargs, message):
    with pytest.raises(ConfigError) as raised:
        synthetic.generate_dataset(tmp_path / "data", parcels_per_tile=20, tiles=["FR1"], **kwargs)
    assert message in str(raised.value) and "\n" not in str(raised.value)
    assert not (tmp_path / "data").exists()


def test_the_synth_command_takes_class_shifts_and_stretches(tmp_path, capsys):
    from timematch.data.__main__ import main

    assert main(["synth", "--root", str(tmp_path / "d"), "--parcels-per-tile", "20", "--class-shift",
                 "FR1:corn=-15", "--stretch", "AT1=1.1"]) == 0
    truth = synthetic.read_ground_truth(tmp_path / "d")
    assert truth["class_shifts"] == {"FR1": {"corn": -15}} and truth["stretch"] == {"AT1": 1.1}
    assert main(["synth", "--root", str(tmp_path / "e"), "--class-shift", "FR1corn=5"]) == 2
    assert "expected TILE:CLASS=DAYS" in capsys.readouterr().err


# -- parcel sizes and tile sizes: the published long tail, tiles asked for in bytes -------------


def test_the_embedded_draws_do_not_change():
    """The default data's plan and pixels as the generator made them before pixel_sizes existed (its
    bytes are the embedded cache's): the metadata exactly, the pixels' sum to a millionth (float32
    sums may differ in the last bit between BLAS kernels; any change of the draws moves it by ~1 %)."""
    plan, rng = simulation.plan_tile("FR2", 600, 0)
    metadata = pickle.dumps(plan.metadata, protocol=4)
    assert hashlib.sha256(metadata).hexdigest() == "dca5e0cd4568f8d8efcef05909eb083e68a1f33e2304fa369bbc6a79426985ad"
    total = sum(int(px.sum(dtype=np.int64)) for _, px in simulation.iter_parcel_pixels(plan, 15.0, rng))
    assert total == pytest.approx(28_729_419_090, rel=1e-6)
    assert simulation.parcel_chunks(np.full(600, 500), "embedded") == [(0, 250), (250, 500), (500, 600)]


def test_published_pixel_sizes_have_a_long_tail_and_change_nothing_else():
    embedded, _ = simulation.plan_tile("DK", 5000, 0)
    published, _ = simulation.plan_tile("DK", 5000, 0, pixel_sizes="published")
    sizes = np.array([p["n_pixels"] for p in published.metadata["parcels"]])
    assert sizes.min() >= 1 and (sizes < 10).sum() > 50 and sizes.max() > 1000
    assert 35 <= np.median(sizes) <= 45  # the same class medians
    assert sizes.mean() == pytest.approx(simulation.expected_pixels_per_parcel("DK", "published"), rel=0.05)
    # the same position of the parcel generator: labels, ids, blocks and cover do not move
    for a, b in zip(embedded.metadata["parcels"], published.metadata["parcels"]):
        assert (a["id"], a["label"], a["block"], a["geometric_features"][3]) == \
            (b["id"], b["label"], b["block"], b["geometric_features"][3])
    assert embedded.metadata["dates"] == published.metadata["dates"]
    # chunks bounded in pixels as well as parcels, covering every parcel once, in order
    chunks = simulation.parcel_chunks(sizes, "published")
    assert chunks[0][0] == 0 and chunks[-1][1] == len(sizes)
    assert all(a[1] == b[0] for a, b in zip(chunks, chunks[1:]))
    assert all(stop - start <= simulation.CHUNK_PARCELS for start, stop in chunks)
    assert max(sizes[start:stop].sum() for start, stop in chunks) <= simulation.CHUNK_PIXELS


def test_published_sizes_same_seed_same_bytes(dataset, tmp_path):
    root, _ = dataset
    assert "pixel_sizes" not in synthetic.read_ground_truth(root)
    for name in ("a", "b"):
        summary = synthetic.generate_dataset(tmp_path / name, parcels_per_tile=80, seed=0, tiles=["FR2"],
                                             pixel_sizes="published")
    assert summary["pixel_sizes"] == "published"
    assert synthetic.read_ground_truth(tmp_path / "a")["pixel_sizes"] == "published"
    files = all_files(tmp_path / "a" / TILES["FR2"])
    assert files == all_files(tmp_path / "b" / TILES["FR2"])
    sizes = [p["n_pixels"] for p in TileReader(tmp_path / "a", "FR2").parcels]
    assert min(sizes) >= 1 and sizes != [p["n_pixels"] for p in TileReader(root, "FR2").parcels]


def test_tile_bytes_gives_a_tile_of_about_that_size(tmp_path):
    summary = synthetic.generate_dataset(tmp_path, tile_bytes=20e6, tiles=["DK"], pixel_sizes="published")
    data = tmp_path / TILES["DK"] / "data"
    size = sum(p.stat().st_size for p in data.rglob("*") if p.is_file())
    assert 0.75 * 20e6 <= size <= 1.25 * 20e6, size
    truth = synthetic.read_ground_truth(tmp_path)
    assert truth["tile_bytes"] == 20e6 and truth["parcels_per_tile"] == summary["parcels_per_tile"]
    assert summary["parcels_per_tile"]["DK"] == len(TileReader(tmp_path, "DK").parcels)
    # tiles of fewer dates get more parcels for the same bytes
    assert writing.parcels_for_bytes("FR2", 20e6) > writing.parcels_for_bytes("FR1", 20e6)


@pytest.mark.parametrize("kwargs,message", [
    ({"parcels_per_tile": 20, "tile_bytes": 1e6}, "not both"),
    ({"tile_bytes": 0}, "tile_bytes must be"),
    ({"pixel_sizes": "huge"}, "pixel_sizes 'huge'"),
])
def test_bad_sizes_are_one_line_before_anything_is_written(tmp_path, kwargs, message):
    with pytest.raises(ConfigError) as raised:
        synthetic.generate_dataset(tmp_path / "data", tiles=["FR1"], **kwargs)
    assert message in str(raised.value) and "\n" not in str(raised.value)
    assert not (tmp_path / "data").exists()


def test_the_synth_command_takes_a_tile_size_or_a_parcel_count_not_both(tmp_path, capsys):
    from timematch.data.__main__ import main

    assert main(["synth", "--root", str(tmp_path / "d"), "--parcels-per-tile", "20", "--tile-gb", "1.5"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--parcels-per-tile" in err and "--tile-gb" in err
    assert not (tmp_path / "d").exists()
    assert main(["synth", "--root", str(tmp_path / "e"), "--tile-gb", "0.002", "--pixel-sizes", "published"]) == 0
    truth = synthetic.read_ground_truth(tmp_path / "e")
    assert truth["pixel_sizes"] == "published" and truth["tile_bytes"] == pytest.approx(2e6)
    assert set(truth["parcels_per_tile"]) == set(TILES)

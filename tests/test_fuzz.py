"""Property-based fuzzing of the input layer (hypothesis): metadata pickles and parcel arrays of
random shapes, dtypes and values, random ``--set`` overrides and random search-space files.

Every input is either accepted, and then what comes out is consistent with what went in, or
refused with the project's own error (one line naming the file or the ``--set``); never an
unrelated exception. Examples are derandomised (conftest's ``ci`` profile) so CI is repeatable;
``HYPOTHESIS_PROFILE=explore`` draws ten times as many, at random.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import io
import pickle
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from tests.support.fake_dataset import write_parcel
from timematch.data.format import N_BANDS, TileReader, parse_date
from timematch.data.packed import PackedTile
from timematch.errors import ConfigError, DatasetError
from timematch.methods.registry import build_config, config_fields, method_names
from timematch.runner import search_space
from timematch.runner.cli import main

REPO = Path(__file__).resolve().parents[1]
TILE = "denmark/32VNH/2017"

# -- values of any kind ----------------------------------------------------------------------

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12), st.binary(max_size=8), st.dates(),
    st.integers(-5, 10**9).map(np.int64), st.floats(width=32).map(np.float32),
)
anything = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.tuples(inner, inner),
    st.dictionaries(st.text(max_size=8), inner, max_size=4)), max_leaves=12)


def _yyyymmdd(day: dt.date) -> int:
    return int(day.strftime("%Y%m%d"))


def _valid_dates(n: int) -> st.SearchStrategy[list[int]]:
    return st.lists(st.integers(1, 364), min_size=n, max_size=n, unique=True).map(
        lambda days: [_yyyymmdd(dt.date(2017, 1, 1) + dt.timedelta(days=d)) for d in sorted(days)])


@st.composite
def parcels(draw) -> dict:
    """A metadata parcel entry: mostly plausible, each field sometimes replaced by anything."""
    entry = {
        "label": draw(st.one_of(st.sampled_from([10, 11, 216, 251, "BTH", "10"]), anything)),
        "n_pixels": draw(st.one_of(st.integers(1, 64), st.integers(-3, 0), anything)),
        "geometric_features": draw(st.one_of(
            st.lists(st.floats(0, 1e6), min_size=4, max_size=4), st.lists(st.floats(), max_size=5), anything)),
    }
    for key in ("id", "block"):
        if draw(st.booleans()):
            entry[key] = draw(st.one_of(st.integers(0, 10**6), anything))
    drop = draw(st.sampled_from([None, None, None, "label", "n_pixels", "geometric_features"]))
    if drop:
        del entry[drop]
    return draw(st.one_of(st.just(entry), anything)) if draw(st.integers(0, 9)) == 0 else entry


@st.composite
def metadata(draw) -> object:
    n = draw(st.integers(1, 6))
    meta = {
        "start_date": draw(st.one_of(st.just(20170101), st.just("20170101"), anything)),
        "end_date": 20171231,
        "dates": draw(st.one_of(_valid_dates(n), st.lists(st.integers(), max_size=4), anything)),
        "cloudy_pct": [0.0] * n,
        "parcels": draw(st.one_of(st.lists(parcels(), min_size=1, max_size=4), anything)),
    }
    drop = draw(st.sampled_from([None, None, None, "start_date", "dates", "parcels"]))
    if drop:
        del meta[drop]
    return draw(anything) if draw(st.integers(0, 19)) == 0 else meta


def _tile_folder(root: Path) -> Path:
    path = root / TILE
    (path / "data").mkdir(parents=True, exist_ok=True)
    (path / "meta").mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def scratch():
    root = Path(tempfile.mkdtemp(prefix="fuzz-"))
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


@settings(max_examples=150)
@given(meta=metadata(), protocol=st.integers(2, pickle.HIGHEST_PROTOCOL))
def test_a_metadata_pickle_is_read_consistently_or_refused_naming_the_file(meta, protocol):
    with scratch() as root:
        path = _tile_folder(root) / "meta" / "metadata.pkl"
        path.write_bytes(pickle.dumps(meta, protocol=protocol))
        try:
            reader = TileReader(root, TILE)
        except DatasetError as err:
            assert str(path) in str(err) and "\n" not in str(err)
            return
        # accepted: what the reader says agrees with what was written
        assert len(reader) == len(meta["parcels"])
        assert reader.dates == [_yyyymmdd(parse_date(d)) for d in meta["dates"]]
        positions = reader.positions
        assert positions.dtype == np.int64 and positions.shape == (len(meta["dates"]),)
        assert (positions >= 0).all() and (np.diff(positions) > 0).all()
        # no parcel array was written: packing is refused naming the first missing one
        with pytest.raises(DatasetError, match=r"0\.zarr: parcel array is missing"):
            PackedTile.open(root, TILE, cache_dir=root / "cache")


def test_a_truncated_metadata_pickle_is_refused_at_every_length():
    """Every prefix of a real metadata pickle: the restricted unpickler fails cleanly."""
    meta = {"start_date": 20170101, "dates": [20170105, 20170110], "parcels": [
        {"label": 10, "n_pixels": 3, "geometric_features": np.array([1.0, 2.0, 0.5, 0.9])}]}
    data = pickle.dumps(meta)
    with scratch() as root:
        path = _tile_folder(root) / "meta" / "metadata.pkl"
        for end in range(len(data)):
            path.write_bytes(data[:end])
            with pytest.raises(DatasetError, match="metadata"):
                TileReader(root, TILE)
        path.write_bytes(data)
        assert len(TileReader(root, TILE)) == 1


DTYPES = st.sampled_from([np.uint16, np.uint16, np.uint16, np.int16, np.uint8, np.int64, np.float32, np.float64])


@settings(max_examples=60, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data(), n_dates=st.integers(1, 5), counts=st.lists(st.integers(1, 6), min_size=1, max_size=3))
def test_parcel_arrays_pack_to_what_was_written_or_are_refused_naming_the_file(data, n_dates, counts):
    """Random dtypes, shapes (sometimes disagreeing with the metadata) and values."""
    with scratch() as root:
        tile = _tile_folder(root)
        written = []
        for i, count in enumerate(counts):
            shape = data.draw(st.one_of(
                st.just((n_dates, N_BANDS, count)),
                hnp.array_shapes(min_dims=1, max_dims=4, min_side=1, max_side=6)), label=f"shape {i}")
            pixels = data.draw(hnp.arrays(DTYPES, shape), label=f"pixels {i}")
            write_parcel(tile / "data" / f"{i}.zarr", pixels)
            written.append(pixels)
        dates = data.draw(_valid_dates(n_dates), label="dates")
        meta = {"start_date": 20170101, "dates": dates, "parcels": [
            {"label": 10, "n_pixels": c, "geometric_features": [1.0, 2.0, 0.5, 0.9]} for c in counts]}
        (tile / "meta" / "metadata.pkl").write_bytes(pickle.dumps(meta))
        try:
            packed = PackedTile.open(root, TILE, cache_dir=root / "cache")
        except DatasetError as err:
            message = str(err)
            assert "\n" not in message and ".zarr" in message, message
            bad = int(message.split(".zarr")[0].rsplit("/", 1)[-1])
            ok = written[bad].dtype == np.uint16 and written[bad].shape == (n_dates, N_BANDS, counts[bad])
            assert not ok, f"a good parcel was refused: {message}"
            assert not list((root / "cache" / "packed").glob("*.tmp*")), "a failed build left a temporary folder"
            return
        assert all(p.dtype == np.uint16 and p.shape == (n_dates, N_BANDS, c) for p, c in zip(written, counts))
        assert len(packed) == len(counts) and packed.n_dates == n_dates
        for i, pixels in enumerate(written):
            np.testing.assert_array_equal(packed.parcel(i), pixels)


# -- --set overrides -------------------------------------------------------------------------

SECTION_KEYS = {
    "data": ["min_parcels", "merge_seasons", "n_folds", "split_seed", "pixels_per_parcel", "timesteps",
             "normalization", "eval_pixel_budget", "colour"],
    "pretrain": ["epochs", "lr", "batch_size", "optimizer", "nesterov", "steps_per_epoch", "schedule"],
    "scheduler": ["grace_period", "reduction_factor", "patience"],
    "resources": ["cpus_per_trial", "gpus_per_trial", "max_concurrent_per_group", "memory"],
}
yaml_values = st.one_of(
    st.sampled_from(["3", "0", "-1", "1e-4", "1e400", ".inf", ".nan", "true", "null", "abc", "[1, 2]", "{a: 1}",
                     "2024-01-01", "'5'", "", "~", "auto", "adam", "sgd", "cosine", "published", ":", "[", "{"]),
    st.integers(-10, 10**6).map(str), st.floats().map(repr), st.text(max_size=10),
)


@st.composite
def overrides(draw) -> str:
    section = draw(st.sampled_from([*SECTION_KEYS, "methods", "folds", "trials", "retries", "nonsense", ""]))
    if section == "methods":
        method = draw(st.sampled_from([*method_names(), "no_such_method"]))
        fields = sorted(config_fields(method)) if method in method_names() else ["lr"]
        key = f"methods.{method}.{draw(st.sampled_from([*fields, 'unknown_key']))}"
    elif section in SECTION_KEYS:
        key = f"{section}.{draw(st.sampled_from(SECTION_KEYS[section]))}"
    else:
        key = section
    if draw(st.integers(0, 9)) == 0:
        key = draw(st.text(max_size=12))
    separator = draw(st.sampled_from(["=", "=", "=", "", "=="]))
    return f"{key}{separator}{draw(yaml_values)}"


def _launch(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv, project_root=REPO)
        except SystemExit as exit_:  # argparse
            code = exit_.code
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('fuzz-store') / 'mlflow.db'}"


@settings(max_examples=120, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(sets=st.lists(overrides(), min_size=1, max_size=3))
def test_random_set_overrides_are_accepted_or_one_line_naming_the_set(sets, store, tmp_path):
    argv = ["--dry-run", "--profile", "smoke", "--tracking-uri", store, "--results-dir", str(tmp_path)]
    for item in sets:
        argv += ["--set", item]
    code, out, err = _launch(argv)
    assert "Traceback" not in err
    if code == 0:
        assert "stage 1, source models" in out and not err
        return
    assert code == 2, (code, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("launch.py: error: --set "), err
    assert any(item in lines[0] or repr(item) in lines[0] for item in sets), err


# -- search-space files ----------------------------------------------------------------------

numbers = st.one_of(st.integers(-5, 1000), st.floats(-10, 1000), st.sampled_from([0, 1, 0.5, 1e-5, 0.99, 10]))


@st.composite
def distributions(draw) -> object:
    kind = draw(st.sampled_from(["float", "int", "categorical", "normal", None]))
    spec: dict = {} if kind is None else {"type": kind}
    if kind == "categorical":
        spec["choices"] = draw(st.one_of(st.lists(st.one_of(numbers, st.booleans(), st.text(max_size=6)),
                                                  max_size=4), anything))
    else:
        for name in ("low", "high"):
            if draw(st.integers(0, 9)):
                spec[name] = draw(st.one_of(numbers, numbers, anything))
        if draw(st.booleans()):
            spec["log"] = draw(st.one_of(st.booleans(), anything))
        if draw(st.booleans()):
            spec["step"] = draw(st.one_of(st.integers(-1, 5), anything))
    if draw(st.integers(0, 9)) == 0:
        spec[draw(st.text(max_size=5))] = draw(anything)
    return draw(anything) if draw(st.integers(0, 14)) == 0 else spec


@settings(max_examples=200, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(method=st.sampled_from(["timematch", "fixmatch", "mmd", "dann", "jumbot"]), data=st.data())
def test_a_search_space_file_is_accepted_and_samples_valid_configs_or_refused_naming_it(method, data, tmp_path):
    fields = sorted(config_fields(method))
    keys = data.draw(st.lists(st.sampled_from([*fields, "no_such_key"]), max_size=3, unique=True), label="keys")
    document = {key: data.draw(distributions(), label=key) for key in keys}
    path = tmp_path / f"{method}.yaml"
    try:
        text = yaml.safe_dump(document)
    except yaml.YAMLError:
        assume(False)  # not representable as a YAML file
    path.write_text(text)
    try:
        space = search_space.load_space(tmp_path, method)
    except ConfigError as err:
        assert str(path) in str(err)
        return
    assert set(space) == set(keys) and keys
    distributions_ = search_space.to_optuna(space)
    for key, spec in space.items():  # every end of the space is a config the method accepts
        points = spec["choices"] if spec["type"] == "categorical" else [spec["low"], spec["high"]]
        for value in points:
            build_config(method, {key: value})
            assert distributions_[key]._contains(distributions_[key].to_internal_repr(value))
    assert search_space.contains(space, {k: (s["choices"][0] if s["type"] == "categorical" else s["low"])
                                         for k, s in space.items()})


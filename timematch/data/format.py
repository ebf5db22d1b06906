"""Reader of the published TimeMatch dataset format, exactly as it is on disk.

Layout (see docs/data.md): ``<root>/<country>/<tile>/<year>/data/<i>.zarr`` is one zarr
format-2 array per parcel, uint16 of shape (T, C, S), and ``meta/metadata.pkl`` a pickled
dict with ``start_date``, ``end_date``, ``dates``, ``cloudy_pct`` and ``parcels``.

The pickle comes from the internet, so it is read with :class:`RestrictedUnpickler`, which
admits only builtins, containers, numpy scalars and arrays.
"""

from __future__ import annotations

import datetime as dt
import io
import json
import pickle
import threading
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
from numcodecs import get_codec

from timematch.data.tiles import COUNTRIES, resolve_tile
from timematch.errors import DatasetError

N_BANDS = 10
BANDS = ("B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B11", "B12")
METADATA_KEYS = ("start_date", "dates", "parcels")
PARCEL_KEYS = ("label", "n_pixels", "geometric_features")

# What a metadata pickle may reference: plain builtins and numpy's array/scalar machinery.
_ALLOWED_GLOBALS: dict[str, frozenset[str]] = {
    "builtins": frozenset(
        {"dict", "list", "tuple", "set", "frozenset", "int", "float", "str", "bytes",
         "bytearray", "bool", "complex", "slice", "range"}
    ),
    "collections": frozenset({"OrderedDict", "defaultdict"}),
    "datetime": frozenset({"date", "datetime", "timedelta"}),
    "numpy": frozenset({"ndarray", "dtype", "float64", "float32", "int64", "int32",
                        "int16", "uint16", "uint8", "int8", "bool_", "str_"}),
    "numpy.core.multiarray": frozenset({"_reconstruct", "scalar"}),
    "numpy._core.multiarray": frozenset({"_reconstruct", "scalar"}),
    "numpy.core.numeric": frozenset({"_frombuffer"}),
    "numpy._core.numeric": frozenset({"_frombuffer"}),
}


#: Where a tile keeps its metadata, relative to its ``country/tile/year`` folder: what marks a tile.
METADATA_FILE = "meta/metadata.pkl"


def find_tiles(root: Path) -> list[str]:
    """Tiles under a dataset ``root``: every ``country/tile/year`` folder holding :data:`METADATA_FILE`."""
    return sorted(str(p.parent.parent.relative_to(root)) for p in Path(root).glob(f"*/*/*/{METADATA_FILE}"))


def missing_tiles(root: Path, tiles: set[str] | list[str]) -> list[str]:
    """The ``tiles`` that ``root`` does not hold (no :data:`METADATA_FILE` in their folder)."""
    return sorted(t for t in tiles if not (Path(root) / t / METADATA_FILE).is_file())


class ForbiddenGlobalError(pickle.UnpicklingError):
    """A pickle asked for a global that plain data never needs."""


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that refuses every global outside builtins, containers and numpy data."""

    def find_class(self, module: str, name: str) -> Any:
        if name in _ALLOWED_GLOBALS.get(module, ()):
            return super().find_class(module, name)
        if module == "numpy.dtypes" and name.endswith("DType"):
            return super().find_class(module, name)
        raise ForbiddenGlobalError(
            f"refusing to load global '{module}.{name}': a dataset metadata file may only "
            "contain builtins, containers and numpy arrays/scalars"
        )


def safe_load_pickle(data: bytes) -> Any:
    """Unpickle ``data`` admitting only plain data (see :class:`RestrictedUnpickler`)."""
    return RestrictedUnpickler(io.BytesIO(data)).load()


def read_metadata(path: Path) -> dict[str, Any]:
    """Load and check a tile's ``meta/metadata.pkl``; errors name the path and the problem."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: metadata file is missing (expected meta/metadata.pkl in the tile folder)")
    try:
        meta = safe_load_pickle(path.read_bytes())
    except ForbiddenGlobalError as err:
        raise DatasetError(f"{path}: {err}") from None
    except Exception as err:  # truncated or not a pickle at all
        raise DatasetError(f"{path}: not a readable metadata pickle ({type(err).__name__}: {err})") from None
    if not isinstance(meta, dict):
        raise DatasetError(f"{path}: metadata must be a dict, found {type(meta).__name__}")
    missing = [key for key in METADATA_KEYS if key not in meta]
    if missing:
        raise DatasetError(f"{path}: metadata lacks key(s) {missing}; found {sorted(meta)}")
    if not isinstance(meta["parcels"], (list, tuple)) or not meta["parcels"]:
        raise DatasetError(f"{path}: metadata 'parcels' must be a non-empty list")
    for i, parcel in enumerate(meta["parcels"]):
        problem = _parcel_problem(parcel)
        if problem:
            raise DatasetError(f"{path}: parcel {i} {problem}")
    lengths = {len(p["geometric_features"]) for p in meta["parcels"]}
    if len(lengths) > 1:
        raise DatasetError(f"{path}: parcels disagree on the number of geometric_features ({sorted(lengths)})")
    try:
        start = parse_date(meta["start_date"])
        dates = [parse_date(d) for d in _sequence(meta["dates"])]
    except DatasetError as err:
        raise DatasetError(f"{path}: {err}") from None
    if not dates or any(b <= a for a, b in zip(dates, dates[1:])):
        raise DatasetError(f"{path}: 'dates' must be a non-empty, strictly increasing list of yyyymmdd dates")
    if dates[0] < start:
        raise DatasetError(f"{path}: the first date {dates[0]:%Y%m%d} is before start_date {start:%Y%m%d}")
    return meta


def _sequence(value: Any) -> list[Any]:
    if isinstance(value, np.ndarray) and value.ndim == 1:
        return value.tolist()
    if not isinstance(value, (list, tuple)):
        raise DatasetError(f"'dates' must be a list of yyyymmdd dates, found {type(value).__name__}")
    return list(value)


def _parcel_problem(parcel: Any) -> str | None:
    """What is wrong with one metadata parcel entry, or None."""
    if not isinstance(parcel, dict) or any(k not in parcel for k in PARCEL_KEYS):
        return f"must be a dict with keys {list(PARCEL_KEYS)}, found {parcel!r:.200}"
    label = parcel["label"]
    if isinstance(label, (bool, np.bool_)) or not isinstance(label, (int, str, float, np.integer, np.floating)) or (
            isinstance(label, (float, np.floating)) and not float(label).is_integer()):
        return f"has label {label!r:.80}: expected a national crop code (an int or a string)"
    count = parcel["n_pixels"]
    if isinstance(count, (bool, np.bool_)) or not isinstance(count, (int, np.integer)) or count < 1:
        return f"has n_pixels={count!r:.80}, expected an int >= 1"
    features = parcel["geometric_features"]
    try:
        values = np.asarray(features, dtype=np.float64)
    except (TypeError, ValueError):
        values = None
    if values is None or values.ndim != 1 or not (np.abs(values) < np.finfo(np.float32).max).all():
        return f"has geometric_features={features!r:.80}, expected a list of finite numbers"
    for key in ("id", "block"):  # optional
        value = parcel.get(key, 0)
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or abs(value) >= 2**63:
            return f"has {key}={value!r:.80}, expected an integer"
    return None


def parse_date(value: Any) -> dt.date:
    """A yyyymmdd int or string (or a date) as a date."""
    if isinstance(value, dt.datetime):
        return value.date()
    if isinstance(value, dt.date):
        return value
    if isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_)):
        text = str(int(value))
    elif isinstance(value, str):
        text = value.strip()
    else:
        raise DatasetError(f"date {value!r:.60} is not in yyyymmdd form")
    try:
        return dt.datetime.strptime(text, "%Y%m%d").date()
    except ValueError:
        raise DatasetError(f"date {value!r:.60} is not in yyyymmdd form") from None


def date_positions(dates: list[Any], start_date: Any) -> np.ndarray:
    """Days after ``start_date`` of each acquisition date, int64 (T,)."""
    start = parse_date(start_date)
    return np.array([(parse_date(d) - start).days for d in dates], dtype=np.int64)


class TileReader:
    """One tile of the dataset, read in place: ``<root>/<country>/<tile>/<year>``.

    Checks the folder and metadata on construction and raises :class:`DatasetError`
    naming the path and the problem. Parcels are read one at a time with
    :meth:`read_parcel`; training code uses the packed cache instead (see
    :mod:`timematch.data.packed`), which is built from this reader.
    """

    def __init__(self, root: Path | str, tile: str) -> None:
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise DatasetError(
                f"{self.root}: dataset root does not exist; pass --data-root (or set TIMEMATCH_DATA) "
                "to the folder that holds denmark/, france/ and austria/"
            )
        self.tile = resolve_tile(tile)
        self.country = self.tile.split("/")[0]
        if self.country not in COUNTRIES:
            raise DatasetError(f"{self.tile}: unknown country {self.country!r}; known: {COUNTRIES}")
        self.path = self.root / self.tile
        if not self.path.is_dir():
            found = sorted(str(p.relative_to(self.root)) for p in self.root.glob("*/*/*") if p.is_dir())
            raise DatasetError(
                f"{self.path}: tile folder is missing; tiles found under {self.root}: {found or 'none'}"
            )
        self.metadata_path = self.path / METADATA_FILE
        self.data_path = self.path / "data"
        self.metadata = read_metadata(self.metadata_path)
        if not self.data_path.is_dir():
            raise DatasetError(f"{self.data_path}: parcel data folder is missing")

    def __len__(self) -> int:
        return len(self.metadata["parcels"])

    def __repr__(self) -> str:
        return f"TileReader({str(self.path)!r}, parcels={len(self)}, dates={len(self.dates)})"

    @property
    def parcels(self) -> list[dict[str, Any]]:
        return self.metadata["parcels"]

    @cached_property
    def dates(self) -> list[int]:
        return [int(f"{parse_date(d):%Y%m%d}") for d in _sequence(self.metadata["dates"])]

    @cached_property
    def positions(self) -> np.ndarray:
        """Days after ``start_date`` of every date, int64 (T,)."""
        return date_positions(self.metadata["dates"], self.metadata["start_date"])

    def parcel_path(self, index: int) -> Path:
        return self.data_path / f"{index}.zarr"

    def read_parcel(self, index: int) -> np.ndarray:
        """Pixels of parcel ``index``: uint16 (T, C, S), checked against the metadata.

        A parcel array as published (one chunk, no filters, C order) is decoded directly
        (:class:`OneChunkReader`); any other zarr array is read with zarr."""
        path = self.parcel_path(index)
        if not path.exists():
            raise DatasetError(f"{path}: parcel array is missing (metadata lists {len(self)} parcels)")
        array = ONE_CHUNK.read(path)
        if array is None:
            import zarr

            try:
                array = np.asarray(zarr.open_array(str(path), mode="r")[...])
            except Exception as err:
                raise DatasetError(f"{path}: corrupt or unreadable zarr array ({type(err).__name__}: {err})") from None
        if array.dtype != np.uint16:
            raise DatasetError(f"{path}: dtype {array.dtype}, expected uint16 reflectances (the published format)")
        expected = (len(self.dates), N_BANDS, int(self.parcels[index]["n_pixels"]))
        if array.shape != expected:
            raise DatasetError(
                f"{path}: shape {array.shape} disagrees with the metadata, expected (T, C, S) = {expected}"
            )
        return array


class OneChunkReader:
    """Reads a zarr format-2 array that is one chunk, as every published parcel array is, without
    zarr: its ``.zarray`` document, then its chunk decoded into a new array by the compressor it
    names (numcodecs, configured from the document's JSON, never from a pickle).

    zarr's own ``open_array(...)[...]`` costs about 3 ms per parcel array (its store, metadata
    and selection machinery); this costs about 0.1 ms, which is what makes packing a tile of
    tens of thousands of parcels take seconds, not minutes. Anything else (several chunks,
    filters, Fortran order, a missing chunk that zarr fills in, a chunk that does not decode to
    the declared size) returns None, and the caller reads the array with zarr, which decodes it
    or says what is wrong with it: the result is the same array either way.
    """

    def __init__(self) -> None:
        self._codecs: dict[str, Any] = {}
        self._lock = threading.Lock()

    def _codec(self, config: dict) -> Any:
        key = json.dumps(config, sort_keys=True)
        codec = self._codecs.get(key)
        if codec is None:
            with self._lock:
                codec = self._codecs.setdefault(key, get_codec(dict(config)))
        return codec

    def read(self, path: Path) -> np.ndarray | None:
        try:
            doc = json.loads((path / ".zarray").read_bytes())
            shape = tuple(int(n) for n in doc["shape"])
            simple = (doc.get("zarr_format") == 2 and tuple(doc.get("chunks", ())) == shape
                      and doc.get("order", "C") == "C" and not doc.get("filters") and len(shape) > 0)
            if not simple:
                return None
            key = doc.get("dimension_separator", ".").join("0" * len(shape))
            raw = (path / key).read_bytes()
            out = np.empty(shape, dtype=np.dtype(doc["dtype"]))
            compressor = doc.get("compressor")
            if compressor is None:
                if len(raw) != out.nbytes:
                    return None
                out.reshape(-1).view(np.uint8)[:] = np.frombuffer(raw, dtype=np.uint8)
            else:
                self._codec(compressor).decode(raw, out=out)
            return out
        except Exception:  # zarr reads it, or names what is wrong with it
            return None


#: One reader (and its codecs) per process; safe to use from several threads.
ONE_CHUNK = OneChunkReader()

"""Synthetic TimeMatch benchmark: the four published tiles, in the published on-disk format,
with planted regional phenology shifts.

The published dataset (about 78 GB) is not always reachable, so the project ships this
seeded generator. It writes ``<root>/<country>/<tile>/<year>/data/<i>.zarr`` (one zarr
format-2 array per parcel, uint16 (T, C=10, S), one chunk, Blosc) and
``meta/metadata.pkl`` (a plain dict of builtins) exactly as described in
``dataset-format.md``, so the reader cannot tell it from the real thing, plus
``<root>/synthetic_ground_truth.json`` with the planted shifts (the reader ignores it).

What is simulated, per tile:

- its own irregular 2017 acquisition calendar (52, 62, 39, 58 dates for DK, FR1, FR2,
  AT1) on two interleaved Sentinel-2 orbit grids, with a cloud percentage per date
  (0-80 %); on cloudy dates about that share of pixels become bright, flat-spectrum
  outliers (and a few become cloud shadows);
- parcels of real national crop codes (``crop_codes/<country>.csv``), imbalanced like
  LPIS data (meadow about 30 %, then cereals and corn, a long tail, about 5 % ``unknown``
  codes, some of them in no table); Austria's labels are partly digit strings;
- per class a reference phenology: green cover from a double logistic (green-up,
  senescence), dry standing crop until harvest, autumn regrowth for winter crops, a
  yellow flowering signature for rapeseed and sunflowers, parcel-specific mowing dips for
  meadows. The winter cereals (barley, rye, triticale, wheat) and the spring crops
  (peas, barley, oat) differ mainly by *timing*, 6-10 days apart, so a source-trained
  classifier confuses them under a 10-25 day shift while they stay separable on their
  own tile;
- reflectance (L1C-like, times 10000) as a linear mixture of soil, green (cereal and
  broadleaf), dry-vegetation and yellow-flower endmembers driven by those cover
  fractions, so NDVI = (B08 - B04) / (B08 + B04) follows the class curve; per-parcel
  amplitude, timing jitter and soil brightness; per-pixel heterogeneity and noise; an
  atmosphere per acquisition date (aerosol load scaling the path reflectance) and a
  calibration shared by all tiles (within 1 % per band); 10-500 pixels per parcel
  (median about 40).

  Version 1 gave each tile its own gain (up to 6 %) and offset per band, constant over the
  year. Models keyed on those exact values: an FR1 source model scored 0.16 macro F1 on
  FR2 at every candidate shift, the planted one included, so no shift estimate could help.
  Real L1C tiles share their sensors' calibration and differ by date in atmosphere, which
  version 2 simulates; the source model then scores best at the planted shift on every
  scenario (FR1 -> FR2: 0.76 at 0 days, 0.85 at the planted -10).

Sign convention of the planted shift
------------------------------------
A tile with planted shift ``s`` (days) has ``phenology(t) = reference_curve(t + s)``,
``t`` the date position (days after 1 January): with ``s > 0`` everything happens ``s``
days *earlier* than in the reference (Denmark, ``s = 0``). Each parcel adds a small
jitter to its tile's ``s`` (uniform in +-3 days, plus a zero-mean offset per spatial
block), on top of the parcel's own timing variation.

TimeMatch looks for the shift ``d`` such that target positions ``+ d`` align with the
source. A target parcel observed at position ``p`` shows ``ref(p + s_target)``; presented
at position ``q = p + d`` it must look like a source parcel at ``q``, i.e.
``ref(q + s_source)``. So ``p + s_target = p + d + s_source``, that is

    d = s_target - s_source.

With the defaults (DK 0, FR1 25, FR2 15, AT1 10): DK->FR1 d = 25, DK->FR2 15, DK->AT1 10,
FR1->DK -25, FR1->FR2 -10; the first three mirror the shifts published for the real tiles.

Beyond one translation per tile
-------------------------------
The default data plants exactly one translation per tile, the assumption of TimeMatch and of
shift augmentation. Two options test the other methods' assumptions (the default dataset does
not use them, and its bytes do not change):

- ``class_shifts``: per tile, extra days per class on top of the tile's shift (a class whose
  season moved more than the others': C-MAD's one warp per class);
- ``stretch``: per tile, a factor a on the season's length around :data:`STRETCH_PIVOT`:
  ``phenology(t) = reference(STRETCH_PIVOT + (t - STRETCH_PIVOT) / a + s)``; a > 1 spreads
  the season out (a warp of the time axis that no single shift undoes: MAD's DTW path can
  follow it).
"""

from __future__ import annotations

import csv
import datetime as dt
import json
import pickle
import re
import shutil
import time
import zlib
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

import numcodecs
import numpy as np

from timematch.data.tiles import TILES, resolve_tile, short_name
from timematch.errors import ConfigError, DatasetError

#: Bumped whenever the same seed would produce different bytes (the embedded cache keys on it).
GENERATOR_VERSION = 2
#: The embedded dataset's size on disk (``du -sb`` of v2-seed0, measured on 2026-12-02): what
#: generating it needs free, checked before it starts.
EMBEDDED_BYTES = 211_053_785
GROUND_TRUTH_FILE = "synthetic_ground_truth.json"
#: Acquisition dates per tile in 2017, as published.
TILE_CALENDAR_SIZES: dict[str, int] = {"DK": 52, "FR1": 62, "FR2": 39, "AT1": 58}
#: Planted phenology shift per tile in days (see the module docstring for the sign).
DEFAULT_SHIFTS: dict[str, int] = {"DK": 0, "FR1": 25, "FR2": 15, "AT1": 10}
#: 1400 parcels per tile: ~10 s and ~230 MB on disk for the four tiles, 9 classes of >= 56 parcels
#: per tile besides `unknown`. Size grows with parcels x dates x pixels, at ~10 bits per value.
DEFAULT_PARCELS_PER_TILE = 1400
#: Largest planted shift accepted, in days (the shift search of the paper spans +-60).
MAX_SHIFT = 100
#: Largest relative difference of a tile's calibration gain per band from 1 (same sensors).
TILE_GAIN_SPREAD = 0.01
#: Spread (log-normal sigma) of the per-date aerosol load around the standard atmosphere.
AEROSOL_SIGMA = 0.35
#: Half-width of the uniform per-parcel jitter around the tile's planted shift, in days.
PARCEL_SHIFT_JITTER = 3.0
#: The day a season stretch keeps in place (mid-year): with stretch a, what the reference shows
#: at day STRETCH_PIVOT + x the tile shows at STRETCH_PIVOT + a x (before the shifts).
STRETCH_PIVOT = 182.0
#: Accepted season stretch factors: a warp of the time axis, not only a translation.
STRETCH_RANGE = (0.5, 2.0)

SIGN_CONVENTION = (
    "A tile with planted shift s has phenology(t) = reference_curve(t + s), t = day of year "
    "(date position): s > 0 means the season comes s days earlier than in the reference. "
    "The shift TimeMatch estimates (target positions + d align with the source) is "
    "d = s_target - s_source."
)

START_DATE = 20170101
END_DATE = 20171231
YEAR_START = dt.date(2017, 1, 1)
N_BANDS = 10
#: Parcels processed together; bounds the working memory (~60 MB) without changing the bytes.
CHUNK_PARCELS = 250
#: Blosc as zarr 2.x wrote it, with zstd (about 20 % smaller than zarr 2's default lz4 on this data).
COMPRESSOR = numcodecs.Blosc(cname="zstd", clevel=5, shuffle=numcodecs.Blosc.SHUFFLE)

# Surface reflectance endmembers, bands B02 B03 B04 B05 B06 B07 B08 B8A B11 B12.
SOIL = np.array([0.07, 0.10, 0.14, 0.17, 0.20, 0.22, 0.24, 0.26, 0.33, 0.28])
GREEN_CEREAL = np.array([0.030, 0.070, 0.025, 0.11, 0.30, 0.38, 0.42, 0.44, 0.20, 0.10])
GREEN_BROADLEAF = np.array([0.025, 0.065, 0.022, 0.12, 0.35, 0.45, 0.50, 0.52, 0.22, 0.10])
DRY_VEGETATION = np.array([0.06, 0.09, 0.12, 0.16, 0.20, 0.23, 0.26, 0.28, 0.36, 0.30])
YELLOW_FLOWER = np.array([0.04, 0.20, 0.20, 0.25, 0.33, 0.38, 0.42, 0.44, 0.25, 0.13])
ENDMEMBERS = np.stack([SOIL, GREEN_CEREAL, GREEN_BROADLEAF, DRY_VEGETATION, YELLOW_FLOWER]).astype(np.float32)
CLOUD = np.array([0.50, 0.48, 0.47, 0.48, 0.50, 0.51, 0.52, 0.52, 0.40, 0.28], dtype=np.float32)
#: Top-of-atmosphere path reflectance added to the surface (strongest in blue), as in L1C.
PATH_REFLECTANCE = np.array([0.060, 0.035, 0.020, 0.018, 0.016, 0.015, 0.014, 0.014, 0.006, 0.003])
#: Per-pixel, per-date sensor/atmosphere noise (reflectance units) per band.
NOISE_STD = np.array([0.002, 0.002, 0.002, 0.002, 0.0025, 0.0025, 0.003, 0.003, 0.0025, 0.002], dtype=np.float32)


@dataclass(frozen=True)
class Phenology:
    """Reference-frame (planted shift 0) phenology of a class; days are days of the year.

    Green cover = (winter (1 - u) + peak u) (1 - v) + autumn r, with
    u = sigmoid((t - green_up) / green_up_width), v = sigmoid((t - senescence) / senescence_width),
    r = sigmoid((t - regrowth) / 12); dry standing crop 0.85 peak v until harvest, then stubble.
    ``plateau`` classes (meadows, woody land) instead have a flat seasonal cover, with
    parcel-specific mowing dips when ``mown``.
    """

    green_up: float = 140.0
    senescence: float = 205.0
    harvest: float = 230.0
    peak: float = 0.88
    winter: float = 0.0
    autumn: float = 0.0
    regrowth: float = 285.0
    green_up_width: float = 7.0
    senescence_width: float = 6.0
    broadleaf: float = 0.0
    flowering: float = 0.0
    flower_cover: float = 0.0
    flower_width: float = 9.0
    plateau: bool = False
    mown: bool = False


_WINTER = dict(green_up_width=9.0, autumn=0.25)
#: Reference phenology per class name (``<season>_<crop>``, as the project maps codes with seasons split).
PHENOLOGY: dict[str, Phenology] = {
    "meadow": Phenology(plateau=True, mown=True, peak=0.85, winter=0.55),
    "corn": Phenology(172, 262, 285, 0.92, green_up_width=7, senescence_width=8, broadleaf=0.6),
    "winter_barley": Phenology(86, 184, 206, 0.86, winter=0.36, **_WINTER),
    "winter_rye": Phenology(80, 193, 216, 0.80, winter=0.40, **_WINTER),
    "winter_triticale": Phenology(92, 200, 222, 0.88, winter=0.32, **_WINTER),
    "winter_wheat": Phenology(98, 208, 230, 0.92, winter=0.28, **_WINTER),
    "winter_oat": Phenology(94, 198, 220, 0.85, winter=0.30, **_WINTER),
    "winter_rapeseed": Phenology(72, 178, 200, 0.90, winter=0.45, autumn=0.40, regrowth=255, green_up_width=10,
                                 senescence_width=7, broadleaf=0.9, flowering=132, flower_cover=0.55),
    "winter_peas": Phenology(90, 176, 196, 0.80, winter=0.25, autumn=0.2, broadleaf=0.8),
    "spring_peas": Phenology(132, 188, 205, 0.82, senescence_width=5, broadleaf=0.8, autumn=0.1),
    "spring_barley": Phenology(140, 203, 228, 0.86, autumn=0.10),
    "spring_oat": Phenology(146, 213, 238, 0.90, autumn=0.10),
    "spring_wheat": Phenology(143, 218, 240, 0.88, autumn=0.10),
    "spring_rye": Phenology(136, 200, 222, 0.80, autumn=0.10),
    "spring_triticale": Phenology(141, 208, 230, 0.86, autumn=0.10),
    "spring_rapeseed": Phenology(122, 214, 235, 0.85, broadleaf=0.9, flowering=175, flower_cover=0.45),
    "horsebeans": Phenology(140, 222, 245, 0.90, senescence_width=7, broadleaf=0.9),
    "sunflowers": Phenology(158, 228, 262, 0.78, green_up_width=8, senescence_width=9, broadleaf=1.0,
                            flowering=200, flower_cover=0.30, flower_width=8),
}
#: What ``unknown`` parcels grow; a code always gets the same one (picked by a checksum of the code).
UNKNOWN_PHENOLOGIES: tuple[Phenology, ...] = (
    Phenology(160, 300, 305, 0.95, green_up_width=10, senescence_width=10, broadleaf=1.0),  # sugar beet
    Phenology(160, 215, 240, 0.90, senescence_width=7, broadleaf=1.0),  # potatoes
    Phenology(plateau=True, peak=0.85, winter=0.65, broadleaf=0.7),  # woody
    Phenology(110, 250, 280, 0.50, winter=0.30, green_up_width=15, senescence_width=15),  # fallow
    Phenology(125, 205, 228, 0.85, autumn=0.10),  # cereal mixtures
)

#: Share of each class per tile (normalised); ``unknown`` about 5 %. Mirrors the regions:
#: Jutland (spring barley, rye), south-west France (corn, sunflowers), eastern Austria.
CLASS_SHARES: dict[str, dict[str, float]] = {
    "DK": {"meadow": .305, "spring_barley": .16, "winter_wheat": .12, "corn": .07, "winter_barley": .06,
           "winter_rapeseed": .05, "winter_rye": .05, "spring_oat": .04, "winter_triticale": .04,
           "spring_peas": .015, "horsebeans": .015, "spring_wheat": .01, "spring_rye": .005,
           "spring_triticale": .004, "spring_rapeseed": .003, "winter_oat": .003, "unknown": .05},
    "FR1": {"meadow": .29, "winter_wheat": .155, "corn": .14, "sunflowers": .07, "winter_barley": .06,
            "winter_rapeseed": .045, "winter_triticale": .045, "horsebeans": .04, "spring_barley": .04,
            "spring_peas": .02, "winter_oat": .015, "spring_oat": .01, "winter_rye": .01,
            "winter_peas": .005, "spring_wheat": .005, "unknown": .05},
    "FR2": {"meadow": .31, "winter_wheat": .167, "corn": .10, "sunflowers": .09, "winter_barley": .06,
            "winter_rapeseed": .05, "winter_triticale": .04, "spring_peas": .04, "horsebeans": .04,
            "spring_barley": .025, "winter_oat": .01, "spring_oat": .008, "winter_rye": .006,
            "winter_peas": .004, "unknown": .05},
    "AT1": {"meadow": .27, "winter_wheat": .17, "corn": .13, "winter_barley": .075, "spring_barley": .055,
            "sunflowers": .045, "winter_rapeseed": .045, "winter_rye": .04, "winter_triticale": .04,
            "spring_oat": .025, "spring_peas": .022, "horsebeans": .012, "spring_wheat": .006,
            "spring_triticale": .004, "spring_rapeseed": .003, "unknown": .058},
}
#: Share of ``unknown`` parcels whose code is in no table (the rest use listed unknown codes).
UNLISTED_UNKNOWN_SHARE = 0.2
#: Share of Austria's labels written as digit strings, as some of the real ones are.
AUSTRIA_STRING_LABEL_SHARE = 0.3
#: Cloudiness per tile: probability that a date is cloudy (winter, summer).
CLOUDINESS: dict[str, tuple[float, float]] = {
    "DK": (0.65, 0.40), "FR1": (0.55, 0.25), "FR2": (0.55, 0.25), "AT1": (0.60, 0.30),
}


# ---------------------------------------------------------------------------------------------
# crop codes


@dataclass(frozen=True)
class CodeTable:
    """A country's national codes grouped by class, with sampling weights."""

    codes: dict[str, list[str]]  # class name -> codes
    weights: dict[str, np.ndarray]  # class name -> probabilities
    unlisted: list[str]  # codes in no table (they map to 'unknown')


_COUNT = re.compile(r"\((\d+)\)\s*$")


def read_code_table(country: str) -> CodeTable:
    """Codes per class from ``crop_codes/<country>.csv``, weighted like the real data.

    A code's weight is the parcel count its description ends with, e.g. ``Vårbyg (19799)``;
    without counts (Austria) the table's order is taken as frequency order (weight 1/rank).
    """
    text = resources.files("timematch.data").joinpath("crop_codes", f"{country}.csv").read_text("utf-8")
    rows = list(csv.DictReader(text.splitlines()))
    codes: dict[str, list[str]] = {}
    raw: dict[str, list[float]] = {}
    has_count: dict[str, list[bool]] = {}
    for row in rows:
        crop, season = row["crop"], row["season"]
        name = f"{season}_{crop}" if season and crop != "unknown" else crop
        match = _COUNT.search(row["description"])
        rank = len(codes.get(name, []))
        codes.setdefault(name, []).append(row["code"])
        raw.setdefault(name, []).append(float(match.group(1)) if match else 1.0 / (rank + 1))
        has_count.setdefault(name, []).append(match is not None)
    weights = {}
    for name, values in raw.items():
        counted = [v for v, c in zip(values, has_count[name]) if c]
        # codes without a count in a class that has counts: as rare as the rarest counted one
        w = np.array([v if c else min(counted) for v, c in zip(values, has_count[name])] if counted else values)
        weights[name] = w / w.sum()
    known = {code for group in codes.values() for code in group}
    if country == "france":
        candidates = ["ZXA", "ZXB", "QQR", "XJF", "WKU"]
    else:
        candidates = [str(c) for c in (9901, 9902, 9917, 9945, 9988)]
    return CodeTable(codes, weights, [c for c in candidates if c not in known])


def tile_class_counts(tile: str, parcels_per_tile: int = DEFAULT_PARCELS_PER_TILE) -> dict[str, int]:
    """Parcels per class the generator writes for ``tile`` (class names with seasons split).

    Exact (largest-remainder rounding of :data:`CLASS_SHARES`), independent of the seed.
    """
    short = short_name(resolve_tile(tile))
    shares = CLASS_SHARES[short]
    names = list(shares)
    p = np.array([shares[n] for n in names], dtype=np.float64)
    exact = p / p.sum() * parcels_per_tile
    counts = np.floor(exact).astype(np.int64)
    remainder = parcels_per_tile - counts.sum()
    order = np.argsort(-(exact - counts), kind="stable")
    counts[order[:remainder]] += 1
    return {name: int(c) for name, c in zip(names, counts) if c > 0}


# ---------------------------------------------------------------------------------------------
# calendar


def _day_to_int(day: int) -> int:
    date = YEAR_START + dt.timedelta(days=int(day))
    return date.year * 10000 + date.month * 100 + date.day


def make_calendar(n_dates: int, cloudiness: tuple[float, float], rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """An irregular 2017 calendar: day positions (sorted, distinct) and cloud percentages.

    Dates come from two interleaved 5-day orbit grids (as where Sentinel-2 orbits
    overlap), denser from July when Sentinel-2B joined, and never leave a gap longer
    than 30 days. Clear dates get 0-5 % clouds, cloudy ones 10-80 %.
    """
    phase = int(rng.integers(0, 5))
    offset = int(rng.integers(2, 4))
    candidates = np.union1d(np.arange(phase, 365, 5), np.arange((phase + offset) % 5, 365, 5))
    weight = np.where(candidates >= 182, 1.6, 1.0)
    # one date per 30-day window first, so the calendar has no long holes
    chosen: list[int] = []
    for start in range(0, 365, 30):
        window = np.flatnonzero((candidates >= start) & (candidates < start + 30))
        chosen.append(int(rng.choice(window)))
    rest = np.setdiff1d(np.arange(len(candidates)), chosen)
    p = weight[rest] / weight[rest].sum()
    chosen += rng.choice(rest, size=n_dates - len(chosen), replace=False, p=p).tolist()
    days = np.sort(candidates[np.array(chosen)])
    winter = (days < 90) | (days > 290)
    p_cloudy = np.where(winter, cloudiness[0], cloudiness[1])
    cloudy = rng.random(len(days)) < p_cloudy
    pct = np.where(cloudy, rng.uniform(10.0, 80.0, len(days)), rng.uniform(0.0, 5.0, len(days)))
    return days.astype(np.int64), np.round(pct, 2)


# ---------------------------------------------------------------------------------------------
# phenology


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(x, -40.0, 40.0)))


@dataclass
class ParcelParams:
    """Per-parcel phenology parameters, arrays of shape (P,) (mowing dates (P, 4), NaN = no cut)."""

    green_up: np.ndarray
    senescence: np.ndarray
    harvest: np.ndarray
    peak: np.ndarray
    winter: np.ndarray
    autumn: np.ndarray
    regrowth: np.ndarray
    green_up_width: np.ndarray
    senescence_width: np.ndarray
    broadleaf: np.ndarray
    flowering: np.ndarray
    flower_cover: np.ndarray
    flower_width: np.ndarray
    plateau: np.ndarray  # bool
    cuts: np.ndarray  # (P, 4) days


def draw_parcel_params(phenologies: Sequence[Phenology], rng: np.random.Generator) -> ParcelParams:
    """Parcel-specific variants of the class phenologies: timing jitter (~3 days per event),
    amplitude (-12 %..+5 %), and for meadows 0-4 mowing dates (first cut ~day 145)."""
    n = len(phenologies)

    def field(name: str) -> np.ndarray:
        return np.array([getattr(p, name) for p in phenologies], dtype=np.float64)

    common = rng.normal(0.0, 2.0, n)
    peak = np.minimum(field("peak") * rng.uniform(0.88, 1.05, n), 0.97)
    green_up = field("green_up") + common + rng.normal(0.0, 3.0, n)
    senescence = field("senescence") + common + rng.normal(0.0, 3.0, n)
    harvest = np.maximum(field("harvest") + common + rng.normal(0.0, 4.0, n), senescence + 8.0)
    n_cuts = rng.integers(0, 5, n)
    first = rng.normal(145.0, 8.0, n)
    gaps = rng.normal(42.0, 7.0, (n, 3))
    cuts = np.cumsum(np.concatenate([first[:, None], gaps], axis=1), axis=1)
    cuts[np.arange(4)[None, :] >= n_cuts[:, None]] = np.nan
    cuts[~np.array([p.mown for p in phenologies])] = np.nan
    return ParcelParams(
        green_up=green_up, senescence=senescence, harvest=harvest, peak=peak,
        winter=field("winter") * rng.uniform(0.85, 1.15, n), autumn=field("autumn") * rng.uniform(0.6, 1.4, n),
        regrowth=field("regrowth") + rng.normal(0.0, 8.0, n),
        green_up_width=field("green_up_width"), senescence_width=field("senescence_width"),
        broadleaf=field("broadleaf"), flowering=field("flowering") + common + rng.normal(0.0, 3.0, n),
        flower_cover=field("flower_cover") * rng.uniform(0.8, 1.2, n), flower_width=field("flower_width"),
        plateau=np.array([p.plateau for p in phenologies]), cuts=cuts,
    )


def cover_fractions(params: ParcelParams, t: np.ndarray) -> np.ndarray:
    """Endmember fractions (P, T, 5): soil, green cereal, green broadleaf, dry vegetation,
    yellow flowers, at reference-frame days ``t`` (P, T) (the tile's shift already added)."""
    col = {k: v[:, None] for k, v in vars(params).items() if k != "cuts"}
    u = _sigmoid((t - col["green_up"]) / col["green_up_width"])
    v = _sigmoid((t - col["senescence"]) / col["senescence_width"])
    h = _sigmoid((t - col["harvest"]) / 3.0)
    r = _sigmoid((t - col["regrowth"]) / 12.0)
    green = (col["winter"] * (1 - u) + col["peak"] * u) * (1 - v) + col["autumn"] * r
    dry = 0.85 * col["peak"] * v * (1 - h) + 0.15 * h * (1 - r)
    flower = col["flower_cover"] * np.exp(-0.5 * ((t - col["flowering"]) / col["flower_width"]) ** 2)
    flower = np.where(col["flower_cover"] > 0, np.minimum(flower, green), 0.0)
    green = green - flower

    # meadows: a seasonal plateau with sudden cuts that grow back over ~2 weeks
    base = col["winter"] + (col["peak"] - col["winter"]) * _sigmoid((t - 105.0) / 12.0) \
        - 0.2 * _sigmoid((t - 305.0) / 15.0)
    since = t[:, :, None] - params.cuts[:, None, :]
    dips = np.where(since >= 0, 0.6 * np.exp(-np.where(since >= 0, since, 0.0) / 12.0), 0.0)
    mown = base * np.prod(1.0 - np.nan_to_num(dips), axis=2)
    cut_residue = 0.4 * (base - mown)
    meadow = col["plateau"]
    green = np.where(meadow, mown, green)
    dry = np.where(meadow, cut_residue, dry)
    flower = np.where(meadow, 0.0, flower)

    total = green + dry + flower
    scale = np.where(total > 1.0, 1.0 / np.maximum(total, 1e-9), 1.0)
    green, dry, flower = green * scale, dry * scale, flower * scale
    soil = 1.0 - green - dry - flower
    fractions = np.stack(
        [soil, green * (1 - col["broadleaf"]), green * col["broadleaf"], dry, flower], axis=-1
    )
    return np.clip(fractions, 0.0, 1.0)


# ---------------------------------------------------------------------------------------------
# one tile


@dataclass
class TilePlan:
    """Everything about a tile except the pixels: calendar, parcels, their metadata."""

    short: str
    path: str
    days: np.ndarray  # (T,) positions
    cloudy_pct: np.ndarray  # (T,)
    class_names: list[str]  # (P,)
    phenologies: list[Phenology]  # (P,)
    metadata: dict[str, Any]


def _n_pixels(class_names: Sequence[str], rng: np.random.Generator) -> np.ndarray:
    median = np.array([30.0 if c == "meadow" else 50.0 if c in ("corn", "sunflowers") else 42.0
                       for c in class_names])
    return np.clip(np.round(median * np.exp(rng.normal(0.0, 0.65, len(class_names)))), 10, 500).astype(np.int64)


def plan_tile(short: str, parcels_per_tile: int, seed: int) -> tuple[TilePlan, np.random.Generator]:
    """Draw a tile's calendar and parcels; returns the plan and the generator for its pixels."""
    tile_index = list(TILES).index(short)
    calendar_rng, parcel_rng, pixel_rng = (
        np.random.default_rng(s) for s in np.random.SeedSequence([seed, tile_index]).spawn(3)
    )
    path = TILES[short]
    country = path.split("/")[0]
    days, cloudy_pct = make_calendar(TILE_CALENDAR_SIZES[short], CLOUDINESS[short], calendar_rng)

    table = read_code_table(country)
    counts = tile_class_counts(short, parcels_per_tile)
    class_names = np.repeat(list(counts), list(counts.values()))
    class_names = class_names[parcel_rng.permutation(len(class_names))].tolist()

    labels: list[int | str] = []
    phenologies: list[Phenology] = []
    for name in class_names:
        if name == "unknown" and parcel_rng.random() < UNLISTED_UNKNOWN_SHARE:
            code = str(parcel_rng.choice(table.unlisted))
        else:
            group = table.codes[name]
            code = group[int(parcel_rng.choice(len(group), p=table.weights[name]))]
        if name == "unknown":
            phenologies.append(UNKNOWN_PHENOLOGIES[zlib.crc32(code.encode()) % len(UNKNOWN_PHENOLOGIES)])
        else:
            phenologies.append(PHENOLOGY[name])
        if country == "france":
            labels.append(code)
        elif country == "austria" and parcel_rng.random() < AUSTRIA_STRING_LABEL_SHARE:
            labels.append(code)
        else:
            labels.append(int(code))

    n = len(class_names)
    n_pixels = _n_pixels(class_names, parcel_rng)
    ids = parcel_rng.choice(9_000_000, size=n, replace=False) + 1_000_000
    n_blocks = max(1, n // 50)
    blocks = parcel_rng.integers(0, n_blocks, n)
    area = n_pixels * 100.0 * parcel_rng.uniform(1.0, 1.25, n)
    aspect = parcel_rng.uniform(1.0, 4.0, n)
    perimeter = 2.0 * (np.sqrt(area * aspect) + np.sqrt(area / aspect)) * parcel_rng.uniform(1.0, 1.3, n)
    cover = parcel_rng.uniform(0.45, 0.95, n)
    parcels = [
        {
            "id": int(ids[i]), "label": labels[i], "n_pixels": int(n_pixels[i]), "block": int(blocks[i]),
            "geometric_features": [round(float(perimeter[i]), 2), round(float(area[i]), 2),
                                   round(float(perimeter[i] / area[i]), 6), round(float(cover[i]), 4)],
        }
        for i in range(n)
    ]
    metadata = {
        "start_date": START_DATE,
        "end_date": END_DATE,
        "dates": [_day_to_int(d) for d in days],
        "cloudy_pct": [float(c) for c in cloudy_pct],
        "parcels": parcels,
    }
    plan = TilePlan(short, path, days, cloudy_pct, class_names, phenologies, metadata)
    return plan, pixel_rng


def draw_radiometry(n_dates: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A tile's radiometry: gain per band (10,), path reflectance per date and band (T, 10),
    transmittance per date (T,).

    Every tile is seen by the same Sentinel-2 sensors, so calibration is shared: a tile's
    gain per band differs from 1 by at most :data:`TILE_GAIN_SPREAD`. What differs between
    acquisitions is the atmosphere: each date has its own aerosol load (log-normal around
    the standard one), which scales the path reflectance (strongest in blue) and dims the
    surface signal a little. A classifier therefore cannot key on the exact reflectance of
    one tile's calendar, as on real L1C data, and the difference between tiles that remains
    for adaptation is the planted phenology shift (plus calendars, clouds and class mix).
    """
    gain = 1.0 + rng.uniform(-TILE_GAIN_SPREAD, TILE_GAIN_SPREAD, N_BANDS)
    aerosol = rng.lognormal(0.0, AEROSOL_SIGMA, n_dates)  # relative to the standard atmosphere
    path_reflectance = aerosol[:, None] * PATH_REFLECTANCE[None, :]
    transmittance = np.clip(1.0 - 0.05 * (aerosol - 1.0), 0.85, 1.02)
    return gain.astype(np.float32), path_reflectance.astype(np.float32), transmittance.astype(np.float32)


def iter_parcel_pixels(plan: TilePlan, shift: float, rng: np.random.Generator,
                       class_shifts: Mapping[str, int] | None = None,
                       stretch: float = 1.0) -> Iterator[tuple[int, np.ndarray]]:
    """Yield ``(index, pixels)`` for every parcel of the plan, pixels uint16 (T, 10, S).

    Vectorised over chunks of :data:`CHUNK_PARCELS` parcels. Reflectance of a pixel at a
    date = transmittance(date) * tile gain * (cover fractions @ endmembers) + path
    reflectance(date) + noise, then clouds; times 10000 as in L1C.
    """
    parcels = plan.metadata["parcels"]
    n = len(parcels)
    days = plan.days.astype(np.float64)
    n_dates = len(days)
    cloud_p = plan.cloudy_pct / 100.0
    # tile-level draws first, so they do not depend on the number of parcels
    gain, path_reflectance, transmittance = draw_radiometry(n_dates, rng)
    n_blocks = max(p["block"] for p in parcels) + 1
    block_timing = rng.normal(0.0, 1.5, n_blocks)
    block_timing -= block_timing.mean()  # blocks vary around the tile's shift, never move it
    block_soil = rng.uniform(0.85, 1.15, n_blocks)
    params = draw_parcel_params(plan.phenologies, rng)
    blocks = np.array([p["block"] for p in parcels])
    parcel_shift = shift + rng.uniform(-PARCEL_SHIFT_JITTER, PARCEL_SHIFT_JITTER, n) + block_timing[blocks]
    if class_shifts:
        parcel_shift = parcel_shift + np.array([class_shifts.get(c, 0) for c in plan.class_names], dtype=np.float64)
    if stretch != 1.0:  # the calendar seen in the reference frame: a warp, then the shifts
        days = STRETCH_PIVOT + (days - STRETCH_PIVOT) / stretch
    soil_brightness = rng.uniform(0.75, 1.25, n) * block_soil[blocks]
    n_pixels = np.array([p["n_pixels"] for p in parcels])

    for start in range(0, n, CHUNK_PARCELS):
        idx = np.arange(start, min(n, start + CHUNK_PARCELS))
        chunk = ParcelParams(**{k: v[idx] for k, v in vars(params).items()})
        t = days[None, :] + parcel_shift[idx, None]  # phenology(t) = reference(t + s)
        frac = cover_fractions(chunk, t).astype(np.float32)  # (P, T, 5)
        owner = np.repeat(np.arange(len(idx)), n_pixels[idx])
        n_px = len(owner)
        # within a parcel, pixels differ in green vigour and soil brightness
        f = frac[owner]  # (S, T, 5)
        vigour = rng.normal(1.0, 0.07, n_px).astype(np.float32)[:, None, None]
        others = f[:, :, 3:].sum(-1, keepdims=True)
        green = np.minimum(f[:, :, 1:3] * vigour, (1.0 - others) * f[:, :, 1:3]
                           / np.maximum(f[:, :, 1:3].sum(-1, keepdims=True), 1e-6))
        soil = (soil_brightness[idx][owner] * rng.normal(1.0, 0.04, n_px)).astype(np.float32)
        f[:, :, 1:3] = green
        f[:, :, 0] = np.maximum(1.0 - green.sum(-1) - others[:, :, 0], 0.0) * soil[:, None]
        refl = f @ ENDMEMBERS  # (S, T, 10)
        refl *= gain
        refl *= transmittance[None, :, None]
        refl += path_reflectance[None]
        refl += rng.standard_normal(refl.shape, dtype=np.float32) * NOISE_STD
        # clouds: a parcel lies under a cloud with probability cloudy_pct, then most of its pixels do
        covered = rng.random((len(idx), n_dates)) < cloud_p[None, :]
        share = rng.uniform(0.6, 1.0, (len(idx), n_dates))
        brightness = rng.uniform(0.7, 1.4, (len(idx), n_dates)).astype(np.float32)
        draw = rng.random((n_px, n_dates))
        cloudy = covered[owner] & (draw < share[owner])
        shadow = covered[owner] & (draw > 0.97)
        px, tt = np.nonzero(cloudy)
        alpha = rng.uniform(0.5, 1.0, len(px)).astype(np.float32)[:, None]
        cloud = CLOUD[None, :] * brightness[owner[px], tt][:, None]
        refl[px, tt] = refl[px, tt] * (1 - alpha) + alpha * cloud
        refl[shadow] *= 0.45
        pixels = np.clip(np.rint(refl * 10000.0), 0, 65535).astype(np.uint16)
        bounds = np.concatenate([[0], np.cumsum(n_pixels[idx])])
        for j, i in enumerate(idx):
            yield int(i), np.ascontiguousarray(pixels[bounds[j]:bounds[j + 1]].transpose(1, 2, 0))


# ---------------------------------------------------------------------------------------------
# writing


def zarray_metadata(shape: Sequence[int]) -> bytes:
    """The ``.zarray`` document zarr writes for a one-chunk uint16 format-2 array."""
    doc = {
        "shape": list(shape), "chunks": list(shape), "dtype": "<u2", "fill_value": 0, "order": "C",
        "filters": None, "dimension_separator": ".", "compressor": COMPRESSOR.get_config(), "zarr_format": 2,
    }
    return json.dumps(doc, indent=2).encode()


def write_parcel_array(path: Path, pixels: np.ndarray) -> None:
    """Write one parcel as a zarr format-2 array: ``.zarray`` and the single chunk ``0.0.0``.

    The same ``.zarray`` and chunk bytes as ``zarr.create_array(store=path, data=pixels,
    zarr_format=2, compressors=COMPRESSOR)``, without its per-array overhead (~3 ms, a
    third of a minute for the default dataset) and without the optional empty ``.zattrs``.
    """
    if pixels.dtype != np.uint16 or pixels.ndim != 3:
        raise ValueError(f"{path}: expected uint16 (T, C, S) pixels, got {pixels.dtype} {pixels.shape}")
    path.mkdir(parents=True, exist_ok=True)
    (path / ".zarray").write_bytes(zarray_metadata(pixels.shape))
    (path / "0.0.0").write_bytes(COMPRESSOR.encode(pixels))


def _resolve_tiles(tiles: Sequence[str] | None) -> list[str]:
    if tiles is None:
        return list(TILES)
    shorts = []
    for name in tiles:
        short = short_name(resolve_tile(name))
        if short not in TILES:
            raise ConfigError(f"tile {name!r}: the synthetic generator writes only {list(TILES)}")
        if short not in shorts:
            shorts.append(short)
    return shorts


def _option_tile(option: str, name: str) -> str:
    """The short name of the tile an option names; unknown tiles are a one-line error."""
    short = short_name(resolve_tile(name))
    if short not in TILES:
        raise ConfigError(f"{option}: unknown tile {name!r}; use one of {list(TILES)}")
    return short


def _resolve_shifts(shifts: Mapping[str, int] | None) -> dict[str, int]:
    result = dict(DEFAULT_SHIFTS)
    for name, days in (shifts or {}).items():
        short = _option_tile("shifts", name)
        if not isinstance(days, (int, np.integer)) or abs(int(days)) > MAX_SHIFT:
            raise ConfigError(f"shifts[{name!r}] = {days!r}: expected an integer number of days in "
                              f"[-{MAX_SHIFT}, {MAX_SHIFT}]")
        result[short] = int(days)
    return result


def _resolve_warps(shorts: Sequence[str], class_shifts: Mapping[str, Mapping[str, int]] | None,
                   stretch: Mapping[str, float] | None) -> tuple[dict[str, dict[str, int]], dict[str, float]]:
    """Validated per-class shifts and stretches, keyed by short tile name (only non-default ones)."""
    classes: dict[str, dict[str, int]] = {}
    for name, per_class in (class_shifts or {}).items():
        short = _option_tile("class_shifts", name)
        for cls, days in per_class.items():
            known = set(CLASS_SHARES[short])
            if cls not in known:
                raise ConfigError(f"class_shifts[{name!r}]: the tile has no class {cls!r}; its classes are "
                                  f"{', '.join(sorted(known))}")
            if not isinstance(days, (int, np.integer)) or abs(int(days)) > MAX_SHIFT:
                raise ConfigError(f"class_shifts[{name!r}][{cls!r}] = {days!r}: expected an integer number of "
                                  f"days in [-{MAX_SHIFT}, {MAX_SHIFT}]")
        classes[short] = {cls: int(days) for cls, days in per_class.items() if int(days)}
    stretches: dict[str, float] = {}
    for name, factor in (stretch or {}).items():
        short = _option_tile("stretch", name)
        low, high = STRETCH_RANGE
        if not isinstance(factor, (int, float)) or not low <= float(factor) <= high:
            raise ConfigError(f"stretch[{name!r}] = {factor!r}: expected a factor in [{low}, {high}] (1 = none)")
        if float(factor) != 1.0:
            stretches[short] = float(factor)
    return ({s: classes[s] for s in shorts if classes.get(s)}, {s: stretches[s] for s in shorts if s in stretches})


def expected_shifts(planted: Mapping[str, int]) -> dict[str, int]:
    """The shift TimeMatch should estimate for each ordered pair: ``d = s_target - s_source``."""
    return {f"{src}->{tgt}": int(planted[tgt] - planted[src]) for src in planted for tgt in planted if src != tgt}


def _check_writable(root: Path, shorts: Sequence[str]) -> None:
    """Refuse to write over tile folders that an earlier synthetic run did not leave."""
    existing = [root / TILES[s] for s in shorts if (root / TILES[s]).exists()]
    if existing and not (root / GROUND_TRUTH_FILE).is_file():
        raise DatasetError(
            f"{existing[0]}: already exists and {root} holds no {GROUND_TRUTH_FILE}, so it is not a "
            "synthetic dataset; refusing to overwrite it. Choose an empty folder as root."
        )


def generate_dataset(
    root: Path,
    parcels_per_tile: int = DEFAULT_PARCELS_PER_TILE,
    seed: int = 0,
    shifts: Mapping[str, int] | None = None,
    tiles: Sequence[str] | None = None,
    progress: Callable[[str], None] | None = None,
    class_shifts: Mapping[str, Mapping[str, int]] | None = None,
    stretch: Mapping[str, float] | None = None,
) -> dict:
    """Write the synthetic dataset under ``root`` in the published format; return a summary.

    ``shifts`` maps short tile names (DK, FR1, FR2, AT1) to planted shifts in days
    (missing ones keep :data:`DEFAULT_SHIFTS`); ``tiles`` limits the tiles written (a
    tile's bytes depend only on the seed, its size and its shift, not on the other
    tiles). ``class_shifts`` (tile -> class -> extra days) and ``stretch`` (tile -> factor) warp
    a tile's seasons beyond one translation (see the module docstring); without them the bytes
    are those of the default data. The same arguments give the same bytes. ``root/synthetic_ground_truth.json``
    describes the tiles of this call. Tile folders of an earlier synthetic run are
    replaced; a folder holding anything else is refused (:class:`DatasetError`).

    Returns a JSON-serialisable summary: root, tiles (path, parcels, dates, planted
    shift), parcels, planted_shifts, expected_shifts, seed, parcels_per_tile,
    generator_version, seconds.
    """
    started = time.perf_counter()
    if parcels_per_tile < 1:
        raise ConfigError(f"parcels_per_tile must be >= 1, got {parcels_per_tile}")
    root = Path(root).expanduser()
    shorts = _resolve_tiles(tiles)
    all_shifts = _resolve_shifts(shifts)
    planted = {s: all_shifts[s] for s in shorts}
    per_class, stretches = _resolve_warps(shorts, class_shifts, stretch)
    _check_writable(root, shorts)
    root.mkdir(parents=True, exist_ok=True)
    # written first: a run interrupted half-way can be re-run over its own leftovers
    _write_ground_truth(root, seed, parcels_per_tile, planted, per_class, stretches)
    summary_tiles: dict[str, Any] = {}
    for short in shorts:
        tile_started = time.perf_counter()
        plan, pixel_rng = plan_tile(short, parcels_per_tile, seed)
        tile_path = root / plan.path
        if tile_path.exists():
            shutil.rmtree(tile_path)
        (tile_path / "data").mkdir(parents=True)
        (tile_path / "meta").mkdir(parents=True)
        # compression and file writes release the GIL: overlap them with the next chunk's maths
        with ThreadPoolExecutor(max_workers=2) as pool:
            pending: deque[Future] = deque()
            for index, pixels in iter_parcel_pixels(plan, planted[short], pixel_rng, per_class.get(short),
                                                    stretches.get(short, 1.0)):
                pending.append(pool.submit(write_parcel_array, tile_path / "data" / f"{index}.zarr", pixels))
                while len(pending) > 2 * CHUNK_PARCELS:  # bound the memory held by queued arrays
                    pending.popleft().result()
            for future in pending:
                future.result()
        (tile_path / "meta" / "metadata.pkl").write_bytes(pickle.dumps(plan.metadata, protocol=4))
        summary_tiles[short] = {
            "path": plan.path, "parcels": len(plan.class_names), "dates": len(plan.days),
            "planted_shift_days": planted[short],
        }
        if progress:
            progress(f"{short} ({plan.path}): {len(plan.class_names)} parcels, {len(plan.days)} dates, "
                     f"planted shift {planted[short]:+d} d, {time.perf_counter() - tile_started:.1f} s")
    return {
        "root": str(root),
        "tiles": summary_tiles,
        "parcels": sum(t["parcels"] for t in summary_tiles.values()),
        "planted_shifts": planted,
        "expected_shifts": expected_shifts(planted),
        **({"class_shifts": per_class} if per_class else {}),
        **({"stretch": stretches} if stretches else {}),
        "seed": seed,
        "parcels_per_tile": parcels_per_tile,
        "generator_version": GENERATOR_VERSION,
        "seconds": round(time.perf_counter() - started, 2),
    }


def _write_ground_truth(root: Path, seed: int, parcels_per_tile: int, planted: Mapping[str, int],
                        class_shifts: Mapping[str, Mapping[str, int]] | None = None,
                        stretch: Mapping[str, float] | None = None) -> None:
    truth = {
        "generator": "timematch.data.synthetic",
        "generator_version": GENERATOR_VERSION,
        "seed": seed,
        "parcels_per_tile": parcels_per_tile,
        "sign_convention": SIGN_CONVENTION,
        "planted_shifts": dict(planted),
        "parcel_shift_jitter_days": PARCEL_SHIFT_JITTER,
        "tiles": {s: {"path": TILES[s], "dates": TILE_CALENDAR_SIZES[s], "planted_shift_days": planted[s]}
                  for s in planted},
        "expected_shifts": expected_shifts(planted),
    }
    if class_shifts:
        truth["class_shifts"] = {tile: dict(v) for tile, v in class_shifts.items()}
    if stretch:
        truth["stretch"] = dict(stretch)
        truth["stretch_pivot_day"] = STRETCH_PIVOT
    (root / GROUND_TRUTH_FILE).write_text(json.dumps(truth, indent=1) + "\n")


def read_ground_truth(root: Path) -> dict:
    """The ground truth a synthetic dataset was written with (``synthetic_ground_truth.json``)."""
    path = Path(root) / GROUND_TRUTH_FILE
    if not path.is_file():
        raise DatasetError(f"{path}: missing; {root} is not a synthetic dataset (write one with "
                           "`python -m timematch.data synth --root DIR`)")
    return json.loads(path.read_text())


def planted_shift(root: Path | str, source: str, target: str) -> int | None:
    """The shift a perfect estimate finds for ``source -> target`` (short tile names) on a synthetic
    dataset at ``root`` (``d = s_target - s_source``, the tiles' translations; a tile's per-class
    shifts and stretch come on top); None when ``root`` holds no synthetic ground truth."""
    planted = _planted_shifts(str(root))
    if planted is None or source not in planted or target not in planted:
        return None
    return int(planted[target]) - int(planted[source])


@lru_cache(maxsize=16)
def _planted_shifts(root: str) -> dict | None:
    """A dataset's planted shifts per tile, read once per process (runs of a launch ask per trial)."""
    try:
        planted = json.loads((Path(root) / GROUND_TRUTH_FILE).read_text())["planted_shifts"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return planted if isinstance(planted, dict) else None


# ---------------------------------------------------------------------------------------------
# checking by eye


def class_ndvi_curves(
    root: Path, tile: str, max_parcels_per_class: int = 40, min_parcels: int = 5, max_cloudy_pct: float = 100.0
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Median NDVI per class and date of a tile, read back from disk.

    NDVI per parcel and date is the median over its pixels, then the median over up to
    ``max_parcels_per_class`` parcels (both medians resist scattered clouds; dates where
    most parcels are under clouds are dropped with ``max_cloudy_pct``). Returns the kept
    date positions (T',) and class name -> NDVI (T',), for classes with ``min_parcels`` parcels.
    """
    from timematch.data.classes import CropCodes
    from timematch.data.format import TileReader

    reader = TileReader(root, tile)
    codes = CropCodes(reader.country)
    members: dict[str, list[int]] = {}
    for i, parcel in enumerate(reader.parcels):
        members.setdefault(codes.class_of(parcel["label"]), []).append(i)
    keep = np.asarray(reader.metadata["cloudy_pct"], dtype=np.float64) <= max_cloudy_pct
    curves = {}
    for name, indices in sorted(members.items()):
        if len(indices) < min_parcels:
            continue
        per_parcel = []
        for i in indices[:max_parcels_per_class]:
            pixels = reader.read_parcel(i)[keep].astype(np.float64)
            red, nir = pixels[:, 2], pixels[:, 6]
            per_parcel.append(np.median((nir - red) / np.maximum(nir + red, 1.0), axis=1))
        curves[name] = np.median(np.stack(per_parcel), axis=0)
    return reader.positions[keep], curves


def plot_class_ndvi(root: Path, out_png: Path, tiles: Sequence[str] | None = None,
                    max_classes: int = 8, max_cloudy_pct: float = 20.0) -> Path:
    """PNG with one panel per tile: median NDVI per class over the day of year.

    Shows the planted shifts: the same class (same colour in every panel) greens up and
    peaks earlier in a tile with a larger shift. Classes shown: the ``max_classes`` most
    common ones (``unknown`` left out); dates with more than ``max_cloudy_pct`` % clouds
    are left out (on those most parcels are under clouds).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    root = Path(root).expanduser()
    out_png = Path(out_png)
    found = [s for s in TILES if (root / TILES[s] / "meta" / "metadata.pkl").is_file()]
    shorts = _resolve_tiles(tiles) if tiles is not None else found
    if not shorts:
        raise DatasetError(f"{root}: no tile to plot (expected <country>/<tile>/<year>/meta/metadata.pkl)")
    planted = {}
    if (root / GROUND_TRUTH_FILE).is_file():
        planted = read_ground_truth(root).get("planted_shifts", {})
    data = {s: class_ndvi_curves(root, s, max_cloudy_pct=max_cloudy_pct) for s in shorts}
    totals: dict[str, int] = {}
    for s in shorts:
        for name, count in tile_class_counts(s, 1000).items():
            if name != "unknown" and name in data[s][1]:
                totals[name] = totals.get(name, 0) + count
    shown = sorted(sorted(totals, key=lambda k: -totals[k])[:max_classes])
    colours = {name: plt.get_cmap("tab10")(i % 10) for i, name in enumerate(shown)}

    ncols = 2 if len(shorts) > 1 else 1
    nrows = (len(shorts) + ncols - 1) // ncols
    fig, axes = plt.subplots(nrows, ncols, figsize=(7.5 * ncols, 4.2 * nrows), sharey=True, squeeze=False)
    for ax, short in zip(axes.flat, shorts):
        positions, curves = data[short]
        for name in shown:
            if name in curves:
                ax.plot(positions + 1, curves[name], "-o", ms=2.5, lw=1.4, color=colours[name], label=name)
        shift = planted.get(short)
        title = f"{short}  {TILES[short]}" + (f"   planted shift {shift:+d} d" if shift is not None else "")
        ax.set_title(title, fontsize=11)
        ax.set_xlim(1, 365)
        ax.set_xticks([1, 32, 60, 91, 121, 152, 182, 213, 244, 274, 305, 335],
                      ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"])
        ax.grid(alpha=0.3)
        ax.set_ylabel("median NDVI")
    for ax in list(axes.flat)[len(shorts):]:
        ax.axis("off")
    handles = [Line2D([], [], color=colours[name], marker="o", ms=3, label=name) for name in shown]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(shown), 5), frameon=False, fontsize=10)
    fig.suptitle(f"Synthetic TimeMatch tiles: median NDVI per class on dates with <= {max_cloudy_pct:g} % clouds"
                 "\n(planted shift s: phenology(t) = reference(t + s), the season comes s days earlier)", fontsize=12)
    fig.tight_layout(rect=(0, 0.09 if len(shown) > 5 else 0.06, 1, 0.95))
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png

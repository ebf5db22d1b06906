"""Crop classes and national codes of the synthetic tiles.

Owns what a tile's parcels are: how many parcels of each class a tile has
(:data:`CLASS_SHARES`, imbalanced like LPIS data: meadow about 30 %, then cereals and corn, a
long tail, about 5 % ``unknown``; :func:`tile_class_counts`) and which real national code a
parcel's label takes (:func:`read_code_table`, from ``timematch/data/crop_codes/<country>.csv``,
weighted like the real data, some ``unknown`` codes in no table). Class names are
``<season>_<crop>``, as the project maps codes with seasons split.
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from importlib import resources

import numpy as np

from timematch.data.tiles import resolve_tile, short_name

#: 1400 parcels per tile: ~10 s and ~230 MB on disk for the four tiles, 9 classes of >= 56 parcels
#: per tile besides `unknown`. Size grows with parcels x dates x pixels, at ~10 bits per value.
DEFAULT_PARCELS_PER_TILE = 1400

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

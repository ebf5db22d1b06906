"""National crop codes -> crop classes, and the class-list rule of an experiment.

The tables in ``crop_codes/<country>.csv`` are the project's copy of the national LPIS
codifications (code, crop, season, description). A crop with spring and winter variants
becomes two classes, ``spring_<crop>`` and ``winter_<crop>``, unless seasons are merged.
Codes found in no table map to ``unknown``.
"""

from __future__ import annotations

import csv
from collections import Counter
from collections.abc import Iterable, Sequence
from functools import lru_cache
from importlib import resources

from timematch.data.tiles import COUNTRIES
from timematch.errors import ConfigError, DatasetError

UNKNOWN = "unknown"
#: The published class rule: a class enters the class list with this many source parcels.
PUBLISHED_MIN_PARCELS = 200


def normalize_code(code: object) -> str:
    """A national crop code as the tables key it: Austria's may be ints or digit strings."""
    if isinstance(code, float) and code.is_integer():
        code = int(code)
    return str(code).strip()


@lru_cache(maxsize=None)
def _table(country: str) -> tuple[tuple[str, str, str, str], ...]:
    if country not in COUNTRIES:
        raise DatasetError(f"unknown country {country!r}: crop code tables exist for {', '.join(COUNTRIES)}")
    text = resources.files("timematch.data").joinpath("crop_codes", f"{country}.csv").read_text("utf-8")
    rows = csv.DictReader(text.splitlines())
    return tuple((row["code"], row["crop"], row["season"], row["description"]) for row in rows)


class CropCodes:
    """The crop-code table of one country: ``class_of(code)`` gives the class name."""

    def __init__(self, country: str, merge_seasons: bool = False) -> None:
        self.country = country
        self.merge_seasons = merge_seasons
        self._classes: dict[str, str] = {}
        self.descriptions: dict[str, str] = {}
        for code, crop, season, description in _table(country):
            name = crop if (merge_seasons or not season or crop == UNKNOWN) else f"{season}_{crop}"
            self._classes[code] = name
            self.descriptions[code] = description

    def class_of(self, code: object) -> str:
        return self._classes.get(normalize_code(code), UNKNOWN)

    def is_known(self, code: object) -> bool:
        return normalize_code(code) in self._classes

    def class_names(self) -> list[str]:
        return sorted(set(self._classes.values()) | {UNKNOWN})


def select_classes(class_names: Iterable[str], min_parcels: int = PUBLISHED_MIN_PARCELS) -> list[str]:
    """The class list of an experiment: source classes with ``min_parcels`` parcels, sorted.

    ``unknown`` is included when it qualifies, like any class.
    """
    if min_parcels < 1:
        raise ConfigError(f"min_parcels must be >= 1, got {min_parcels}")
    counts = Counter(class_names)
    return sorted(name for name, count in counts.items() if count >= min_parcels)


def label_indices(class_names: Sequence[str], classes: Sequence[str]) -> list[int]:
    """Class index of each parcel in ``classes``.

    Parcels of a class outside the list count as ``unknown``: they get the index of
    ``unknown`` when it is in the list, else -1 (unlabelled: used as unlabelled target
    data, left out of losses and metrics).
    """
    index = {name: i for i, name in enumerate(classes)}
    fallback = index.get(UNKNOWN, -1)
    return [index.get(name, fallback) for name in class_names]

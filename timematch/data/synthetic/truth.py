"""Ground truth of the synthetic dataset: what was planted, and how to read it back.

Owns the planted phenology shifts (:data:`DEFAULT_SHIFTS`, their sign, their validation),
the per-class shifts and season stretch, the shift a perfect estimate finds
(:func:`expected_shifts`, :func:`planted_shift`), and the document that records them beside the
data, ``<root>/synthetic_ground_truth.json`` (:func:`write_ground_truth`,
:func:`read_ground_truth`; the dataset reader ignores it), with the generator version and seed
that made the bytes.

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

import json
from collections.abc import Mapping, Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np

from timematch.data.synthetic.acquisitions import TILE_CALENDAR_SIZES
from timematch.data.synthetic.codes import CLASS_SHARES
from timematch.data.tiles import TILES, resolve_tile, short_name
from timematch.errors import ConfigError, DatasetError

#: Bumped whenever the same seed would produce different bytes (the embedded cache keys on it);
#: recorded in the ground truth.
GENERATOR_VERSION = 2
#: The ground truth's file name, in the dataset root beside the tiles.
GROUND_TRUTH_FILE = "synthetic_ground_truth.json"
#: Planted phenology shift per tile in days (the sign: see the module docstring).
DEFAULT_SHIFTS: dict[str, int] = {"DK": 0, "FR1": 25, "FR2": 15, "AT1": 10}
#: Largest planted shift accepted, in days (the shift search of the paper spans +-60).
MAX_SHIFT = 100
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


def _option_tile(option: str, name: str) -> str:
    """The short name of the tile an option names; unknown tiles are a one-line error."""
    short = short_name(resolve_tile(name))
    if short not in TILES:
        raise ConfigError(f"{option}: unknown tile {name!r}; use one of {list(TILES)}")
    return short


def resolve_shifts(shifts: Mapping[str, int] | None) -> dict[str, int]:
    """The planted shift of every tile: :data:`DEFAULT_SHIFTS` overridden by ``shifts`` (validated,
    keyed by short tile name)."""
    result = dict(DEFAULT_SHIFTS)
    for name, days in (shifts or {}).items():
        short = _option_tile("shifts", name)
        if not isinstance(days, (int, np.integer)) or abs(int(days)) > MAX_SHIFT:
            raise ConfigError(f"shifts[{name!r}] = {days!r}: expected an integer number of days in "
                              f"[-{MAX_SHIFT}, {MAX_SHIFT}]")
        result[short] = int(days)
    return result


def resolve_warps(shorts: Sequence[str], class_shifts: Mapping[str, Mapping[str, int]] | None,
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


def write_ground_truth(root: Path, seed: int, parcels_per_tile: int | Mapping[str, int], planted: Mapping[str, int],
                       class_shifts: Mapping[str, Mapping[str, int]] | None = None,
                       stretch: Mapping[str, float] | None = None,
                       pixel_sizes: str = "embedded", tile_bytes: float | None = None) -> None:
    """Write ``root/synthetic_ground_truth.json`` for the tiles of one generator call (the keys of
    ``planted``): what was planted, the sign convention, the expected shifts, and what made the bytes.

    ``parcels_per_tile`` is one number, or one per tile when they were sized by ``tile_bytes``;
    ``pixel_sizes`` and ``tile_bytes`` are recorded when not the default (the default data's
    file does not change)."""
    truth = {
        "generator": "timematch.data.synthetic",
        "generator_version": GENERATOR_VERSION,
        "seed": seed,
        "parcels_per_tile": parcels_per_tile if isinstance(parcels_per_tile, int) else dict(parcels_per_tile),
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
    if pixel_sizes != "embedded":
        truth["pixel_sizes"] = pixel_sizes
    if tile_bytes is not None:
        truth["tile_bytes"] = tile_bytes
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

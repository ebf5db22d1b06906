"""Acquisition calendars of the synthetic tiles.

Owns when each tile is seen and how cloudy: its own irregular 2017 calendar
(:data:`TILE_CALENDAR_SIZES`: 52, 62, 39, 58 dates for DK, FR1, FR2, AT1, as published) on two
interleaved Sentinel-2 orbit grids, with a cloud percentage per date (0-80 %,
:data:`CLOUDINESS`), and the dates as the published metadata writes them (``YYYYMMDD``).
"""

from __future__ import annotations

import datetime as dt

import numpy as np

#: Acquisition dates per tile in 2017, as published.
TILE_CALENDAR_SIZES: dict[str, int] = {"DK": 52, "FR1": 62, "FR2": 39, "AT1": 58}
#: Cloudiness per tile: probability that a date is cloudy (winter, summer).
CLOUDINESS: dict[str, tuple[float, float]] = {
    "DK": (0.65, 0.40), "FR1": (0.55, 0.25), "FR2": (0.55, 0.25), "AT1": (0.60, 0.30),
}

START_DATE = 20170101
END_DATE = 20171231
YEAR_START = dt.date(2017, 1, 1)


def day_to_int(day: int) -> int:
    """The ``YYYYMMDD`` integer of a date position (days after 1 January 2017)."""
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

"""One synthetic tile simulated: its plan and its pixels.

Owns how the parts below make a tile: :func:`plan_tile` draws the tile's calendar
(:mod:`.acquisitions`), its parcels' classes and national codes (:mod:`.codes`), their sizes
(:data:`PIXEL_SIZES`: by default 10-500 pixels, median about 40; ``"published"`` a long tail
of 1-5000), spatial blocks and the published metadata;
:func:`iter_parcel_pixels` turns each parcel's phenology (:mod:`.phenology`), moved by the
tile's planted shift (:mod:`.truth`), into uint16 pixels with per-pixel heterogeneity, noise
and clouds (on cloudy dates about that share of pixels become bright, flat-spectrum outliers,
and a few become cloud shadows). Each tile draws from its own seeded generators, so its bytes
depend only on the seed, its size and what is planted in it.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from timematch.data.synthetic.acquisitions import (
    CLOUDINESS, END_DATE, START_DATE, TILE_CALENDAR_SIZES, day_to_int, make_calendar,
)
from timematch.data.synthetic.codes import (
    AUSTRIA_STRING_LABEL_SHARE, CLASS_SHARES, UNLISTED_UNKNOWN_SHARE, read_code_table, tile_class_counts,
)
from timematch.data.synthetic.phenology import (
    CLOUD, ENDMEMBERS, NOISE_STD, PHENOLOGY, UNKNOWN_PHENOLOGIES, ParcelParams, Phenology, cover_fractions,
    draw_parcel_params, draw_radiometry,
)
from timematch.data.synthetic.truth import PARCEL_SHIFT_JITTER, STRETCH_PIVOT
from timematch.data.tiles import TILES
from timematch.errors import ConfigError

#: Parcels processed together; bounds the working memory (peak ~160 MB at 62 dates, measured with
#: tracemalloc over iter_parcel_pixels) without changing the bytes.
CHUNK_PARCELS = 250
#: With ``pixel_sizes="published"`` a chunk also holds at most this many pixels (250 parcels of up
#: to 5000 pixels could otherwise take gigabytes). It is about the pixels of an embedded chunk
#: (11-13k), so the working memory is about the same. The embedded sizes keep chunks of
#: CHUNK_PARCELS alone (at most 250 x 500 pixels): the pixel draws happen per chunk, so other
#: chunk bounds would change the default data's bytes.
CHUNK_PIXELS = 13_000

#: Parcel sizes in pixels, lognormal around a class median, clipped: (sigma of log size, smallest,
#: largest). "embedded" is the default data's draw (its bytes depend on it: never change it);
#: "published" is a long tail meant to reproduce the published documentation's "parcels from one
#: pixel to thousands of pixels": the range is that sentence, the spread a judgement, neither is
#: fitted to statistics of the real tiles. Both draw one normal per parcel from the same position of
#: the parcel generator, so the rest of a tile's plan (labels, ids, blocks) is the same for both.
PIXEL_SIZES: dict[str, tuple[float, int, int]] = {
    "embedded": (0.65, 10, 500),
    "published": (1.0, 1, 5000),
}
DEFAULT_PIXEL_SIZES = "embedded"


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
    pixel_sizes: str = DEFAULT_PIXEL_SIZES


def check_pixel_sizes(pixel_sizes: str) -> str:
    """``pixel_sizes`` if it names a :data:`PIXEL_SIZES` choice, else a one-line :class:`ConfigError`."""
    if pixel_sizes not in PIXEL_SIZES:
        raise ConfigError(f"pixel_sizes {pixel_sizes!r}: expected one of {', '.join(PIXEL_SIZES)}")
    return pixel_sizes


def _class_median(name: str) -> float:
    """A class's median parcel size in pixels."""
    return 30.0 if name == "meadow" else 50.0 if name in ("corn", "sunflowers") else 42.0


def _n_pixels(class_names: Sequence[str], rng: np.random.Generator,
              pixel_sizes: str = DEFAULT_PIXEL_SIZES) -> np.ndarray:
    sigma, low, high = PIXEL_SIZES[pixel_sizes]
    median = np.array([_class_median(c) for c in class_names])
    return np.clip(np.round(median * np.exp(rng.normal(0.0, sigma, len(class_names)))), low, high).astype(np.int64)


def expected_pixels_per_parcel(short: str, pixel_sizes: str = DEFAULT_PIXEL_SIZES) -> float:
    """The mean parcel size in pixels the draw of :func:`_n_pixels` gives on a tile, over its class
    shares (the clipped lognormal's mean, rounding neglected)."""
    sigma, low, high = PIXEL_SIZES[check_pixel_sizes(pixel_sizes)]

    def phi(x: float) -> float:
        return 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))

    shares = CLASS_SHARES[short]
    total = sum(shares.values())
    mean = 0.0
    for name, share in shares.items():
        m = _class_median(name)
        a, b = math.log(low / m) / sigma, math.log(high / m) / sigma
        clipped = low * phi(a) + high * (1.0 - phi(b)) + m * math.exp(sigma ** 2 / 2) * (phi(b - sigma) - phi(a - sigma))
        mean += share / total * clipped
    return mean


def parcel_chunks(n_pixels: np.ndarray, pixel_sizes: str = DEFAULT_PIXEL_SIZES) -> list[tuple[int, int]]:
    """``(start, stop)`` of the chunks of parcels simulated together: :data:`CHUNK_PARCELS` parcels,
    and for sizes other than the embedded ones also at most :data:`CHUNK_PIXELS` pixels (a parcel
    larger than that alone)."""
    n = len(n_pixels)
    if pixel_sizes == "embedded":
        return [(start, min(n, start + CHUNK_PARCELS)) for start in range(0, n, CHUNK_PARCELS)]
    chunks = []
    start = 0
    while start < n:
        stop, pixels = start + 1, int(n_pixels[start])
        while stop < n and stop - start < CHUNK_PARCELS and pixels + int(n_pixels[stop]) <= CHUNK_PIXELS:
            pixels += int(n_pixels[stop])
            stop += 1
        chunks.append((start, stop))
        start = stop
    return chunks


def plan_tile(short: str, parcels_per_tile: int, seed: int,
              pixel_sizes: str = DEFAULT_PIXEL_SIZES) -> tuple[TilePlan, np.random.Generator]:
    """Draw a tile's calendar and parcels; returns the plan and the generator for its pixels.

    ``pixel_sizes`` picks the parcel size distribution (:data:`PIXEL_SIZES`); the plan's other
    draws do not depend on it. The plan holds every parcel's metadata in memory (about 500 bytes a
    parcel, measured with tracemalloc: 1 GB for 2 million parcels, 20 MB for a 1.5 GB tile), the
    one part of a tile's memory that grows with its size.
    """
    check_pixel_sizes(pixel_sizes)
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
    n_pixels = _n_pixels(class_names, parcel_rng, pixel_sizes)
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
        "dates": [day_to_int(d) for d in days],
        "cloudy_pct": [float(c) for c in cloudy_pct],
        "parcels": parcels,
    }
    plan = TilePlan(short, path, days, cloudy_pct, class_names, phenologies, metadata, pixel_sizes)
    return plan, pixel_rng


def iter_parcel_pixels(plan: TilePlan, shift: float, rng: np.random.Generator,
                       class_shifts: Mapping[str, int] | None = None,
                       stretch: float = 1.0) -> Iterator[tuple[int, np.ndarray]]:
    """Yield ``(index, pixels)`` for every parcel of the plan, pixels uint16 (T, 10, S).

    Vectorised over chunks of :data:`CHUNK_PARCELS` parcels (:func:`parcel_chunks`; with the
    published sizes also at most :data:`CHUNK_PIXELS` pixels), so the working memory does not grow
    with the tile (the per-parcel parameters aside: some hundred bytes a parcel). Reflectance of a
    pixel at a date = transmittance(date) * tile gain * (cover fractions @ endmembers) + path
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

    for start, stop in parcel_chunks(n_pixels, plan.pixel_sizes):
        idx = np.arange(start, stop)
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

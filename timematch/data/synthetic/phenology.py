"""Phenology and radiometry of the synthetic parcels.

Owns how a parcel looks over the year:

- per class a reference phenology (:data:`PHENOLOGY`): green cover from a double logistic
  (green-up, senescence), dry standing crop until harvest, autumn regrowth for winter crops, a
  yellow flowering signature for rapeseed and sunflowers, parcel-specific mowing dips for
  meadows. The winter cereals (barley, rye, triticale, wheat) and the spring crops (peas,
  barley, oat) differ mainly by *timing*, 6-10 days apart, so a source-trained classifier
  confuses them under a 10-25 day shift while they stay separable on their own tile;
  per parcel, timing jitter and amplitude (:func:`draw_parcel_params`);
- reflectance (L1C-like, times 10000) as a linear mixture of soil, green (cereal and
  broadleaf), dry-vegetation and yellow-flower endmembers driven by those cover fractions
  (:func:`cover_fractions`), so NDVI = (B08 - B04) / (B08 + B04) follows the class curve;
- the radiometry of a tile (:func:`draw_radiometry`): an atmosphere per acquisition date
  (aerosol load scaling the path reflectance) and a calibration shared by all tiles (within
  1 % per band), plus the per-pixel noise and the cloud spectrum.

  Version 1 gave each tile its own gain (up to 6 %) and offset per band, constant over the
  year. Models keyed on those exact values: an FR1 source model scored 0.16 macro F1 on
  FR2 at every candidate shift, the planted one included, so no shift estimate could help.
  Real L1C tiles share their sensors' calibration and differ by date in atmosphere, which
  version 2 simulates; the source model then scores best at the planted shift on every
  scenario (FR1 -> FR2: 0.76 at 0 days, 0.85 at the planted -10).

Days here are in the reference frame (planted shift 0); :mod:`.truth` says how a tile's shift
moves them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

#: Sentinel-2 bands written per pixel: B02 B03 B04 B05 B06 B07 B08 B8A B11 B12.
N_BANDS = 10
#: Largest relative difference of a tile's calibration gain per band from 1 (same sensors).
TILE_GAIN_SPREAD = 0.01
#: Spread (log-normal sigma) of the per-date aerosol load around the standard atmosphere.
AEROSOL_SIGMA = 0.35

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

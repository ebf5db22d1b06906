"""A tiny dataset written the way the published one was: zarr format 2 arrays with Blosc LZ4
(zarr 2.x's default compressor) and a plain metadata pickle. Seeded; used by the data tests."""

from __future__ import annotations

import pickle
from pathlib import Path

import numcodecs
import numpy as np
import zarr

BLOSC_LZ4 = numcodecs.Blosc(cname="lz4", clevel=5, shuffle=numcodecs.Blosc.SHUFFLE)


def write_parcel(path: Path, pixels: np.ndarray) -> None:
    array = zarr.create_array(
        store=str(path), shape=pixels.shape, dtype=pixels.dtype, chunks=pixels.shape,
        zarr_format=2, compressors=BLOSC_LZ4, overwrite=True,
    )
    array[...] = pixels


def write_tile(
    root: Path,
    tile: str = "denmark/32VNH/2017",
    labels: list | None = None,
    n_dates: int = 12,
    seed: int = 0,
) -> Path:
    """Write one tile with one parcel per entry of ``labels`` (national codes)."""
    rng = np.random.default_rng(seed)
    labels = labels if labels is not None else [10, 10, 11, 251, 251, 216, 999999]
    path = Path(root) / tile
    (path / "data").mkdir(parents=True, exist_ok=True)
    (path / "meta").mkdir(parents=True, exist_ok=True)
    days = np.sort(rng.choice(np.arange(1, 365), n_dates, replace=False))
    dates = [int((np.datetime64("2017-01-01") + int(d)).astype(object).strftime("%Y%m%d")) for d in days]
    parcels = []
    for i, label in enumerate(labels):
        n_pixels = int(rng.integers(1, 90))
        pixels = rng.integers(0, 10000, size=(n_dates, 10, n_pixels), dtype=np.uint16)
        write_parcel(path / "data" / f"{i}.zarr", pixels)
        parcels.append({
            "id": 1000 + i, "label": label, "n_pixels": n_pixels, "block": i % 3,
            "geometric_features": [float(rng.uniform(100, 2000)), float(rng.uniform(1e3, 1e6)), 0.1, 0.8],
        })
    meta = {
        "start_date": 20170101, "end_date": 20171231, "dates": dates,
        "cloudy_pct": [float(x) for x in rng.uniform(0, 80, n_dates)], "parcels": parcels,
    }
    (path / "meta" / "metadata.pkl").write_bytes(pickle.dumps(meta))
    return path


#: Crop codes of the two-tile dataset of the data tests (Denmark: winter barley, meadow,
#: spring barley, ..., two unknown; France: ORH, PPH, ORP, MIS).
DK_LABELS = [10] * 12 + [251] * 15 + [1] * 8 + [216] * 3 + [999999] * 2
FR_LABELS = ["ORH"] * 10 + ["PPH"] * 12 + ["ORP"] * 6 + ["MIS"] * 4


def write_two_tiles(root: Path) -> Path:
    """DK (20 dates) and FR1 (25 dates) with the labels above, under ``root``."""
    write_tile(root, "denmark/32VNH/2017", labels=DK_LABELS, n_dates=20, seed=1)
    write_tile(root, "france/30TXT/2017", labels=FR_LABELS, n_dates=25, seed=2)
    return root

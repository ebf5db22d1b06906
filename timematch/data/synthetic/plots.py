"""Checking the synthetic data by eye: median NDVI per class, read back from disk, and a plot
of it per tile that shows the planted shifts."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from timematch.data.classes import CropCodes
from timematch.data.format import TileReader
from timematch.data.synthetic.codes import tile_class_counts
from timematch.data.synthetic.truth import GROUND_TRUTH_FILE, read_ground_truth
from timematch.data.synthetic.writing import resolve_tiles
from timematch.data.tiles import TILES
from timematch.errors import DatasetError


def class_ndvi_curves(
    root: Path, tile: str, max_parcels_per_class: int = 40, min_parcels: int = 5, max_cloudy_pct: float = 100.0
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Median NDVI per class and date of a tile, read back from disk.

    NDVI per parcel and date is the median over its pixels, then the median over up to
    ``max_parcels_per_class`` parcels (both medians resist scattered clouds; dates where
    most parcels are under clouds are dropped with ``max_cloudy_pct``). Returns the kept
    date positions (T',) and class name -> NDVI (T',), for classes with ``min_parcels`` parcels.
    """
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
    # matplotlib: ~0.3 s of import (measured with -X importtime), and only this plot needs it
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    root = Path(root).expanduser()
    out_png = Path(out_png)
    found = [s for s in TILES if (root / TILES[s] / "meta" / "metadata.pkl").is_file()]
    shorts = resolve_tiles(tiles) if tiles is not None else found
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

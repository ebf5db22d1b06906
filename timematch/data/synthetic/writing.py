"""Writing the synthetic dataset in the published on-disk format.

Owns the files: ``<root>/<country>/<tile>/<year>/data/<i>.zarr`` (one zarr format-2 array per
parcel, uint16 (T, C=10, S), one chunk, Blosc) and ``meta/metadata.pkl`` (a plain dict of
builtins) exactly as described in ``docs/data.md``, so the reader cannot tell them from the
real thing, with the ground truth beside them (:mod:`.truth`). :func:`generate_dataset` is the
generator's entry point (``python -m timematch.data synth``).
"""

from __future__ import annotations

import json
import math
import pickle
import shutil
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numcodecs
import numpy as np

from timematch.data.synthetic.acquisitions import TILE_CALENDAR_SIZES
from timematch.data.synthetic.codes import DEFAULT_PARCELS_PER_TILE
from timematch.data.synthetic.simulation import (
    CHUNK_PARCELS, CHUNK_PIXELS, DEFAULT_PIXEL_SIZES, check_pixel_sizes, expected_pixels_per_parcel,
    iter_parcel_pixels, plan_tile,
)
from timematch.data.synthetic.truth import (
    GENERATOR_VERSION, GROUND_TRUTH_FILE, expected_shifts, resolve_shifts, resolve_warps, write_ground_truth,
)
from timematch.data.tiles import TILES, resolve_tile, short_name
from timematch.errors import ConfigError, DatasetError

#: The embedded dataset's size on disk (``du -sb`` of v2-seed0, measured on 2026-12-02): what
#: generating it needs free, checked before it starts.
EMBEDDED_BYTES = 211_053_785
#: Blosc as zarr 2.x wrote it, with zstd (about 20 % smaller than zarr 2's default lz4 on this data).
COMPRESSOR = numcodecs.Blosc(cname="zstd", clevel=5, shuffle=numcodecs.Blosc.SHUFFLE)
#: Compressed bytes of one pixel at one date (10 bands of uint16: 20 bytes raw) in a parcel's
#: chunk file ``0.0.0``. Measured on the embedded generator (seed 0, 1,400 parcels per tile, the
#: four tiles): the ``0.0.0`` files of each tile's data/ folder add up to 185,716,292 bytes over
#: 14,427,273 pixel-dates (sum over parcels of n_pixels x the tile's dates) = 12.87; per tile
#: 12.60 (FR1) to 13.07 (FR2). Each parcel adds its ``.zarray`` (about 320 bytes) and, on disk, a
#: folder (4 KiB on ext4, which ``du`` counts and this estimate does not).
BYTES_PER_PIXEL_DATE = 12.87


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


def parcels_for_bytes(short: str, tile_bytes: float, pixel_sizes: str = DEFAULT_PIXEL_SIZES) -> int:
    """Parcels that make a tile's data/ folder about ``tile_bytes`` (its files' bytes): from
    :data:`BYTES_PER_PIXEL_DATE`, the tile's dates and the expected pixels per parcel of
    ``pixel_sizes``; at least 1."""
    dates = TILE_CALENDAR_SIZES[short]
    pixels = expected_pixels_per_parcel(short, pixel_sizes)
    per_parcel = len(zarray_metadata((dates, 10, round(pixels)))) + BYTES_PER_PIXEL_DATE * dates * pixels
    return max(1, round(tile_bytes / per_parcel))


def resolve_tiles(tiles: Sequence[str] | None) -> list[str]:
    """The short names of the tiles to write (all four when ``tiles`` is None), each once, in order;
    a tile the generator does not write is a :class:`ConfigError`."""
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
    parcels_per_tile: int | None = None,
    seed: int = 0,
    shifts: Mapping[str, int] | None = None,
    tiles: Sequence[str] | None = None,
    progress: Callable[[str], None] | None = None,
    class_shifts: Mapping[str, Mapping[str, int]] | None = None,
    stretch: Mapping[str, float] | None = None,
    pixel_sizes: str = DEFAULT_PIXEL_SIZES,
    tile_bytes: float | None = None,
) -> dict:
    """Write the synthetic dataset under ``root`` in the published format; return a summary.

    ``shifts`` maps short tile names (DK, FR1, FR2, AT1) to planted shifts in days
    (missing ones keep :data:`DEFAULT_SHIFTS`); ``tiles`` limits the tiles written (a
    tile's bytes depend only on the seed, its size and its shift, not on the other
    tiles). ``class_shifts`` (tile -> class -> extra days) and ``stretch`` (tile -> factor) warp
    a tile's seasons beyond one translation (see :mod:`.truth`); without them the bytes
    are those of the default data. The same arguments give the same bytes. ``root/synthetic_ground_truth.json``
    describes the tiles of this call. Tile folders of an earlier synthetic run are
    replaced; a folder holding anything else is refused (:class:`DatasetError`).

    ``pixel_sizes`` (:data:`~.simulation.PIXEL_SIZES`): ``"embedded"`` (the default data's
    10-500 pixels per parcel) or ``"published"`` (1-5000, a long tail like the published dataset's).
    ``tile_bytes`` asks for tiles of about that many bytes in data/ instead of a number of parcels
    (exclusive with ``parcels_per_tile``; default 1,400 parcels): each tile gets the parcels that
    :data:`BYTES_PER_PIXEL_DATE`, its dates and the expected size of its parcels give, so tiles of
    fewer dates get more parcels. Memory stays bounded whatever the size: pixels are made and
    written in chunks (:func:`~.simulation.parcel_chunks`); only the tile's metadata, about 500
    bytes a parcel, is held whole.

    Returns a JSON-serialisable summary: root, tiles (path, parcels, dates, planted
    shift), parcels, planted_shifts, expected_shifts, seed, parcels_per_tile (per tile with
    ``tile_bytes``), generator_version, seconds, and pixel_sizes and tile_bytes when given.
    """
    started = time.perf_counter()
    check_pixel_sizes(pixel_sizes)
    if tile_bytes is not None and parcels_per_tile is not None:
        raise ConfigError("give parcels_per_tile or tile_bytes, not both")
    if tile_bytes is not None and not (isinstance(tile_bytes, (int, float)) and 0 < tile_bytes < math.inf):
        raise ConfigError(f"tile_bytes must be a number of bytes > 0, got {tile_bytes!r}")
    if parcels_per_tile is None and tile_bytes is None:
        parcels_per_tile = DEFAULT_PARCELS_PER_TILE
    if parcels_per_tile is not None and parcels_per_tile < 1:
        raise ConfigError(f"parcels_per_tile must be >= 1, got {parcels_per_tile}")
    root = Path(root).expanduser()
    shorts = resolve_tiles(tiles)
    all_shifts = resolve_shifts(shifts)
    planted = {s: all_shifts[s] for s in shorts}
    per_class, stretches = resolve_warps(shorts, class_shifts, stretch)
    counts: int | dict[str, int] = (parcels_per_tile if tile_bytes is None else
                                    {s: parcels_for_bytes(s, tile_bytes, pixel_sizes) for s in shorts})
    _check_writable(root, shorts)
    root.mkdir(parents=True, exist_ok=True)
    # written first: a run interrupted half-way can be re-run over its own leftovers
    write_ground_truth(root, seed, counts, planted, per_class, stretches, pixel_sizes, tile_bytes)
    summary_tiles: dict[str, Any] = {}
    for short in shorts:
        tile_started = time.perf_counter()
        plan, pixel_rng = plan_tile(short, counts if isinstance(counts, int) else counts[short], seed, pixel_sizes)
        tile_path = root / plan.path
        if tile_path.exists():
            shutil.rmtree(tile_path)
        (tile_path / "data").mkdir(parents=True)
        (tile_path / "meta").mkdir(parents=True)
        # compression and file writes release the GIL: overlap them with the next chunk's maths
        # queued arrays: at most two chunks' worth, in parcels and in pixels (the bytes do not depend on it)
        max_queued = 2 * CHUNK_PIXELS * len(plan.days) * 10 * 2
        with ThreadPoolExecutor(max_workers=2) as pool:
            pending: deque[tuple[Future, int]] = deque()
            queued = 0
            for index, pixels in iter_parcel_pixels(plan, planted[short], pixel_rng, per_class.get(short),
                                                    stretches.get(short, 1.0)):
                pending.append((pool.submit(write_parcel_array, tile_path / "data" / f"{index}.zarr", pixels),
                                pixels.nbytes))
                queued += pixels.nbytes
                while len(pending) > 2 * CHUNK_PARCELS or queued > max_queued:
                    future, size = pending.popleft()
                    future.result()
                    queued -= size
            for future, _ in pending:
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
        "parcels_per_tile": counts,
        **({"pixel_sizes": pixel_sizes} if pixel_sizes != DEFAULT_PIXEL_SIZES else {}),
        **({"tile_bytes": tile_bytes} if tile_bytes is not None else {}),
        "generator_version": GENERATOR_VERSION,
        "seconds": round(time.perf_counter() - started, 2),
    }

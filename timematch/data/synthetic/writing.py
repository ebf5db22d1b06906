"""Writing the synthetic dataset in the published on-disk format.

Owns the files: ``<root>/<country>/<tile>/<year>/data/<i>.zarr`` (one zarr format-2 array per
parcel, uint16 (T, C=10, S), one chunk, Blosc) and ``meta/metadata.pkl`` (a plain dict of
builtins) exactly as described in ``docs/data.md``, so the reader cannot tell them from the
real thing, with the ground truth beside them (:mod:`.truth`). :func:`generate_dataset` is the
generator's entry point (``python -m timematch.data synth``).
"""

from __future__ import annotations

import json
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

from timematch.data.synthetic.codes import DEFAULT_PARCELS_PER_TILE
from timematch.data.synthetic.simulation import CHUNK_PARCELS, iter_parcel_pixels, plan_tile
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
    a tile's seasons beyond one translation (see :mod:`.truth`); without them the bytes
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
    shorts = resolve_tiles(tiles)
    all_shifts = resolve_shifts(shifts)
    planted = {s: all_shifts[s] for s in shorts}
    per_class, stretches = resolve_warps(shorts, class_shifts, stretch)
    _check_writable(root, shorts)
    root.mkdir(parents=True, exist_ok=True)
    # written first: a run interrupted half-way can be re-run over its own leftovers
    write_ground_truth(root, seed, parcels_per_tile, planted, per_class, stretches)
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

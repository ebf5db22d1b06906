"""The packed, memory-mapped cache of a tile.

The published format stores one small zarr array per parcel; opening one costs about
1.2 ms, and the original code did that for every sample of every epoch. A tile is converted
once into a packed cache: all pixels of the tile in one uint16 array of shape (P, T, C)
(pixel-major, so a parcel is one contiguous slice), per-parcel offsets, national codes,
geometric features, ids, blocks and date positions. Batches are then built with
vectorised indexing into the memory map, and several trials on one machine share the
pages through the OS page cache.

The cache lives under the cache directory (never in the dataset folder), keyed by the
tile's absolute path, and is rebuilt when the fingerprint of the source files (sizes and
modification times of the metadata and of every parcel array) changes; a launch's trial
workers trust the fingerprints its driver computed (:func:`trust_fingerprints`).

Packing decodes each parcel's single chunk directly (:class:`~timematch.data.format.OneChunkReader`)
in two threads, a block of parcels at a time, and writes it through the memory map: it holds
one parcel per thread and the tile's metadata, whatever the tile's size (the written pages are
the page cache's). It prints a line every few seconds, and an interrupted build leaves nothing
that looks complete (the next open builds again).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from timematch.data.classes import normalize_code
from timematch.data.format import N_BANDS, TileReader
from timematch.data.tiles import default_cache_dir, resolve_tile
from timematch.diskspace import is_disk_full, no_space, require_space, reserve
from timematch.errors import DatasetError
from timematch.locks import cache_lock

CACHE_VERSION = 1
#: Threads that decode parcels while packing, and parcels handed to them at a time.
PACK_THREADS = 2
PACK_BLOCK = 256
#: Seconds between two progress lines while a tile is packed.
PROGRESS_SECONDS = 5.0
_ARRAYS = ("pixels", "offsets", "geom", "ids", "blocks", "codes", "positions")


def _is_current(target: Path, stamp: str) -> bool:
    manifest = target / "manifest.json"
    if not manifest.is_file():
        return False
    try:
        info = json.loads(manifest.read_text())
    except json.JSONDecodeError:
        return False
    return info.get("fingerprint") == stamp and info.get("version") == CACHE_VERSION


#: The fingerprints a launch's driver computed for its tiles, by tile folder (resolved): a
#: launch's trial workers load a packed cache whose manifest carries its tile's fingerprint
#: without fingerprinting the source files again (:func:`trust_fingerprints`). Fingerprinting
#: stats every parcel array, about 2 s per 100,000 parcels, and every trial opens its tiles.
DRIVER_FINGERPRINTS: dict[str, str] = {}


def trust_fingerprints(fingerprints: dict[str, str]) -> None:
    """Let this process (a launch's trial worker) trust the fingerprints its launch's driver
    computed when it packed and checked every tile, before any trial started."""
    DRIVER_FINGERPRINTS.update(fingerprints)


def _cache_folder(base: Path, tile_path: Path, tile: str) -> Path:
    """Where the packed cache of the tile at ``tile_path`` lives: named by the tile and its path."""
    key = hashlib.sha256(str(tile_path.resolve()).encode()).hexdigest()[:16]
    return base / "packed" / f"{tile.replace('/', '_')}-{key}"


def fingerprint(reader: TileReader) -> str:
    """Hash of the sizes and modification times of every source file of a tile."""
    digest = hashlib.sha256()
    stat = reader.metadata_path.stat()
    digest.update(f"meta:{stat.st_size}:{stat.st_mtime_ns}".encode())
    with os.scandir(reader.data_path) as entries:
        parcel_dirs = sorted((e for e in entries), key=lambda e: e.name)
    for entry in parcel_dirs:
        if entry.is_dir():
            with os.scandir(entry.path) as files:
                for f in sorted(files, key=lambda f: f.name):
                    s = f.stat()
                    digest.update(f"{entry.name}/{f.name}:{s.st_size}:{s.st_mtime_ns}".encode())
        else:
            s = entry.stat()
            digest.update(f"{entry.name}:{s.st_size}:{s.st_mtime_ns}".encode())
    return digest.hexdigest()


@dataclass
class PackedTile:
    """A tile's parcels in memory-mapped arrays.

    Attributes:
        tile: ``country/tile/year``.
        pixels: uint16 (P, T, C), all pixels of all parcels, parcel after parcel.
        offsets: int64 (N + 1,), parcel ``i`` is ``pixels[offsets[i]:offsets[i + 1]]``.
        geom: float32 (N, 4), raw geometric features (perimeter, area, ratio, cover).
        ids, blocks: int64 (N,).
        codes: str (N,), national crop codes as strings.
        positions: int64 (T,), days after the start date.
    """

    tile: str
    country: str
    pixels: np.ndarray
    offsets: np.ndarray
    geom: np.ndarray
    ids: np.ndarray
    blocks: np.ndarray
    codes: np.ndarray
    positions: np.ndarray
    path: Path

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def n_pixels(self) -> np.ndarray:
        return np.diff(self.offsets)

    @property
    def n_dates(self) -> int:
        return int(self.positions.shape[0])

    def parcel(self, index: int) -> np.ndarray:
        """Pixels of one parcel in the published layout, uint16 (T, C, S)."""
        return np.ascontiguousarray(self.pixels[self.offsets[index] : self.offsets[index + 1]].transpose(1, 2, 0))

    @classmethod
    def open(
        cls,
        root: Path | str,
        tile: str,
        cache_dir: Path | None = None,
        progress: Callable[[str], None] | None = None,
    ) -> "PackedTile":
        """The packed cache of ``tile`` under ``root``, built (or rebuilt) when needed."""
        base = Path(cache_dir) if cache_dir else default_cache_dir()
        try:
            name = resolve_tile(tile)
            tile_path = (Path(root).expanduser() / name).resolve()
        except Exception:  # a name the reader below rejects, with its message
            name, tile_path = None, None
        trusted = DRIVER_FINGERPRINTS.get(str(tile_path)) if tile_path else None
        if trusted and _is_current(cached := _cache_folder(base, tile_path, name), trusted):
            return cls._load(cached, name, name.split("/")[0])
        reader = TileReader(root, tile)
        target = _cache_folder(base, reader.path, reader.tile)
        stamp = fingerprint(reader)
        if not _is_current(target, stamp):
            # Trials may open the same tile at once: one builds, the others wait.
            with cache_lock(target):
                if not _is_current(target, stamp):
                    build(reader, target, stamp, progress)
        return cls._load(target, reader.tile, reader.country)

    def manifest(self) -> dict:
        """What the build recorded: the tile, its source folder and fingerprint, sizes, dates."""
        return json.loads((self.path / "manifest.json").read_text())

    def checked(self) -> dict[str, str]:
        """``{tile folder: fingerprint}`` of the source files this cache was built from, for
        :func:`trust_fingerprints`."""
        manifest = self.manifest()
        return {manifest["source"]: manifest["fingerprint"]}

    @classmethod
    def _load(cls, path: Path, tile: str, country: str) -> "PackedTile":
        arrays = {}
        for name in _ARRAYS:
            mode = "r" if name == "pixels" else None
            arrays[name] = np.load(path / f"{name}.npy", mmap_mode=mode, allow_pickle=False)
        return cls(tile=tile, country=country, path=path, **arrays)


class PackingProgress:
    """The lines packing prints: one when it starts, then one every :data:`PROGRESS_SECONDS`
    with the share done, the rate and the time left."""

    def __init__(self, tile: str, parcels: int, pixels: int,
                 say: Callable[[str], None] | None) -> None:
        self.tile, self.parcels, self.say = tile, parcels, say
        self.started = self.last = time.perf_counter()
        if say:
            say(f"packing {tile}: {parcels} parcels, {pixels} pixels (once; later launches reuse it) ...")

    def done(self, count: int) -> None:
        now = time.perf_counter()
        if not self.say or count >= self.parcels or now - self.last < PROGRESS_SECONDS:
            return
        self.last = now
        rate = count / (now - self.started)
        self.say(f"packing {self.tile}: {count}/{self.parcels} parcels ({count / self.parcels:.0%}), "
                 f"{rate:.0f} parcels/s, about {(self.parcels - count) / rate:.0f} s left")


def _copy_parcels(reader: TileReader, pixels: np.ndarray, offsets: np.ndarray, report: PackingProgress) -> None:
    """Every parcel of ``reader`` into its rows of ``pixels`` (P, T, C), blocks of
    :data:`PACK_BLOCK` parcels at a time in :data:`PACK_THREADS` threads (decoding and reading
    release the GIL for most of their time)."""

    def copy(block: range) -> range:
        for i in block:  # written through a transposed view: 8x faster than assigning a transpose
            np.copyto(pixels[offsets[i] : offsets[i + 1]].transpose(1, 2, 0), reader.read_parcel(i))
        return block

    count = len(offsets) - 1
    blocks = [range(i, min(count, i + PACK_BLOCK)) for i in range(0, count, PACK_BLOCK)]
    with ThreadPoolExecutor(max_workers=PACK_THREADS) as pool:
        for block in pool.map(copy, blocks):
            report.done(block.stop)


def build(
    reader: TileReader,
    target: Path,
    stamp: str,
    progress: Callable[[str], None] | None = None,
) -> None:
    """Read every parcel of ``reader`` once and write the packed arrays to ``target``.

    Writes into a temporary sibling folder and renames it into place, so an interrupted
    build never leaves a cache that looks complete.
    """
    started = time.perf_counter()
    parcels = reader.parcels
    n_pixels = np.array([int(p["n_pixels"]) for p in parcels], dtype=np.int64)
    if (n_pixels < 1).any():
        bad = int(np.flatnonzero(n_pixels < 1)[0])
        raise DatasetError(f"{reader.metadata_path}: parcel {bad} has n_pixels={n_pixels[bad]}, expected >= 1")
    offsets = np.concatenate([[0], np.cumsum(n_pixels)]).astype(np.int64)
    n_dates = len(reader.dates)
    target.parent.mkdir(parents=True, exist_ok=True)
    # What a build killed mid-way (SIGKILL, SIGBUS) left: the caller holds the tile's lock, so no
    # other build of this tile is running.
    for stale in target.parent.glob(f".{target.name}-*"):
        shutil.rmtree(stale, ignore_errors=True)
    shape = (int(offsets[-1]), n_dates, N_BANDS)
    what = f"the packed cache of {reader.tile}"
    pixel_bytes = int(np.prod(shape)) * np.dtype(np.uint16).itemsize
    require_space(target.parent, pixel_bytes, what)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        pixels = np.lib.format.open_memmap(tmp / "pixels.npy", mode="w+", dtype=np.uint16, shape=shape)
        reserve(tmp / "pixels.npy", pixels.offset + pixel_bytes, what)

        _copy_parcels(reader, pixels, offsets, PackingProgress(reader.tile, len(parcels), int(offsets[-1]), progress))
        pixels.flush()
        del pixels
        geom = np.array([p["geometric_features"] for p in parcels], dtype=np.float32)
        if geom.shape != (len(parcels), 4):
            raise DatasetError(f"{reader.metadata_path}: geometric_features must be 4 numbers per parcel")
        np.save(tmp / "offsets.npy", offsets)
        np.save(tmp / "geom.npy", geom)
        np.save(tmp / "ids.npy", np.array([int(p.get("id", i)) for i, p in enumerate(parcels)], dtype=np.int64))
        np.save(tmp / "blocks.npy", np.array([int(p.get("block", -1)) for p in parcels], dtype=np.int64))
        np.save(tmp / "codes.npy", np.array([normalize_code(p["label"]) for p in parcels], dtype=str))
        np.save(tmp / "positions.npy", reader.positions)
        (tmp / "manifest.json").write_text(
            json.dumps(
                {
                    "version": CACHE_VERSION,
                    "tile": reader.tile,
                    "source": str(reader.path.resolve()),
                    "fingerprint": stamp,
                    "parcels": len(parcels),
                    "pixels": int(offsets[-1]),
                    "dates": reader.dates,
                    "seconds": round(time.perf_counter() - started, 2),
                },
                indent=1,
            )
        )
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if is_disk_full(err):
            raise no_space(target.parent, pixel_bytes, what) from None
        raise
    if progress:
        progress(f"packed {reader.tile} in {time.perf_counter() - started:.1f} s -> {target}")

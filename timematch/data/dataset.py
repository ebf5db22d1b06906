"""Tiles as experiment data: class labels, folds, normalisation and vectorised batches.

A :class:`Domain` is one tile seen by one experiment: its packed cache, every parcel's
class index in the experiment's class list, and the fold's split.

- :meth:`Domain.eval_batches`: the evaluation view, all pixels and all dates, parcels
  grouped by size: numpy dicts with the keys of :data:`BATCH_KEYS` (layout in
  :func:`_gather`), built with vectorised indexing into the memory-mapped pixels;
- the training views (strong, weak) and the parcel samplers are tensor operations on the
  device the tile lives on: :mod:`timematch.data.views`.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from timematch.checks import check_choice, check_flag, check_range, unknown_fields
from timematch.data.classes import PUBLISHED_MIN_PARCELS, UNKNOWN, CropCodes, label_indices, select_classes
from timematch.data.packed import PackedTile
from timematch.data.splits import Split, make_split, sample_parcels
from timematch.errors import ConfigError, DatasetError

BATCH_KEYS = ("pixels", "mask", "positions", "geom", "label", "index")
#: Published scaling of the geometric features (perimeter, area, perimeter/area, cover ratio).
GEOM_SCALE = np.array([40000.0, 1e8, 40000.0, 1.0], dtype=np.float32)
NORMALIZATIONS = ("source_stats", "published")
MAX_SHIFT_AUG = 100  # the positional table allows positions down to -100


@dataclass(frozen=True)
class DataConfig:
    """How tiles become experiment data. Defaults are the published ones, except
    ``normalization`` (see :class:`Normalizer`)."""

    min_parcels: int = PUBLISHED_MIN_PARCELS
    merge_seasons: bool = False
    n_folds: int = 3
    split_seed: int = 0
    pixels_per_parcel: int = 64
    timesteps: int = 30
    normalization: str = "source_stats"
    eval_pixel_budget: int = 128 * 512  # pixel slots per evaluation batch
    #: Parcels of a split part evaluated during training (each epoch's validation and selection
    #: criteria, the movement probe, TimeMatch's class prior): a fixed sample of this size per
    #: part (Domain.evaluation_sample); 0 = the whole part, as published. The test evaluation of
    #: a trial's result always uses the whole test split.
    eval_parcels: int = 0

    def __post_init__(self) -> None:
        check_range(self, "min_parcels", 1, 10_000_000)
        check_flag(self, "merge_seasons")
        check_range(self, "n_folds", 1, 100)
        check_range(self, "split_seed", 0, 2**32 - 1)
        check_range(self, "pixels_per_parcel", 2, 100_000)
        check_range(self, "timesteps", 1, 10_000)
        check_choice(self, "normalization", NORMALIZATIONS)
        check_range(self, "eval_pixel_budget", 1, 2**31 - 1)
        check_range(self, "eval_parcels", 0, 2**31 - 1)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "DataConfig":
        unknown, valid = unknown_fields(cls, values)
        if unknown:
            raise ConfigError(f"unknown data config key(s) {unknown}; valid keys: {', '.join(valid)}")
        return cls(**values)


@dataclass(frozen=True)
class Normalizer:
    """Reflectance (uint16) -> model input (float32).

    ``published``: clip to [0, 65535] and divide by 65535, as the paper's code does. With
    Sentinel-2 values around 0.01-0.5 of that range, BatchNorm's running variance starts
    far too large and early evaluation collapses to one class for about 100 steps.
    ``source_stats`` (default): standardise each band with the mean and standard deviation
    of the source training split, which trains stably from the first step.
    """

    mean: np.ndarray  # float32 (C,)
    std: np.ndarray  # float32 (C,)
    kind: str = "source_stats"

    @classmethod
    def published(cls, n_bands: int = 10) -> "Normalizer":
        return cls(np.zeros(n_bands, np.float32), np.full(n_bands, 65535.0, np.float32), "published")

    @classmethod
    def fit(cls, packed: PackedTile, parcels: np.ndarray, max_pixels: int = 200_000, seed: int = 0) -> "Normalizer":
        """Per-band statistics over (a seeded sample of) the pixels of ``parcels``."""
        rng = np.random.default_rng(seed)
        starts, counts = packed.offsets[parcels], packed.n_pixels[parcels]
        pixel_index = np.concatenate([np.arange(s, s + c) for s, c in zip(starts, counts)])
        if len(pixel_index) > max_pixels:
            pixel_index = np.sort(rng.choice(pixel_index, max_pixels, replace=False))
        values = packed.pixels[pixel_index].astype(np.float64)  # (P, T, C)
        mean = values.mean(axis=(0, 1))
        std = values.std(axis=(0, 1))
        return cls(mean.astype(np.float32), np.maximum(std, 1.0).astype(np.float32), "source_stats")

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        """(..., S, C) uint16 -> float32 (x - mean) / std per band."""
        x = np.asarray(pixels).astype(np.float32, order="C")  # C order: the reshape below must be a view
        if x.size == 0:
            return x
        # Broadcasting over a last axis of 10 runs numpy's inner loop 10 elements at a time;
        # tiling the per-band constants over the pixel axis makes the inner loop S*C long (3x faster).
        width = x.shape[-1] * (x.shape[-2] if x.ndim >= 2 else 1)
        scale = np.tile((1.0 / self.std).astype(np.float32), width // x.shape[-1])
        offset = np.tile((self.mean / self.std).astype(np.float32), width // x.shape[-1])
        flat = x.reshape(-1, width)
        flat *= scale
        flat -= offset
        return x

    def to_dict(self) -> dict[str, Any]:
        return {"mean": self.mean.tolist(), "std": self.std.tolist(), "kind": self.kind}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "Normalizer":
        return cls(np.asarray(values["mean"], np.float32), np.asarray(values["std"], np.float32), values["kind"])


@dataclass
class Domain:
    """One tile of one experiment: packed pixels, class indices, fold split, normaliser."""

    packed: PackedTile
    class_names: np.ndarray  # str (N,), class of every parcel after mapping
    classes: list[str]
    labels: np.ndarray  # int64 (N,), index in ``classes``; -1 = outside the class list
    split: Split
    config: DataConfig
    normalizer: Normalizer = field(default_factory=Normalizer.published)

    @property
    def tile(self) -> str:
        return self.packed.tile

    def labelled(self, part: str) -> np.ndarray:
        """Parcel indices of a split part whose class is in the class list."""
        parcels = self.split.part(part)
        return parcels[self.labels[parcels] >= 0]

    def evaluation_sample(self, parcels: np.ndarray, purpose: str, by_class: bool = True) -> np.ndarray:
        """What training evaluates of ``parcels`` (a split part or its labelled parcels): all of
        them when they are at most ``config.eval_parcels`` (or it is 0), else a fixed sample of
        that size (:func:`~timematch.data.splits.sample_parcels`), so that evaluating an epoch
        costs the same on a tile of any size. Seeded from the split seed, the tile, ``purpose``
        (which set it is, e.g. ``"val"``) and the parcels themselves: every trial of a fold
        evaluates the same sample. ``by_class``: stratified by class, every class present;
        otherwise uniform, for parcels whose labels the caller may not read (a target's
        training parcels)."""
        parcels = np.asarray(parcels)
        seed = [self.config.split_seed, zlib.crc32(self.tile.encode()), zlib.crc32(purpose.encode()),
                zlib.crc32(parcels.tobytes())]
        strata = self.class_names[parcels] if by_class else None
        return sample_parcels(parcels, self.config.eval_parcels, seed, strata)

    # -- batch views -------------------------------------------------------------------

    def eval_batches(self, parcels: np.ndarray, max_parcels: int = 256) -> Iterator[dict]:
        """Evaluation view: every pixel and every date, parcels of similar size batched together.

        The batches of a parcel set are kept (:data:`EVAL_BATCHES`, within its byte budget) and
        handed out again: a trial evaluates the same validation and test parcels every epoch, and
        the members of an array of trials (:mod:`timematch.arrays`) evaluate the same ones. A caller
        must not change their arrays in place (the evaluation makes new tensors from them)."""
        parcels = np.asarray(parcels)
        built = (self.packed.path / "manifest.json").stat().st_mtime_ns  # a tile rebuilt in place is another
        key = (str(self.packed.path), built, self.normalizer.mean.tobytes(), self.normalizer.std.tobytes(),
               self.labels.tobytes(), parcels.tobytes(), max_parcels, self.config.eval_pixel_budget)
        # at least the set's pixels as float32 (each batch pads to its widest parcel): a set larger
        # than the cache's budget is streamed batch by batch, never held whole
        least = int(self.packed.n_pixels[parcels].sum()) * self.packed.n_dates * self.packed.pixels.shape[2] * 4
        return iter(EVAL_BATCHES.get(key, lambda: self._eval_batches(parcels, max_parcels), least))

    def _eval_batches(self, parcels: np.ndarray, max_parcels: int) -> Iterator[dict]:
        order = parcels[np.argsort(self.packed.n_pixels[parcels], kind="stable")]
        n_dates = self.packed.n_dates
        start = 0
        while start < len(order):
            stop = start + 1
            while stop < len(order) and stop - start < max_parcels:
                width = self.packed.n_pixels[order[stop]]
                if (stop - start + 1) * width > self.config.eval_pixel_budget:
                    break
                stop += 1
            chunk = order[start:stop]
            width = int(self.packed.n_pixels[chunk].max())
            steps = np.arange(width)
            counts = self.packed.n_pixels[chunk]
            mask = steps[None, :] < counts[:, None]
            pixel_index = self.packed.offsets[chunk][:, None] + np.where(mask, steps[None, :], 0)
            dates = np.broadcast_to(np.arange(n_dates), (len(chunk), n_dates))
            yield self._gather(chunk, pixel_index, mask, dates)
            start = stop

    def _gather(self, parcels: np.ndarray, pixel_index: np.ndarray, mask: np.ndarray, dates: np.ndarray) -> dict:
        """Assemble an evaluation batch.

        Returns a dict: ``pixels`` float32 (B, T, S, C), ``mask`` bool (B, S) (True = real
        pixel), ``positions`` int64 (B, T) (days after the start date), ``geom`` float32
        (B, 4), ``label`` int64 (B,) (-1 = outside the class list), ``index`` int64 (B,).
        """
        packed = self.packed.pixels
        n_dates, n_bands = packed.shape[1], packed.shape[2]
        # One flat take of (pixel, date) rows is ~3x faster than 2-D fancy indexing.
        rows = (pixel_index[:, None, :] * n_dates + dates[:, :, None]).ravel()
        raw = np.take(packed.reshape(-1, n_bands), rows, axis=0).reshape(
            len(parcels), dates.shape[1], pixel_index.shape[1], n_bands
        )
        return {
            "pixels": self.normalizer(raw),
            "mask": mask,
            "positions": self.packed.positions[dates],
            "geom": self.packed.geom[parcels] / GEOM_SCALE,
            "label": self.labels[parcels],
            "index": np.asarray(parcels, dtype=np.int64),
        }


class EvalBatchCache:
    """The evaluation batches of recent parcel sets, least recently used dropped first, within
    ``budget`` bytes (a set larger than the budget is built each time, never kept, and handed
    out as it is built: a whole test split of a large tile never sits in memory at once)."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self._entries: dict[tuple, tuple[list[dict], int]] = {}
        self._bytes = 0

    def get(self, key: tuple, build: Any, least_bytes: int = 0) -> Iterable[dict]:
        """The batches of ``key``, kept from an earlier call or made by ``build()``; a set of
        at least ``least_bytes`` (a lower bound of its size) above the budget is streamed."""
        found = self._entries.pop(key, None)
        if found is not None:
            self._entries[key] = found  # most recently used last
            return found[0]
        if least_bytes > self.budget:
            return build()
        batches = list(build())
        size = sum(a.nbytes for b in batches for a in b.values() if isinstance(a, np.ndarray))
        if size <= self.budget:
            while self._entries and self._bytes + size > self.budget:
                _, dropped = self._entries.pop(next(iter(self._entries)))  # the least recently used
                self._bytes -= dropped
            self._entries[key] = (batches, size)
            self._bytes += size
        return batches

    def clear(self) -> None:
        self._entries.clear()
        self._bytes = 0


#: Every domain's evaluation batches (:meth:`Domain.eval_batches`), per process: 512 MiB at most.
EVAL_BATCHES = EvalBatchCache(512 * 2**20)


def tile_class_names(packed: PackedTile, merge_seasons: bool = False) -> np.ndarray:
    """Class name of every parcel of a tile (``unknown`` for codes in no table)."""
    codes = CropCodes(packed.country, merge_seasons)
    lookup = {code: codes.class_of(code) for code in np.unique(packed.codes)}
    return np.array([lookup[c] for c in packed.codes], dtype=object)


def open_domains(
    data_root: Path,
    source: str,
    target: str,
    fold: int,
    config: DataConfig = DataConfig(),
    cache_dir: Path | None = None,
    progress=None,
    normalizer: Normalizer | None = None,
) -> tuple[Domain, Domain]:
    """The source and target domains of an experiment, with the class list of the source.

    ``normalizer``: the one the domains use (a trial that starts from a source model uses the
    model's); without one it is fitted on the source training parcels (``config.normalization``),
    which reads pixels from across the tile.

    Raises :class:`DatasetError` when fewer than 2 source classes pass the class rule or
    when the target has no parcel of any source class.
    """
    source_tile = PackedTile.open(data_root, source, cache_dir, progress)
    target_tile = source_tile if target == source else PackedTile.open(data_root, target, cache_dir, progress)
    source_names = tile_class_names(source_tile, config.merge_seasons)
    classes = select_classes(source_names, config.min_parcels)
    if len(classes) < 2:
        counts = dict(zip(*np.unique(source_names, return_counts=True)))
        raise DatasetError(
            f"{source_tile.tile}: only {len(classes)} class(es) have >= {config.min_parcels} parcels "
            f"(class counts: {counts}); a classifier needs at least 2. Lower min_parcels or use a larger tile."
        )
    domains = []
    for packed, names in ((source_tile, source_names), (target_tile, None)):
        names = tile_class_names(packed, config.merge_seasons) if names is None else names
        labels = np.array(label_indices(list(names), classes), dtype=np.int64)
        split = make_split(len(packed), fold, config.split_seed, packed.tile, config.n_folds)
        domains.append(Domain(packed, names, classes, labels, split, config))
    source_domain, target_domain = domains
    known = [c for c in classes if c != UNKNOWN]
    if not np.isin(target_domain.class_names, known).any():
        raise DatasetError(
            f"{target_domain.tile}: no parcel belongs to any class of the source {source_tile.tile} ({known})"
        )
    if normalizer is None and config.normalization == "source_stats":
        normalizer = Normalizer.fit(source_domain.packed, source_domain.split.train, seed=config.split_seed)
    elif normalizer is None:
        normalizer = Normalizer.published(source_domain.packed.pixels.shape[-1])
    source_domain.normalizer = target_domain.normalizer = normalizer
    return source_domain, target_domain


def class_counts(names: Sequence[str]) -> dict[str, int]:
    values, counts = np.unique(np.asarray(names, dtype=str), return_counts=True)
    return {str(v): int(c) for v, c in zip(values, counts)}

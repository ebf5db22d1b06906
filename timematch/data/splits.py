"""Seeded train/validation/test folds of a tile's parcels (70 / 10 / 20 %)."""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np

from timematch.errors import ConfigError

TRAIN_FRACTION = 0.7
VAL_FRACTION = 0.1
#: A class-stratified sample keeps at least this many parcels of a class (all, when it has fewer).
MIN_PER_CLASS = 10


@dataclass(frozen=True)
class Split:
    """Parcel indices of one fold: disjoint, together every parcel of the tile."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray

    def part(self, name: str) -> np.ndarray:
        if name not in ("train", "val", "test"):
            raise ConfigError(f"unknown split {name!r}; valid: train, val, test")
        return getattr(self, name)


def make_split(n_parcels: int, fold: int, seed: int = 0, tile: str = "", n_folds: int = 3) -> Split:
    """Fold ``fold`` of a tile with ``n_parcels`` parcels.

    Each fold is its own seeded random permutation, cut 70 / 10 / 20 %. The tile name
    enters the seed, so source and target tiles are split independently; the same
    (seed, tile, fold) always gives the same split.
    """
    if n_folds < 1:
        raise ConfigError(f"n_folds must be >= 1, got {n_folds}")
    if not 0 <= fold < n_folds:
        raise ConfigError(f"fold must be in [0, {n_folds - 1}] (n_folds={n_folds}), got {fold}")
    if n_parcels < 3:
        raise ConfigError(f"a tile needs at least 3 parcels to split, found {n_parcels}")
    rng = np.random.default_rng([seed, fold, zlib.crc32(tile.encode())])
    order = rng.permutation(n_parcels)
    n_train = int(round(TRAIN_FRACTION * n_parcels))
    n_val = max(1, int(round(VAL_FRACTION * n_parcels)))
    return Split(
        train=np.sort(order[:n_train]),
        val=np.sort(order[n_train : n_train + n_val]),
        test=np.sort(order[n_train + n_val :]),
    )


def make_folds(n_parcels: int, n_folds: int = 3, seed: int = 0, tile: str = "") -> list[Split]:
    """All ``n_folds`` folds of a tile (see :func:`make_split`)."""
    return [make_split(n_parcels, k, seed, tile, n_folds) for k in range(n_folds)]


def sample_parcels(parcels: np.ndarray, size: int, seed: list[int], strata: np.ndarray | None = None) -> np.ndarray:
    """A fixed sample of ``size`` of ``parcels`` (sorted), or all of them when they are no more.

    ``seed``: what the draw is seeded from (the same seed and parcels, the same sample).
    ``strata`` (one value per parcel, e.g. its class): a stratified sample, each stratum in
    proportion to its size (largest remainders), and every stratum present with at least
    ``min(its count, MIN_PER_CLASS)`` parcels (when the budget allows; at least one otherwise);
    without, a uniform sample.
    """
    parcels = np.asarray(parcels)
    if size <= 0 or len(parcels) <= size:
        return np.sort(parcels)
    rng = np.random.default_rng(seed)
    if strata is None:
        return np.sort(rng.choice(parcels, size, replace=False))
    _, inverse, counts = np.unique(np.asarray(strata).astype(str), return_inverse=True, return_counts=True)
    floor = np.minimum(counts, max(MIN_PER_CLASS if size >= MIN_PER_CLASS * len(counts) else size // len(counts), 1))
    # proportional allocation; a stratum whose share is below its floor gets the floor, and the
    # others share what is left, in proportion, until no share falls below its floor
    fixed = np.zeros(len(counts), bool)
    while True:
        budget = size - int(floor[fixed].sum())
        quota = np.where(fixed, floor, budget * counts / max(1, counts[~fixed].sum()))
        low = ~fixed & (quota < floor)
        if not low.any() or budget <= 0:
            break
        fixed |= low
    quota = np.minimum(np.maximum(quota, floor), counts)
    take = np.floor(quota).astype(np.int64)
    leftover = size - int(take.sum())
    if leftover > 0:  # largest remainders first, among strata that have parcels left
        order = np.argsort(-(quota - take), kind="stable")
        order = order[take[order] < counts[order]][:leftover]
        take[order] += 1
    chosen = [rng.choice(parcels[inverse == k], int(n), replace=False) for k, n in enumerate(take) if n > 0]
    return np.sort(np.concatenate(chosen))

"""Today's host-built training batches (numpy), as they were before batches moved to the
device: the reference that ``tests/test_data_views.py`` holds :mod:`timematch.data.views`
to (same content for the same draws, same distributions). Kept in the tests, not the
library: the library builds training batches one way.
"""

from __future__ import annotations

import numpy as np

from timematch.data.dataset import MAX_SHIFT_AUG, Domain
from timematch.data.packed import PackedTile
from timematch.errors import ConfigError, DatasetError


class Reference:
    """The views of a :class:`Domain`, as ``Domain.strong_batch`` / ``weak_batch`` built them."""

    def __init__(self, domain: Domain) -> None:
        self.config = domain.config
        self.packed = domain.packed
        self._gather = domain._gather

    def strong_batch(
        self, parcels: np.ndarray, rng: np.random.Generator, shift_max: int = 0, shift_p: float = 0.0
    ) -> dict:
        """Training view: sampled pixels and dates (in time order).

        Temporal shift augmentation: with probability ``shift_p`` a sample's positions
        all move by one random integer in [-shift_max, shift_max] days (off by default).
        """
        cfg = self.config
        pixel_index, mask = sample_pixels(self.packed, parcels, cfg.pixels_per_parcel, rng)
        n_dates = self.packed.n_dates
        if cfg.timesteps < n_dates:
            keys = rng.random((len(parcels), n_dates))
            dates = np.sort(np.argpartition(keys, cfg.timesteps - 1, axis=1)[:, : cfg.timesteps], axis=1)
        else:
            dates = np.broadcast_to(np.arange(n_dates), (len(parcels), n_dates))
        batch = self._gather(parcels, pixel_index, mask, dates)
        if shift_max > 0 and shift_p > 0:
            if shift_max > MAX_SHIFT_AUG:
                raise ConfigError(f"shift augmentation of {shift_max} days exceeds the positional table's {MAX_SHIFT_AUG}")
            shift = rng.integers(-shift_max, shift_max + 1, size=len(parcels))
            shift *= rng.random(len(parcels)) < shift_p
            batch["positions"] = batch["positions"] + shift[:, None]
        return batch

    def weak_batch(self, parcels: np.ndarray, rng: np.random.Generator) -> dict:
        """Weak view: sampled pixels, all dates."""
        pixel_index, mask = sample_pixels(self.packed, parcels, self.config.pixels_per_parcel, rng)
        dates = np.broadcast_to(np.arange(self.packed.n_dates), (len(parcels), self.packed.n_dates))
        return self._gather(parcels, pixel_index, mask, dates)


def sample_pixels(
    packed: PackedTile, parcels: np.ndarray, size: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Draw ``size`` distinct pixels of each parcel.

    Returns global pixel indices int64 (B, size) and a mask bool (B, size). A parcel with
    fewer pixels keeps all of them and is padded by repeating its first pixel, masked False.
    """
    counts = packed.n_pixels[parcels]
    starts = packed.offsets[parcels]
    local = np.empty((len(parcels), size), dtype=np.int64)
    mask = np.ones((len(parcels), size), dtype=bool)

    small = counts <= size
    if small.any():
        steps = np.arange(size)
        valid = steps[None, :] < counts[small, None]
        local[small] = np.where(valid, steps[None, :], 0)
        mask[small] = valid
    medium = (~small) & (counts <= 2048)
    if medium.any():
        # Random keys, padded past each parcel's length: the `size` smallest are a uniform draw.
        rows = np.flatnonzero(medium)
        width = int(counts[rows].max())
        keys = rng.random((len(rows), width))
        keys[np.arange(width)[None, :] >= counts[rows, None]] = 2.0
        local[rows] = np.argpartition(keys, size - 1, axis=1)[:, :size]
    for row in np.flatnonzero(counts > 2048):  # rare huge parcels
        local[row] = rng.choice(counts[row], size, replace=False)
    return starts[:, None] + local, mask


class ClassBalancedSampler:
    """Draws parcels with probability proportional to 1 / (count of their class)."""

    def __init__(self, labels: np.ndarray, parcels: np.ndarray, balanced: bool = True) -> None:
        self.parcels = np.asarray(parcels)
        if len(self.parcels) == 0:
            raise DatasetError("no labelled parcels to sample from")
        if balanced:
            classes, inverse, counts = np.unique(labels[self.parcels], return_inverse=True, return_counts=True)
            weights = 1.0 / counts[inverse]
        else:
            weights = np.ones(len(self.parcels))
        self.cumulative = np.cumsum(weights / weights.sum())
        self.cumulative[-1] = 1.0

    def __call__(self, size: int, rng: np.random.Generator) -> np.ndarray:
        return self.parcels[np.searchsorted(self.cumulative, rng.random(size), side="right")]


def uniform_sampler(parcels: np.ndarray):
    """Draws parcels uniformly with replacement."""
    parcels = np.asarray(parcels)

    def draw(size: int, rng: np.random.Generator) -> np.ndarray:
        return parcels[rng.integers(0, len(parcels), size)]

    return draw



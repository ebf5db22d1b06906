"""Training batches built with tensor operations, on the device the tile lives on.

A trial samples its batches from two tiles (source and target). :class:`TileTensors` holds a
packed tile (:mod:`timematch.data.packed`) as torch tensors on one device; :class:`DomainViews`
builds the training views of one :class:`~timematch.data.dataset.Domain` from them:

- :meth:`DomainViews.strong`: 64 pixels per parcel (padded and masked when fewer), 30 dates
  drawn in time order, optional temporal shift augmentation;
- :meth:`DomainViews.weak`: pixel sampling only, all dates;
- the parcel samplers (:meth:`DomainViews.draw_train`, :meth:`DomainViews.draw_labelled`,
  class-balanced or not).

Everything is tensor operations with static shapes (parcel indices, pixel and date draws,
the gather, normalisation, the augmentation), so the same code builds batches on a CPU, on
a GPU inside a captured training step (:mod:`timematch.step_engine`: nothing crosses from
the host, not even the parcel indices), or on the host for a GPU whose share of memory the
tile does not fit (:func:`place_views` decides; the loop then streams the batches).

The content and distribution are those of the published data loader: each parcel keeps
``min(n, 64)`` distinct pixels drawn uniformly (padding repeats its first pixel, masked
False), the dates are a uniform draw of 30 without replacement kept in time order, pixels
are normalised per band. One approximation, for parcels of more than :data:`KEY_WIDTH_CAP`
pixels only (none in the published tiles' typical range): their pixels are drawn one per
stratum of ``n / KEY_WIDTH_CAP`` consecutive pixels, then 64 of those uniformly: every pixel
still has probability 64 / n (to within one pixel's share of a stratum), but two pixels of
one stratum are never drawn together. ``tests/test_data_views.py`` compares content and
distribution with the host-built reference.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from timematch.data.dataset import GEOM_SCALE, MAX_SHIFT_AUG, Domain
from timematch.data.packed import PackedTile
from timematch.errors import ConfigError, DatasetError

#: Random keys drawn per parcel to choose its pixels: the tile's largest parcel, up to this.
KEY_WIDTH_CAP = 4096
#: Share of a trial's GPU memory its tiles may take (the rest: activations, graphs, the model).
TILE_MEMORY_SHARE = 0.5


@dataclass(frozen=True)
class Batch:
    """A batch of parcels as the model reads it.

    ``pixels`` float32 (B, T, S, C) normalised, ``mask`` bool (B, S) (True = real pixel),
    ``positions`` int64 (B, T) (days after the tile's start, augmentation included), ``geom``
    float32 (B, 4) (scaled), ``label`` int64 (B,) (-1 = outside the class list), ``index``
    int64 (B,) (parcel indices in the tile). ``padded`` is static: False promises that every
    mask entry is True (a property of the tile, known without reading the mask).
    """

    pixels: torch.Tensor
    mask: torch.Tensor
    positions: torch.Tensor
    geom: torch.Tensor
    label: torch.Tensor
    index: torch.Tensor
    padded: bool = True

    TENSORS = ("pixels", "mask", "positions", "geom", "label", "index")

    def __len__(self) -> int:
        return int(self.pixels.shape[0])

    def tensors(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in self.TENSORS}

    def replace(self, **changes) -> "Batch":
        return dataclasses.replace(self, **changes)

    def to(self, device: torch.device, non_blocking: bool = False) -> "Batch":
        return self.replace(**{k: v.to(device, non_blocking=non_blocking) for k, v in self.tensors().items()})

    def pin_memory(self) -> "Batch":
        return self.replace(**{k: v.pin_memory() for k, v in self.tensors().items()})

    def shifted(self, days) -> "Batch":
        """The same parcels with every date position moved by ``days`` (an int or a 0-dim tensor)."""
        return self.replace(positions=self.positions + days)

    @staticmethod
    def concat(a: "Batch", b: "Batch") -> "Batch":
        """Two batches as one (rows of ``a`` first); they must have the same pixel count."""
        if a.mask.shape[1] != b.mask.shape[1]:
            raise ValueError("batches to concatenate must have the same pixel count")
        return Batch(**{k: torch.cat([x, b.tensors()[k]]) for k, x in a.tensors().items()},
                     padded=a.padded or b.padded)


def model_outputs(model: torch.nn.Module, batch: Batch, sample_weight: torch.Tensor | None = None):
    """``model(...)`` on ``batch``: (logits, features); see
    :meth:`timematch.models.TimeSeriesClassifier.forward` for ``sample_weight``."""
    return model(batch.pixels, batch.mask, batch.positions, batch.geom, padded=batch.padded,
                 sample_weight=sample_weight)


def date_outputs(model: torch.nn.Module, batch: Batch, sample_weight: torch.Tensor | None = None):
    """``model.forward_dates(...)`` on ``batch``: logits, features, and the per-date embeddings
    before temporal pooling with their positions (:class:`timematch.models.classifier.DateOutputs`)."""
    return model.forward_dates(batch.pixels, batch.mask, batch.positions, batch.geom, padded=batch.padded,
                               sample_weight=sample_weight)


@lru_cache(maxsize=None)
def _casts_uint16(device_type: str) -> bool:
    """Whether this torch converts uint16 tensors on ``device_type`` (a fallback exists)."""
    try:
        probe = torch.tensor([-1], dtype=torch.int16, device=device_type)
        return float(probe.view(torch.uint16).float()) == 65535.0
    except (RuntimeError, TypeError):
        return False


def reflectances(raw: torch.Tensor, as_uint16: bool) -> torch.Tensor:
    """int16 storage of uint16 reflectances -> their float32 values (0..65535); ``as_uint16``:
    :func:`_casts_uint16` for the device (one conversion pass instead of three)."""
    if as_uint16:
        return raw.view(torch.uint16).float()
    return raw.to(torch.int32).bitwise_and_(0xFFFF).float()


@dataclass
class TileTensors:
    """A packed tile as tensors on one device.

    ``pixels`` int16 (P * T, C): the uint16 reflectances bit for bit, one row per (pixel,
    date), pixel-major; ``offsets`` and ``counts`` int64 (N,): a parcel's first pixel and its
    number of pixels; ``positions`` int64 (T,) days; ``geom`` float32 (N, 4) scaled.
    """

    tile: str
    pixels: torch.Tensor
    offsets: torch.Tensor
    counts: torch.Tensor
    positions: torch.Tensor
    geom: torch.Tensor
    n_dates: int
    min_pixels: int
    max_pixels: int

    @staticmethod
    def nbytes(packed: PackedTile) -> int:
        """Device memory the tile takes (its pixels dominate)."""
        return int(packed.pixels.nbytes) + 8 * 2 * len(packed) + 16 * len(packed)

    @classmethod
    def of(cls, packed: PackedTile, device: torch.device) -> "TileTensors":
        """The tile on ``device``; on the CPU the pixels stay the memory-mapped cache (no copy)."""
        n_pixels, n_dates, n_bands = packed.pixels.shape
        with warnings.catch_warnings():  # the memory map is read-only, and never written through this view
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            pixels = torch.from_numpy(np.asarray(packed.pixels).view(np.int16)).view(n_pixels * n_dates, n_bands)
        counts = packed.n_pixels
        return cls(
            tile=packed.tile,
            pixels=pixels.to(device),
            offsets=torch.as_tensor(packed.offsets[:-1], dtype=torch.int64, device=device),
            counts=torch.as_tensor(counts, dtype=torch.int64, device=device),
            positions=torch.as_tensor(packed.positions, dtype=torch.int64, device=device),
            geom=torch.as_tensor(packed.geom / GEOM_SCALE, dtype=torch.float32, device=device),
            n_dates=n_dates,
            min_pixels=int(counts.min()) if len(counts) else 0,
            max_pixels=int(counts.max()) if len(counts) else 0,
        )


class DomainViews:
    """The training views of one :class:`Domain`, built from its tile's tensors.

    ``generator``: the random generator of every draw (None: the device's default one, as
    inside a training step on a GPU, where the generator must be the one CUDA graphs replay).
    """

    def __init__(self, domain: Domain, tile: TileTensors, generator: torch.Generator | None = None) -> None:
        if tile.tile != domain.tile:
            raise ValueError(f"tile tensors of {tile.tile} given for the domain of {domain.tile}")
        self.domain = domain
        self.tile = tile
        self.device = tile.pixels.device
        self.generator = generator
        config = domain.config
        self.size = config.pixels_per_parcel
        self.timesteps = min(config.timesteps, tile.n_dates)
        self.padded = tile.min_pixels < self.size
        self.key_width = max(self.size, min(tile.max_pixels, KEY_WIDTH_CAP))
        self.stratified = tile.max_pixels > self.key_width
        tensor = lambda a, dtype=torch.int64: torch.as_tensor(np.asarray(a), dtype=dtype, device=self.device)  # noqa: E731
        self.labels = tensor(domain.labels)
        self.train = tensor(domain.split.train)
        labelled = domain.labelled("train")
        self.labelled_train = tensor(labelled)
        # class-balanced draws: P(parcel) proportional to 1 / (count of its class)
        if len(labelled):
            _, inverse, counts = np.unique(domain.labels[labelled], return_inverse=True, return_counts=True)
            weights = 1.0 / counts[inverse]
            cumulative = np.cumsum(weights / weights.sum())
            cumulative[-1] = 1.0
        else:
            cumulative = np.ones(0)
        self._balanced_cumulative = tensor(cumulative, torch.float64)
        # per-band normalisation, the constants tiled over the pixel axis (one long inner loop)
        scale = (1.0 / domain.normalizer.std).astype(np.float32)
        offset = (domain.normalizer.mean / domain.normalizer.std).astype(np.float32)
        self._scale = tensor(np.tile(scale, self.size), torch.float32)
        self._offset = tensor(np.tile(offset, self.size), torch.float32)
        self._columns = torch.arange(self.key_width, device=self.device)
        self._as_uint16 = _casts_uint16(self.device.type)  # probed here: never inside a captured step

    @classmethod
    def on(cls, domain: Domain, device: torch.device | str, generator: torch.Generator | None = None) -> "DomainViews":
        """The views of ``domain`` with its tile on ``device`` (for one-off use; a trial's
        two domains share their tiles through :func:`place_views`)."""
        return cls(domain, TileTensors.of(domain.packed, torch.device(device)), generator)

    # -- parcels ---------------------------------------------------------------------

    def draw_train(self, size: int) -> torch.Tensor:
        """``size`` training parcels (labelled or not), uniformly with replacement."""
        return self.train[self._randint(len(self.train), size)]

    def draw_labelled(self, size: int, balanced: bool = True) -> torch.Tensor:
        """``size`` labelled training parcels with replacement: with probability proportional to
        1 / (count of their class) when ``balanced``, else uniformly."""
        if len(self.labelled_train) == 0:
            raise DatasetError(f"{self.domain.tile}: no labelled training parcels to sample from")
        if not balanced:
            return self.labelled_train[self._randint(len(self.labelled_train), size)]
        u = torch.rand(size, generator=self.generator, device=self.device, dtype=torch.float64)
        return self.labelled_train[torch.searchsorted(self._balanced_cumulative, u, right=True)]

    # -- views -----------------------------------------------------------------------

    def strong(self, parcels: torch.Tensor, shift_max: int = 0, shift_p: float = 0.0,
               shared_dates: bool = False) -> Batch:
        """Training view: sampled pixels and dates (in time order). Temporal shift augmentation:
        with probability ``shift_p`` a sample's positions all move by one random integer in
        [-``shift_max``, ``shift_max``] days (off by default). ``shared_dates``: one draw of dates
        for the whole batch, so its samples share one time axis (what a DTW alignment between
        two batches' time axes needs: MAD)."""
        pixel_index, mask = self.sample_pixels(parcels)
        batch = self.gather(parcels, pixel_index, mask, self.sample_dates(parcels.shape[0], shared_dates))
        if shift_max > 0 and shift_p > 0:
            if shift_max > MAX_SHIFT_AUG:
                raise ConfigError(f"shift augmentation of {shift_max} days exceeds the positional table's {MAX_SHIFT_AUG}")
            count = parcels.shape[0]
            shift = torch.randint(-shift_max, shift_max + 1, (count,), generator=self.generator, device=self.device)
            keep = torch.rand(count, generator=self.generator, device=self.device) < shift_p
            batch = batch.shifted((shift * keep)[:, None])
        return batch

    def weak(self, parcels: torch.Tensor) -> Batch:
        """Weak view: sampled pixels, all dates."""
        pixel_index, mask = self.sample_pixels(parcels)
        dates = torch.arange(self.tile.n_dates, device=self.device).expand(parcels.shape[0], -1)
        return self.gather(parcels, pixel_index, mask, dates)

    def sample_pixels(self, parcels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``size`` distinct pixels of each parcel: global pixel indices int64 (B, size) and the
        mask bool (B, size). A parcel with fewer keeps all of them, in order, and is padded by
        repeating its first pixel, masked False."""
        counts = self.tile.counts[parcels]
        count = parcels.shape[0]
        keys = torch.rand(count, self.key_width, generator=self.generator, device=self.device)
        # the `size` smallest keys among a parcel's pixels are a uniform draw; a column past its
        # last pixel gets key 2 and is drawn only as padding
        keys = keys.masked_fill_(self._columns >= counts[:, None], 2.0)
        chosen = keys.topk(self.size, dim=1, largest=False, sorted=False).indices.sort(dim=1).values
        mask = chosen < counts[:, None]
        local = chosen
        if self.stratified:  # huge parcels: column j stands for a pixel of the j-th stratum
            within = torch.rand(count, self.size, generator=self.generator, device=self.device)
            low = chosen * counts[:, None] // self.key_width  # strata [low, high): disjoint, each >= 1 pixel
            high = (chosen + 1) * counts[:, None] // self.key_width
            spread = low + (within * (high - low)).long()
            local = torch.where(counts[:, None] > self.key_width, spread, chosen)
        local = torch.where(mask, local, 0)
        return self.tile.offsets[parcels][:, None] + local, mask

    def sample_dates(self, count: int, shared: bool = False) -> torch.Tensor:
        """``timesteps`` distinct dates per sample, in time order: int64 (count, timesteps);
        ``shared``: one draw for all ``count`` samples."""
        n_dates = self.tile.n_dates
        if self.timesteps >= n_dates:
            return torch.arange(n_dates, device=self.device).expand(count, -1)
        if shared:
            return self.sample_dates(1).expand(count, -1)
        keys = torch.rand(count, n_dates, generator=self.generator, device=self.device)
        return keys.topk(self.timesteps, dim=1, largest=False, sorted=False).indices.sort(dim=1).values

    def gather(self, parcels: torch.Tensor, pixel_index: torch.Tensor, mask: torch.Tensor,
               dates: torch.Tensor) -> Batch:
        """Assemble a batch from chosen pixels (B, S) and dates (B, T')."""
        count, size = pixel_index.shape
        n_bands = self.tile.pixels.shape[1]
        rows = (pixel_index[:, None, :] * self.tile.n_dates + dates[:, :, None]).reshape(-1)
        pixels = reflectances(self.tile.pixels.index_select(0, rows), self._as_uint16)
        flat = pixels.view(-1, size * n_bands)
        if size == self.size:
            flat.mul_(self._scale).sub_(self._offset)
        else:
            flat.mul_(self._scale[: n_bands].repeat(size)).sub_(self._offset[: n_bands].repeat(size))
        return Batch(
            pixels=pixels.view(count, dates.shape[1], size, n_bands),
            mask=mask,
            positions=self.tile.positions[dates],
            geom=self.tile.geom[parcels],
            label=self.labels[parcels],
            index=parcels,
            padded=self.padded if size == self.size else True,
        )

    def _randint(self, high: int, size: int) -> torch.Tensor:
        return torch.randint(0, high, (size,), generator=self.generator, device=self.device)


def tile_budget(gpu_share: float, total_memory: int) -> int:
    """Bytes of a GPU that one trial's tiles may take: :data:`TILE_MEMORY_SHARE` of the trial's
    share of the GPU. Each trial (an array of trials is one) holds its own copy of its tiles, so
    the trials that Ray places on one GPU, whose shares add up to at most 1, together keep at
    most that fraction of it for tiles, whatever their number; the rest is for their models,
    activations and captured graphs."""
    return int(TILE_MEMORY_SHARE * min(gpu_share, 1.0) * total_memory)


@dataclass
class Views:
    """Where a trial's batches are built: the source and target :class:`DomainViews`.

    ``inline``: the views are on the training device and the step builds its own batches
    (on a GPU, inside the captured graph); otherwise (tiles too large for the trial's share
    of its GPU) a background thread builds them on the CPU and the loop copies them to the
    GPU. ``placement``: one line saying where the tiles are and why.
    """

    source: DomainViews
    target: DomainViews
    inline: bool
    placement: str


def place_views(source: Domain, target: Domain, device: torch.device, gpu_share: float = 1.0,
                seed: int = 0) -> Views:
    """The views of a trial's two domains, on ``device`` when their tiles fit its memory share.

    On a GPU the tiles are resident when together they take at most
    :data:`TILE_MEMORY_SHARE` of ``gpu_share`` x the GPU's memory: batches are then built in
    the training step. Otherwise they stay in host memory and a background thread builds the
    batches with its own generator, seeded from ``seed``. On a CPU the step builds them from
    the memory-mapped tiles (measured on 2 cores: a background thread building them with
    torch competes with the step's own threads and is no faster).
    """
    tiles = {id(d.packed): d.packed for d in (source, target)}
    need = sum(TileTensors.nbytes(p) for p in tiles.values())
    resident = False
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        budget = tile_budget(gpu_share, torch.cuda.get_device_properties(index).total_memory)
        resident = need <= budget
        placement = (f"tiles on {device} ({need / 1e6:.0f} MB of the trial's {budget / 1e6:.0f} MB for tiles)"
                     if resident else
                     f"tiles in host memory, streamed to {device}: they take {need / 1e6:.0f} MB, more than the "
                     f"trial's {budget / 1e6:.0f} MB for tiles ({TILE_MEMORY_SHARE:.0%} of {gpu_share:g} GPU)")
    else:
        placement = f"tiles in host memory ({need / 1e6:.0f} MB, memory-mapped)"
    inline = resident or device.type == "cpu"
    where = device if inline else torch.device("cpu")
    generator = None if inline else torch.Generator(where).manual_seed(seed)
    on_device = {key: TileTensors.of(packed, where) for key, packed in tiles.items()}
    return Views(
        source=DomainViews(source, on_device[id(source.packed)], generator),
        target=DomainViews(target, on_device[id(target.packed)], generator),
        inline=inline,
        placement=placement,
    )

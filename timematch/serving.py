"""Predicting crop classes of parcels in the published format, from a self-contained predictor.

A :class:`ParcelPredictor` holds what prediction needs besides the pixels: the trained
classifier, the class names, the band statistics of the normaliser, the positional settings
(positions are days after the season's ``start_date``, valid in the model's table range,
plus the shift used at prediction) and the scaling of the geometric features. It saves to a
folder of plain files (``weights.pt``: the state dict, read with ``torch.load(weights_only=True)``;
``settings.json``: everything else) and rebuilds the module with :func:`rebuild_model` (the
classifier from :func:`timematch.models.build_model`, then the extensions a method attached to it),
so loading one unpickles nothing.
:mod:`timematch.runner.serving` logs it to MLflow as a pyfunc model.

Input: a dict of numpy arrays describing a batch of B parcels, as published
(``data/<i>.zarr`` and ``meta/metadata.pkl``, see ``docs/data.md``):

=======================  ===================  ==============================================
key                      dtype, shape         content
=======================  ===================  ==============================================
``pixels``               uint16 (B, T, C, N)  each parcel's array (T, C=10, S), zero-padded
                                              along the pixel axis to N = the largest S
``n_pixels``             int64 (B,)           S of each parcel (the rest is padding)
``dates``                int64 (B, T)         acquisition dates, yyyymmdd (``dates``)
``start_date``           int64 (B,)           the season start, yyyymmdd (``start_date``)
``geometric_features``   float64 (B, 4)       the parcel's raw ``geometric_features``
=======================  ===================  ==============================================

The parcels of a batch share T (one tile, or tiles with as many dates). :func:`parcels_input`
reads parcels of a tile into this form (:func:`example_input`: its smallest few, as a logged
model's example); :func:`stack_parcels` builds it from arrays in hand.

Output of :meth:`ParcelPredictor.predict`: the class name of each parcel and the class
probabilities, float32 (B, K) in the order of ``classes``, rows in input order.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from timematch.data.dataset import GEOM_SCALE, DataConfig, Normalizer
from timematch.data.format import N_BANDS, TileReader, parse_date
from timematch.errors import DatasetError
from timematch.evaluation import pick_device
from timematch.methods import build_config, get_method
from timematch.models import GEOM_DIM, TimeSeriesClassifier, build_model

#: Keys of a parcel batch, in the order of the MLflow signature.
INPUT_KEYS = ("pixels", "n_pixels", "dates", "start_date", "geometric_features")
SETTINGS_FILE = "settings.json"
WEIGHTS_FILE = "weights.pt"
SETTINGS_FORMAT = 1


class ParcelInputError(DatasetError, ValueError):
    """A parcel batch does not have the layout of :data:`INPUT_KEYS`."""


def stack_parcels(
    parcels: Sequence[np.ndarray],
    dates: Sequence[int] | np.ndarray,
    start_date: int | str,
    geometric_features: Sequence[Sequence[float]] | np.ndarray,
) -> dict[str, np.ndarray]:
    """A batch in the input format from parcels of one tile.

    ``parcels``: B uint16 arrays (T, C, S_b) as published; ``dates``: the tile's T dates
    (yyyymmdd); ``start_date``: its season start (yyyymmdd); ``geometric_features`` (B, 4).
    """
    if not parcels:
        raise ParcelInputError("no parcels to stack")
    shapes = {p.shape[:2] for p in parcels}
    if len(shapes) > 1:
        raise ParcelInputError(f"parcels of one batch must share (T, C), found {sorted(shapes)}")
    counts = np.array([p.shape[2] for p in parcels], dtype=np.int64)
    n_dates, n_bands = parcels[0].shape[:2]
    pixels = np.zeros((len(parcels), n_dates, n_bands, int(counts.max())), dtype=np.uint16)
    for row, array in enumerate(parcels):
        pixels[row, :, :, : array.shape[2]] = array
    day_numbers = [int(f"{parse_date(d):%Y%m%d}") for d in dates]
    start = int(f"{parse_date(start_date):%Y%m%d}")
    return {
        "pixels": pixels,
        "n_pixels": counts,
        "dates": np.tile(np.array(day_numbers, dtype=np.int64), (len(parcels), 1)),
        "start_date": np.full(len(parcels), start, dtype=np.int64),
        "geometric_features": np.asarray(geometric_features, dtype=np.float64).reshape(len(parcels), -1),
    }


def parcels_input(root: Path | str, tile: str, indices: Sequence[int]) -> dict[str, np.ndarray]:
    """Parcels ``indices`` (their ``<i>`` in ``data/<i>.zarr``) of ``tile`` under ``root``, read
    with the dataset's own reader into the input format."""
    return _read_parcels(TileReader(root, tile), indices)


def example_input(root: Path | str, tile: str, count: int = 2) -> dict[str, np.ndarray]:
    """The ``count`` smallest parcels of ``tile`` in the input format: a small, real input
    example for a logged model."""
    reader = TileReader(root, tile)
    sizes = np.array([int(p["n_pixels"]) for p in reader.parcels])
    return _read_parcels(reader, np.sort(np.argsort(sizes, kind="stable")[:count]))


def _read_parcels(reader: TileReader, indices: Sequence[int]) -> dict[str, np.ndarray]:
    indices = [int(i) for i in indices]
    outside = [i for i in indices if not 0 <= i < len(reader)]
    if outside:
        raise DatasetError(f"{reader.path}: parcel indices {outside[:5]} outside [0, {len(reader)})")
    return stack_parcels(
        [reader.read_parcel(i) for i in indices],
        reader.dates,
        reader.metadata["start_date"],
        [reader.parcels[i]["geometric_features"] for i in indices],
    )


def batch_positions(dates: np.ndarray, start_date: np.ndarray) -> np.ndarray:
    """Days after ``start_date`` (B,) of ``dates`` (B, T), both yyyymmdd ints: int64 (B, T)."""
    unique, inverse = np.unique(np.concatenate([dates.ravel(), start_date.ravel()]), return_inverse=True)
    try:
        ordinals = np.array([parse_date(int(d)).toordinal() for d in unique], dtype=np.int64)
    except DatasetError as err:
        raise ParcelInputError(f"dates and start_date must be yyyymmdd integers: {err}") from None
    days = ordinals[inverse]
    return days[: dates.size].reshape(dates.shape) - days[dates.size :][:, None]


def check_input(inputs: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """``inputs`` as arrays of the input format; raises :class:`ParcelInputError` naming the key
    and what is wrong."""
    missing = [k for k in INPUT_KEYS if k not in inputs]
    if missing:
        raise ParcelInputError(f"parcel input lacks key(s) {missing}; expected {list(INPUT_KEYS)}")
    batch = {k: np.asarray(inputs[k]) for k in INPUT_KEYS}
    pixels = batch["pixels"]
    if pixels.ndim != 4 or pixels.shape[2] != N_BANDS:
        raise ParcelInputError(f"pixels must be (B, T, {N_BANDS}, N), got shape {pixels.shape}")
    if pixels.dtype != np.uint16:
        raise ParcelInputError(f"pixels must be uint16 reflectances (the published format), got {pixels.dtype}")
    B, T, _, N = pixels.shape
    expected = {"n_pixels": (B,), "dates": (B, T), "start_date": (B,), "geometric_features": (B, GEOM_DIM)}
    for key, shape in expected.items():
        if batch[key].shape != shape:
            raise ParcelInputError(f"{key} must have shape {shape} to match pixels {pixels.shape}, "
                                   f"got {batch[key].shape}")
    for key in ("n_pixels", "dates", "start_date"):
        if not np.issubdtype(batch[key].dtype, np.integer):
            raise ParcelInputError(f"{key} must be integers, got {batch[key].dtype}")
    counts = batch["n_pixels"]
    if B and (counts.min() < 1 or counts.max() > N):
        raise ParcelInputError(f"n_pixels must lie in [1, {N}] (the padded pixel axis), "
                               f"got min {counts.min()} and max {counts.max()}")
    if not np.isfinite(batch["geometric_features"]).all():
        raise ParcelInputError("geometric_features must be finite")
    return batch


def rebuild_model(name: str, num_classes: int, options: Mapping[str, Any] | None = None,
                  extensions: Mapping[str, Mapping[str, Any]] | None = None) -> TimeSeriesClassifier:
    """An untrained classifier with the architecture of a saved one, ready for its state dict:
    ``build_model(name, num_classes=num_classes, **options)`` (a model's ``build_options``), then
    each of ``extensions`` (a model's ``extension_options``: the name of the method that attached
    it -> the config keys it was built from) attached again by that method's
    :meth:`~timematch.methods.base.Method.extend_model`."""
    model = build_model(name, num_classes=num_classes, **(options or {}))
    for owner, config in (extensions or {}).items():
        get_method(owner).extend_model(model, build_config(owner, config))
    return model


@dataclass
class ParcelPredictor:
    """A classifier with everything it needs to predict parcels in the published format.

    ``model``: a :func:`~timematch.models.build_model` classifier, built with
    ``model_options`` (keyword overrides of ``build_model``; ``with_geom`` included), with the
    extensions a method attached to it (saved from its ``extension_options``);
    ``classes``: its K class names in output order; ``normalizer``: the band statistics it was
    trained with; ``shift``: days added to every position at prediction (0 for every
    published method: TimeMatch's student learns target-aligned timing); ``info``: descriptive
    fields kept with the saved settings (source, target, method, ...).
    """

    model: torch.nn.Module
    classes: list[str]
    normalizer: Normalizer
    shift: int = 0
    model_options: dict[str, Any] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    pixel_budget: int = DataConfig.eval_pixel_budget  # pixel slots per forward pass

    def __post_init__(self) -> None:
        if len(self.classes) != self.model.num_classes:
            raise ValueError(f"{len(self.classes)} class names for a model of {self.model.num_classes} classes")
        self.classes = [str(c) for c in self.classes]

    @classmethod
    def from_result(cls, result: Any, **info: Any) -> "ParcelPredictor":
        """The predictor of an :class:`~timematch.experiment.ExperimentResult` (its final model,
        classes and normaliser); ``info`` adds to the spec's description."""
        if not result.normalizer:
            raise ValueError("the experiment result carries no normalizer (a result from before "
                             "ExperimentResult.normalizer); rebuild the predictor with its band statistics")
        spec = result.spec
        described = {"model": spec.model, "method": spec.method, "source": spec.source,
                     "target": spec.target, "fold": spec.fold, **info}
        return cls(result.model, list(result.classes), Normalizer.from_dict(result.normalizer),
                   model_options=dict(getattr(result.model, "build_options", {})), info=described)

    # -- prediction --------------------------------------------------------------------

    @torch.inference_mode()
    def predict_proba(self, inputs: Mapping[str, Any]) -> np.ndarray:
        """Class probabilities float32 (B, K) of a parcel batch (see the module docstring)."""
        batch = check_input(inputs)
        positions = batch_positions(batch["dates"], batch["start_date"]) + self.shift
        try:  # here, on the host: the model's forward does not check
            self.model.check_positions(positions)
        except ValueError as err:
            raise ParcelInputError(f"dates (days after start_date{f', shifted by {self.shift}' if self.shift else ''}): "
                                   f"{err}") from None
        device = next(self.model.parameters()).device
        self.model.eval()
        counts = batch["n_pixels"]
        probs = np.zeros((len(counts), len(self.classes)), dtype=np.float32)
        for rows in self._chunks(counts):
            width = int(counts[rows].max())
            raw = batch["pixels"][rows, :, :, :width].transpose(0, 1, 3, 2)  # (b, T, S, C)
            mask = np.arange(width)[None, :] < counts[rows, None]
            geom = batch["geometric_features"][rows].astype(np.float32) / GEOM_SCALE
            logits, _ = self.model(
                torch.from_numpy(self.normalizer(raw)).to(device),
                torch.from_numpy(mask).to(device),
                torch.from_numpy(positions[rows]).to(device),
                torch.from_numpy(geom).to(device),
                padded=not bool(mask.all()),
            )
            probs[rows] = logits.float().softmax(-1).cpu().numpy()
        return probs

    def predict(self, inputs: Mapping[str, Any]) -> tuple[list[str], np.ndarray]:
        """Class names (B,) and probabilities float32 (B, K) of a parcel batch."""
        probs = self.predict_proba(inputs)
        return [self.classes[k] for k in probs.argmax(1)], probs

    def _chunks(self, counts: np.ndarray) -> list[np.ndarray]:
        """Rows grouped by size (as :meth:`Domain.eval_batches`), each within the pixel budget."""
        order = np.argsort(counts, kind="stable")
        chunks, start = [], 0
        while start < len(order):
            stop = start + 1
            while stop < len(order) and (stop - start + 1) * counts[order[stop]] <= self.pixel_budget:
                stop += 1
            chunks.append(order[start:stop])
            start = stop
        return chunks

    # -- plain-file storage ------------------------------------------------------------

    def settings(self) -> dict[str, Any]:
        """Everything but the weights, as JSON-ready values."""
        low, high = self.model.position_range
        return {
            "format": SETTINGS_FORMAT,
            "architecture": {"name": self.model.name, "num_classes": len(self.classes),
                             "options": self.model_options,
                             "extensions": dict(self.model.extension_options)},
            "classes": self.classes,
            "normalizer": self.normalizer.to_dict(),
            "positions": {"unit": "days after start_date", "shift": int(self.shift), "valid": [low, high]},
            "geom_scale": GEOM_SCALE.tolist(),
            "bands": N_BANDS,
            "input_keys": list(INPUT_KEYS),
            "pixel_budget": int(self.pixel_budget),
            "info": json.loads(json.dumps(self.info, default=str)),
        }

    def save(self, directory: Path | str) -> Path:
        """Write ``weights.pt`` and ``settings.json`` into ``directory``; returns it."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu() for k, v in self.model.state_dict().items()}
        torch.save(state, directory / WEIGHTS_FILE)
        (directory / SETTINGS_FILE).write_text(json.dumps(self.settings(), indent=1))
        return directory

    @classmethod
    def load(cls, directory: Path | str, device: str | None = None) -> "ParcelPredictor":
        """Read a folder written by :meth:`save`; the module goes to ``device`` (default: CUDA
        when present, else CPU)."""
        directory = Path(directory)
        try:
            settings = json.loads((directory / SETTINGS_FILE).read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise DatasetError(f"{directory}: no readable {SETTINGS_FILE} ({type(err).__name__}: {err})") from None
        if settings.get("format") != SETTINGS_FORMAT:
            raise DatasetError(f"{directory}: {SETTINGS_FILE} has format {settings.get('format')!r}, "
                               f"this version reads {SETTINGS_FORMAT}")
        arch = settings["architecture"]
        # settings from before model extensions have no "extensions": a model without any
        model = rebuild_model(arch["name"], arch["num_classes"], arch["options"], arch.get("extensions"))
        state = torch.load(directory / WEIGHTS_FILE, map_location="cpu", weights_only=True)
        model.load_state_dict(state)
        if list(model.position_range) != settings["positions"]["valid"]:
            raise DatasetError(f"{directory}: the rebuilt model's positions {model.position_range} differ from "
                               f"the saved {settings['positions']['valid']}; save model_options with the predictor")
        return cls(
            model.to(pick_device(device)).eval(),
            settings["classes"],
            Normalizer.from_dict(settings["normalizer"]),
            shift=int(settings["positions"]["shift"]),
            model_options=arch["options"],
            info=settings["info"],
            pixel_budget=int(settings["pixel_budget"]),
        )

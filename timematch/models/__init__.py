"""Parcel classifiers: a Pixel-Set Encoder followed by a temporal encoder and a decoder.

``build_model(name, num_classes=...)`` builds one of :data:`MODEL_NAMES`:

- ``pse_ltae`` (default): PSE + Lightweight Temporal Attention Encoder, the TimeMatch model;
- ``pse_tae``: PSE + the original Temporal Attention Encoder;
- ``pse_tempcnn``: PSE + a temporal CNN;
- ``pse_gru``: PSE + a GRU.

Every variant returns ``(logits, features)`` with 128-d features and encodes date
positions with the same sinusoidal table (valid positions ``[-100, 465)``).
"""

from __future__ import annotations

import inspect
from typing import Any

from torch import nn

from timematch.errors import ConfigError
from timematch.models.classifier import TimeSeriesClassifier
from timematch.models.gru import GRUEncoder
from timematch.models.ltae import LTAE
from timematch.models.pse import PixelSetEncoder
from timematch.models.tae import TAE
from timematch.models.tempcnn import TempCNN

__all__ = ["MODEL_NAMES", "GEOM_DIM", "TimeSeriesClassifier", "build_model"]

_TEMPORAL_ENCODERS: dict[str, type[nn.Module]] = {
    "pse_ltae": LTAE,
    "pse_tae": TAE,
    "pse_tempcnn": TempCNN,
    "pse_gru": GRUEncoder,
}
MODEL_NAMES: tuple[str, ...] = tuple(_TEMPORAL_ENCODERS)

GEOM_DIM = 4  # perimeter, shape ratio, area, cover ratio (normalised by the data pipeline)
_PSE_KEYS = ("mlp1", "mlp2")
_CLASSIFIER_KEYS = ("decoder",)


def _keywords(cls: type[nn.Module]) -> list[str]:
    return [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "in_dim")]


def _as_tuple(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


def build_model(
    name: str = "pse_ltae", *, num_classes: int, with_geom: bool = False, **overrides: Any
) -> TimeSeriesClassifier:
    """Build the classifier ``name`` with the published defaults.

    ``with_geom`` appends the parcel's 4 geometric features to the pooled pixel statistics.
    ``overrides`` change defaults: ``mlp1``, ``mlp2`` (pixel-set encoder), ``decoder``
    (widths of the decoder's Linear blocks) and any keyword of the temporal encoder (e.g.
    ``n_head``, ``d_k``, ``dropout``, ``max_shift`` for ``pse_ltae``). Unknown names and keys
    raise :class:`~timematch.errors.ConfigError` listing the valid ones. The model records
    ``with_geom`` and ``overrides`` in its ``build_options``; the extensions a method attaches
    later are its own (:meth:`TimeSeriesClassifier.attach_extension`).
    """
    if name not in _TEMPORAL_ENCODERS:
        raise ConfigError(f"unknown model {name!r}; valid models: {', '.join(MODEL_NAMES)}")
    if num_classes < 1:
        raise ConfigError(f"num_classes must be at least 1, got {num_classes}")
    encoder_cls = _TEMPORAL_ENCODERS[name]
    valid = (*_PSE_KEYS, *_CLASSIFIER_KEYS, *_keywords(encoder_cls))
    unknown = sorted(set(overrides) - set(valid))
    if unknown:
        raise ConfigError(f"unknown option(s) {unknown} for model {name!r}; valid options: {', '.join(valid)}")
    overrides = {k: _as_tuple(v) for k, v in overrides.items()}
    build_options = {**({"with_geom": True} if with_geom else {}), **overrides}

    pse_kwargs = {k: overrides.pop(k) for k in _PSE_KEYS if k in overrides}
    classifier_kwargs = {k: overrides.pop(k) for k in _CLASSIFIER_KEYS if k in overrides}
    try:
        spatial = PixelSetEncoder(geom_dim=GEOM_DIM if with_geom else 0, **pse_kwargs)
        temporal = encoder_cls(in_dim=spatial.out_dim, **overrides)
        model = TimeSeriesClassifier(name, spatial, temporal, num_classes, **classifier_kwargs)
        model.build_options = build_options
        return model
    except ValueError as error:  # inconsistent widths: a configuration mistake
        raise ConfigError(f"model {name!r}: {error}") from error

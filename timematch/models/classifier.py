"""The parcel classifier: spatial encoder -> temporal encoder -> decoder.

Split in three calls so that shift estimation can run the (shift independent) pixel-set
encoder once per batch and only the temporal encoder and decoder once per candidate shift.

A method may add *extensions* to the classifier (:meth:`TimeSeriesClassifier.attach_extension`):
modules that read the per-date embeddings and their positions and whose outputs add to the
pooled features. The classifier knows nothing of what they compute; the method that attaches
one records how to build it again, so a saved model can be rebuilt
(:func:`timematch.serving.rebuild_model`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import torch
from torch import nn

from timematch.models.layers import SampleWeights, linear_blocks, sample_weighted_statistics
from timematch.models.positional import check_positions
from timematch.models.pse import PixelSetEncoder


class DateOutputs(NamedTuple):
    """A forward pass with what came before temporal pooling: ``logits (B, K)``, ``features
    (B, feature_dim)`` (the pooled features the decoder reads), ``dates (B, T, 128)`` (the
    per-date embeddings the temporal encoder pooled: the pixel-set encoder's output, which does
    not depend on the date positions), ``positions (B, T)`` (their days) and ``extensions``
    (each extension's share of ``features``, ``(B, feature_dim)``, by its name; empty without
    extensions: see :meth:`TimeSeriesClassifier.attach_extension`)."""

    logits: torch.Tensor
    features: torch.Tensor
    dates: torch.Tensor
    positions: torch.Tensor
    extensions: Mapping[str, torch.Tensor]


class TimeSeriesClassifier(nn.Module):
    """Classifies parcels from their pixel time series; returns ``(logits, features)``.

    Shapes: ``pixels (B, T, S, C)`` float, ``mask (B, S)`` bool (True = real pixel),
    ``positions (B, T)`` int64 days (shift included, inside :attr:`position_range`,
    ``[-100, 465)`` by default), ``geom (B, 4)`` or None (ignored unless built with
    geometric features).
    ``forward(...) == classify(encode_time(encode_pixels(pixels, mask, geom), positions))``.

    The forward reads nothing back to the host, so a training step can be captured as a
    CUDA graph: what would need a read is the caller's to guarantee, where batches are built
    (:meth:`check_positions`; every parcel has a valid pixel, which the packed cache ensures).
    """

    def __init__(
        self,
        name: str,
        spatial_encoder: PixelSetEncoder,
        temporal_encoder: nn.Module,
        num_classes: int,
        decoder: tuple[int, ...] = (128, 64, 32),
    ) -> None:
        super().__init__()
        if decoder[0] != temporal_encoder.out_dim:
            raise ValueError(
                f"decoder must start at the temporal encoder's width {temporal_encoder.out_dim}, got {decoder}"
            )
        self.name = name
        self.num_classes = num_classes
        self.feature_dim = temporal_encoder.out_dim
        self.spatial_encoder = spatial_encoder
        self.temporal_encoder = temporal_encoder
        # Linear blocks, then a plain linear layer to the logits
        self.decoder = nn.Sequential(*linear_blocks(decoder), nn.Linear(decoder[-1], num_classes))
        #: Modules attached by a method (:meth:`attach_extension`), by name.
        self.extensions = nn.ModuleDict()
        #: Per extension, the options its owner builds it again from (:meth:`attach_extension`).
        self.extension_options: dict[str, dict[str, Any]] = {}
        #: Keyword overrides of :func:`timematch.models.build_model` that rebuild this model (set
        #: by it; a saved model records them, see :class:`timematch.serving.ParcelPredictor`).
        self.build_options: dict[str, Any] = {}

    @property
    def date_dim(self) -> int:
        """Width of the per-date embeddings the temporal encoder pools (128)."""
        return self.spatial_encoder.out_dim

    def attach_extension(self, name: str, module: nn.Module, options: Mapping[str, Any]) -> nn.Module:
        """Add ``module`` to the forward pass: ``module(dates (B, T, date_dim), positions (B, T))
        -> (B, feature_dim)``, added to the temporal encoder's pooled features before the decoder
        (its share is in :attr:`DateOutputs.extensions` under ``name``). An extension whose output
        starts at zero leaves the outputs as they were until it learns.

        ``name`` is the registered name of the method that owns the extension, and ``options``
        (JSON-ready) what that method builds it again from: :attr:`extension_options` records them
        so that a saved model is rebuilt with its extensions (see :func:`timematch.serving.rebuild_model`).
        The module moves to the classifier's device; it trains with the backbone and is saved in
        the classifier's state dict (under ``extensions.<name>.``)."""
        if name in self.extensions:
            raise ValueError(f"the classifier has an extension named {name!r} already")
        width = getattr(module, "out_dim", self.feature_dim)
        if width != self.feature_dim:
            raise ValueError(f"extension {name!r} outputs {width} features; the classifier's are {self.feature_dim}")
        self.extensions[name] = module.to(next(self.parameters()).device)
        self.extension_options[name] = dict(options)
        return module

    @property
    def position_range(self) -> tuple[int, int]:
        """Date positions the temporal encoder can encode: ``[low, high)``."""
        positional = self.temporal_encoder.positional
        return positional.low, positional.high

    def check_positions(self, positions) -> None:
        """Raise ``ValueError`` unless ``positions`` (an array, a tensor or a (min, max) pair;
        host data: a GPU tensor is read back) lie in :attr:`position_range`."""
        check_positions(positions, *self.position_range)

    def encode_pixels(self, pixels: torch.Tensor, mask: torch.Tensor, geom: torch.Tensor | None = None,
                      padded: bool = True) -> torch.Tensor:
        """Date embeddings ``(B, T, 128)``; independent of the date positions. ``padded=False``
        promises that every mask entry is True."""
        return self.spatial_encoder(pixels, mask, geom, padded)

    def encode_time(self, embeddings: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Parcel features ``(B, feature_dim)`` from date embeddings ``(B, T, 128)`` at ``positions (B, T)``.

        Rows are independent in eval mode, so a batch of D shifted copies stacked along the
        batch axis (``B * D`` rows) gives the same features as D separate calls.
        """
        return self._encode_time_parts(embeddings, positions)[0]

    def _encode_time_parts(self, embeddings: torch.Tensor,
                           positions: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The pooled features and each extension's share of them."""
        _check_positions_shape(embeddings, positions)
        features = self.temporal_encoder(embeddings, positions)
        shares = {name: extension(embeddings, positions) for name, extension in self.extensions.items()}
        for share in shares.values():
            features = features + share
        return features, shares

    def encode_time_shifted(
        self, embeddings: torch.Tensor, positions: torch.Tensor, shifts: torch.Tensor
    ) -> torch.Tensor:
        """Features ``(D * B, feature_dim)`` at ``positions + d`` for each of the D ``shifts``, shift-major.

        In eval mode the same as ``encode_time`` on the stacked copies
        ``embeddings.repeat(D, 1, 1)`` at ``positions.repeat(D, 1) + shifts.repeat_interleave(B)[:, None]``;
        encoders that can (LTAE) skip the work that does not depend on the shift.
        """
        _check_positions_shape(embeddings, positions)
        shifts = torch.as_tensor(shifts, dtype=positions.dtype, device=positions.device).reshape(-1)
        if hasattr(self.temporal_encoder, "forward_shifted") and not self.extensions:
            return self.temporal_encoder.forward_shifted(embeddings, positions, shifts)
        B, D = embeddings.shape[0], shifts.shape[0]
        stacked = positions.repeat(D, 1) + shifts.repeat_interleave(B)[:, None]
        return self.encode_time(embeddings.repeat(D, 1, 1), stacked)

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, num_classes)`` from parcel features ``(B, feature_dim)``."""
        return self.decoder(features)

    def forward(
        self,
        pixels: torch.Tensor,
        mask: torch.Tensor,
        positions: torch.Tensor,
        geom: torch.Tensor | None = None,
        *,
        padded: bool = True,
        sample_weight: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logits (B, num_classes), features (B, feature_dim))`` for a batch of parcels.

        ``padded=False`` promises that every mask entry is True. ``sample_weight`` (B,) of 0
        and 1: in train mode, only the samples of weight 1 enter the batch-norm statistics,
        as if the others had not been forwarded (their outputs are computed, finite and
        meaningless); with fewer than two, the running statistics stay as they are. See
        :mod:`timematch.models.layers`.
        """
        outputs = self.forward_dates(pixels, mask, positions, geom, padded=padded, sample_weight=sample_weight)
        return outputs.logits, outputs.features

    def forward_dates(
        self,
        pixels: torch.Tensor,
        mask: torch.Tensor,
        positions: torch.Tensor,
        geom: torch.Tensor | None = None,
        *,
        padded: bool = True,
        sample_weight: torch.Tensor | None = None,
    ) -> DateOutputs:
        """:meth:`forward` that also returns the per-date embeddings before temporal pooling and
        their positions (:class:`DateOutputs`): the same computation, the same outputs."""
        weights = None if sample_weight is None else SampleWeights.of(sample_weight)
        with sample_weighted_statistics(weights):
            dates = self.encode_pixels(pixels, mask, geom, padded)
            features, shares = self._encode_time_parts(dates, positions)
            return DateOutputs(self.classify(features), features, dates, positions, shares)


def _check_positions_shape(embeddings: torch.Tensor, positions: torch.Tensor) -> None:
    if embeddings.shape[:2] != positions.shape:
        raise ValueError(
            f"positions must have shape (B, T) = {tuple(embeddings.shape[:2])} to match the embeddings, "
            f"got {tuple(positions.shape)}"
        )

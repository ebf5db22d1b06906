"""Synthetic TimeMatch benchmark: the four published tiles, in the published on-disk format,
with planted regional phenology shifts.

The published dataset (about 78 GB) is not always reachable, so the project ships this
seeded generator. It writes ``<root>/<country>/<tile>/<year>/data/<i>.zarr`` (one zarr
format-2 array per parcel, uint16 (T, C=10, S)) and ``meta/metadata.pkl`` exactly as
described in ``docs/data.md``, so the reader cannot tell it from the real thing, plus
``<root>/synthetic_ground_truth.json`` with the planted shifts (the reader ignores it).
Command line: ``python -m timematch.data synth --root DIR``; in code,
:func:`generate_dataset`. The same arguments give the same bytes.

The package owns the synthetic data, one concern per module; each module imports only the
ones listed before it:

- :mod:`.codes`: the crop classes and real national codes of a tile's parcels, imbalanced like
  LPIS data (meadow about 30 %, about 5 % ``unknown``);
- :mod:`.acquisitions`: each tile's irregular 2017 calendar (52, 62, 39, 58 dates for DK, FR1,
  FR2, AT1) and its clouds;
- :mod:`.phenology`: per class a reference phenology, its parcel variants, and the reflectance
  it makes (endmember mixture, atmosphere per date, shared calibration, noise);
- :mod:`.truth`: what is planted (one shift per tile, optionally per-class shifts and a season
  stretch), the sign convention ``d = s_target - s_source``, and the ground-truth file;
- :mod:`.simulation`: one tile's plan (calendar, parcels, metadata) and its parcels' pixels;
- :mod:`.writing`: the files on disk, and :func:`generate_dataset`, the entry point;
- :mod:`.plots`: median NDVI per class read back from disk, to check the shifts by eye.
"""

from timematch.data.synthetic.acquisitions import TILE_CALENDAR_SIZES
from timematch.data.synthetic.codes import DEFAULT_PARCELS_PER_TILE, tile_class_counts
from timematch.data.synthetic.plots import class_ndvi_curves, plot_class_ndvi
from timematch.data.synthetic.simulation import PIXEL_SIZES
from timematch.data.synthetic.truth import (
    DEFAULT_SHIFTS, GENERATOR_VERSION, GROUND_TRUTH_FILE, MAX_SHIFT, SIGN_CONVENTION, STRETCH_PIVOT, STRETCH_RANGE,
    expected_shifts, planted_shift, read_ground_truth,
)
from timematch.data.synthetic.writing import BYTES_PER_PIXEL_DATE, EMBEDDED_BYTES, generate_dataset

__all__ = [
    "TILE_CALENDAR_SIZES", "DEFAULT_PARCELS_PER_TILE", "tile_class_counts", "class_ndvi_curves", "plot_class_ndvi",
    "DEFAULT_SHIFTS", "GENERATOR_VERSION", "GROUND_TRUTH_FILE", "MAX_SHIFT", "SIGN_CONVENTION", "STRETCH_PIVOT",
    "STRETCH_RANGE", "expected_shifts", "planted_shift", "read_ground_truth", "EMBEDDED_BYTES", "generate_dataset",
    "PIXEL_SIZES", "BYTES_PER_PIXEL_DATE",
]

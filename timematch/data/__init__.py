"""Data layer: the published dataset format, class mapping, folds, packed cache, batches,
and the synthetic generator. Command line: ``python -m timematch.data {info,synth}``."""

from timematch.data.classes import UNKNOWN, CropCodes, select_classes
from timematch.data.dataset import DataConfig, Domain, Normalizer, open_domains
from timematch.data.format import TileReader, read_metadata
from timematch.data.packed import PackedTile
from timematch.data.splits import Split, make_folds, make_split
from timematch.data.tiles import TILES, default_cache_dir, resolve_tile, short_name

__all__ = [
    "UNKNOWN", "CropCodes", "select_classes", "DataConfig", "Domain", "Normalizer", "open_domains",
    "TileReader", "read_metadata", "PackedTile", "Split", "make_folds", "make_split", "TILES",
    "default_cache_dir", "resolve_tile", "short_name",
]

"""TimeMatch: cross-region domain adaptation for crop-type mapping from satellite image time series.

The library (data, models, methods, shift estimation, metrics, training) imports neither
Ray nor MLflow; the distributed runner lives in :mod:`timematch.runner`.
"""

__version__ = "0.1.0"

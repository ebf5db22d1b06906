"""Adaptation methods: one module per method, one contract (:class:`base.Method`), one registry.

Importing this package registers every method; import errors are never swallowed.
"""

from timematch.methods import fixmatch, source_only, timematch, upper_bound  # noqa: F401  (registration)
from timematch.methods.registry import build_config, config_class, config_fields, get_method, method_names

__all__ = ["build_config", "config_class", "config_fields", "get_method", "method_names"]

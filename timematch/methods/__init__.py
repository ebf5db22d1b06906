"""Adaptation methods: one module per method, one contract (:class:`base.Method`), one registry.

Importing this package registers every method; import errors are never swallowed.
"""

from timematch.methods import (  # noqa: F401  (registration)
    alda,
    cdan,
    cdan_e,
    dann,
    fixmatch,
    jumbot,
    mmd,
    shift_aug,
    source_only,
    timematch,
    upper_bound,
)
from timematch.methods.registry import (
    build_config,
    config_class,
    config_fields,
    get_method,
    method_names,
    methods_in_table_order,
    source_model_method,
)

__all__ = ["build_config", "config_class", "config_fields", "get_method", "method_names",
           "methods_in_table_order", "source_model_method"]

"""Adaptation methods: one module per method, one contract (:class:`base.Method`), one registry.

Importing this package imports every module of it, and each method module registers its
method (:func:`registry.register`): a new method is one module here and one search space
(``search_spaces/<name>.yaml``), nothing else to edit. An import error in a method module is
raised, never swallowed: a broken method must not silently leave the registry.
"""

import importlib
import pkgutil

from timematch.methods.registry import (
    build_config,
    config_class,
    config_fields,
    get_method,
    method_names,
    methods_in_table_order,
    source_model_method,
)

#: Modules of this package that hold shared parts, not a method of their own.
SHARED_MODULES = frozenset({"alignment", "base", "pseudo_label", "registry"})


def _import_method_modules() -> list[str]:
    names = sorted(m.name for m in pkgutil.iter_modules(__path__) if m.name not in SHARED_MODULES)
    for name in names:
        importlib.import_module(f"{__name__}.{name}")
    return names


METHOD_MODULES = _import_method_modules()

__all__ = ["METHOD_MODULES", "build_config", "config_class", "config_fields", "get_method", "method_names",
           "methods_in_table_order", "source_model_method"]

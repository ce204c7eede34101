"""PEFT methods behind one interface.

Each method is one module of this package with a typed config and a ``@register``-ed class;
importing the package imports every module in it, so adding a method needs no other edit.
"""

import importlib
import pkgutil

from shpeft.methods.base import (
    METHODS,
    Method,
    MethodConfig,
    PrepareContext,
    SelectiveMethod,
    get_method,
    register,
)

for _info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if _info.name != "base":
        importlib.import_module(f"{__name__}.{_info.name}")

__all__ = [
    "METHODS",
    "Method",
    "MethodConfig",
    "PrepareContext",
    "SelectiveMethod",
    "get_method",
    "register",
]

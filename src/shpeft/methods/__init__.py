"""PEFT methods behind one interface.

Each method is one implementation module of this package (a ``@register``-ed
:class:`~shpeft.methods.base.Method` subclass) plus its entry in :mod:`shpeft.methods.configs`
(its typed config and a :class:`~shpeft.methods.configs.MethodInfo`). Importing this package
loads only the registry (no torch): :data:`METHODS` lists the methods; :func:`get_method` imports
an implementation when it is asked for.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from shpeft.methods.configs import METHODS, MethodConfig, MethodInfo, method_info

if TYPE_CHECKING:
    from shpeft.methods.base import Method, PrepareContext, SelectiveMethod, register

__all__ = [
    "METHODS",
    "Method",
    "MethodConfig",
    "MethodInfo",
    "PrepareContext",
    "SelectiveMethod",
    "get_method",
    "method_info",
    "register",
]


def get_method(name: str) -> type[Method]:
    """The method class registered as ``name`` (its module is imported on first use).

    Raises:
        ValueError: an unknown name, listing the known ones.
    """
    info = method_info(name)
    importlib.import_module(f"{__name__}.{info.module}")
    from shpeft.methods.base import registered

    return registered(name)


def __getattr__(name: str) -> Any:
    # the base classes import torch: loaded when first used, not with the registry
    if name in ("Method", "PrepareContext", "SelectiveMethod", "register"):
        from shpeft.methods import base

        return getattr(base, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

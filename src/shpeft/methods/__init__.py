"""PEFT methods behind one interface; importing this package registers the built-in ones."""

from shpeft.methods import shpeft as _shpeft  # noqa: F401  (registers)
from shpeft.methods import simple as _simple  # noqa: F401  (registers)
from shpeft.methods.base import METHODS, Method, MethodConfig, PrepareContext, get_method, register

__all__ = ["METHODS", "Method", "MethodConfig", "PrepareContext", "get_method", "register"]

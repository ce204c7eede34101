"""Typed configs and the argparse flags generated from them.

Every config is a dataclass whose fields carry ``metadata={"help": ..., "choices": ...}``; the CLI
adds one flag per field (``--field-name``), so the documentation lives in one place (the approach
of Hugging Face's ``HfArgumentParser``, written small).
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any, TypeVar

T = TypeVar("T")


def _base_type(tp: Any) -> tuple[Any, bool]:
    """(underlying type, optional?) for ``X``, ``X | None`` and ``Optional[X]``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _parse_optional(conv):
    def parse(text: str):
        return None if text.lower() in ("none", "null", "") else conv(text)

    parse.__name__ = getattr(conv, "__name__", "value")
    return parse


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_dataclass_arguments(
    parser: argparse.ArgumentParser, cls: type, title: str | None = None, skip: tuple[str, ...] = ()
) -> None:
    """Add one flag per field of dataclass ``cls`` (defaults left unset to detect what was given)."""
    group = parser.add_argument_group(
        title or cls.__name__, (cls.__doc__ or "").strip().split("\n")[0]
    )
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip or not f.init:
            continue
        tp, optional = _base_type(hints[f.name])
        help_ = f.metadata.get("help", "").replace("%", "%%")  # argparse %-formats help
        default = f.default if f.default is not dataclasses.MISSING else None
        if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = f.default_factory()  # type: ignore[misc]
        kwargs: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS}
        if tp is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            conv = tp if tp in (int, float, str) else str
            kwargs["type"] = _parse_optional(conv) if optional else conv
            if "choices" in f.metadata:
                kwargs["choices"] = f.metadata["choices"]
            kwargs["metavar"] = f.metadata.get("metavar", conv.__name__.upper())
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING  # type: ignore[misc]
        # Required fields are checked when the config is built (see dataclass_from_args), so
        # that options such as --resume can stand in for them.
        kwargs["help"] = (
            f"{help_} (default: {str(default).replace('%', '%%')})"
            if not required
            else f"{help_} (required)"
        )
        names = [flag(f.name)] + list(f.metadata.get("aliases", ()))
        group.add_argument(*names, **kwargs)


def dataclass_from_args(cls: type[T], ns: argparse.Namespace | dict, **overrides: Any) -> T:
    """Build ``cls`` from the fields present in ``ns`` (absent ones keep their defaults)."""
    values = vars(ns) if isinstance(ns, argparse.Namespace) else dict(ns)
    names = {f.name for f in dataclasses.fields(cls) if f.init}  # type: ignore[arg-type]
    kwargs = {k: v for k, v in values.items() if k in names}
    kwargs.update(overrides)
    missing = [
        flag(f.name)
        for f in dataclasses.fields(cls)  # type: ignore[arg-type]
        if f.init
        and f.name not in kwargs
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING  # type: ignore[misc]
    ]
    if missing:
        raise ValueError(f"missing required option {', '.join(missing)}")
    return cls(**kwargs)


def to_dict(obj: Any) -> dict[str, Any]:
    """JSON-friendly ``asdict`` (tuples become lists)."""
    return dataclasses.asdict(obj)


def from_dict(cls: type[T], data: dict[str, Any]) -> T:
    """Inverse of :func:`to_dict`, ignoring keys that a newer or older version added."""
    names = {f.name for f in dataclasses.fields(cls) if f.init}  # type: ignore[arg-type]
    return cls(**{k: v for k, v in data.items() if k in names})

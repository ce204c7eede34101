"""Progress of long work: a tqdm bar on a terminal, plain periodic log lines everywhere else.

tqdm redraws its bar many times a second; written to a file or a pipe (a grid's log, a job
scheduler, ``2> log.txt``) every redraw becomes a line and floods the log. When stderr is not a
terminal, :func:`progress_bar` logs one line every ``every_s`` seconds (and one at the end)
instead, through the ``shpeft`` logger.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, Generic, TypeVar

log = logging.getLogger("shpeft")
T = TypeVar("T")


def is_terminal() -> bool:
    """True when stderr is an interactive terminal."""
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed stream
        return False


class LogProgress(Generic[T]):
    """Iterates like tqdm (``set_postfix``, ``update``) but logs a line every ``every_s``."""

    def __init__(
        self, iterable: Iterable[T] | None, total: int | None, desc: str, every_s: float
    ) -> None:
        self.iterable, self.total, self.desc, self.every_s = iterable, total, desc, every_s
        self.n, self.postfix = 0, ""
        self._t0 = self._last = time.monotonic()

    def set_postfix(self, **kw: Any) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in kw.items())

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self._last >= self.every_s or (self.total is not None and self.n >= self.total):
            self._last = now
            self._emit(now)

    def _emit(self, now: float) -> None:
        of = f"/{self.total} ({100.0 * self.n / self.total:.0f}%)" if self.total else ""
        rest = f", {self.postfix}" if self.postfix else ""
        log.info("%s: %d%s, %.0f s%s", self.desc, self.n, of, now - self._t0, rest)

    def __iter__(self) -> Iterator[T]:
        assert self.iterable is not None
        for item in self.iterable:
            yield item
            self.update()

    def close(self) -> None:
        pass

    def __enter__(self) -> LogProgress[T]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Silent(LogProgress[T]):
    def update(self, n: int = 1) -> None:
        self.n += n


def progress_bar(
    iterable: Iterable[T] | None = None,
    *,
    total: int | None = None,
    desc: str = "",
    enabled: bool = True,
    every_s: float = 30.0,
    leave: bool = True,
) -> Any:
    """A tqdm bar on a terminal; otherwise a :class:`LogProgress` (periodic log lines).

    ``enabled=False`` shows nothing at all. Use it like tqdm: iterate over it, or ``update(n)``
    it as a context manager.
    """
    if total is None and iterable is not None and hasattr(iterable, "__len__"):
        total = len(iterable)  # type: ignore[arg-type]
    if not enabled:
        return _Silent(iterable, total, desc, every_s)
    if is_terminal():
        from tqdm.auto import tqdm

        return tqdm(iterable, total=total, desc=desc, dynamic_ncols=True, leave=leave)
    return LogProgress(iterable, total, desc, every_s)

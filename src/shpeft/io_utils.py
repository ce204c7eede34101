"""Durable file writes: every file shpeft writes goes through :func:`atomic_write`.

One guarantee everywhere: a reader sees either the old file or the complete new one, never a
partial file, even if the process is killed or the machine stops mid-write. The content goes to a
uniquely named temporary file in the same folder (``.NAME.<random>.tmp``, so parallel writers
never share one), is flushed and fsynced, renamed over the target (atomic on POSIX), and the
folder entry is fsynced so that the rename itself survives a crash. Missing parent folders are
created. Nothing here imports torch.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any

__all__ = [
    "atomic_path",
    "atomic_write",
    "atomic_write_bytes",
    "fsync_dir",
    "write_csv",
    "write_json",
    "write_text",
]


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename durable (POSIX: the directory entry itself must be flushed)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path to write (by any library); on success it replaces ``path`` durably.

    For writers that insist on a file name (safetensors' ``save_file``). On an exception the
    temporary file is removed and ``path`` is left untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], Any]) -> Path:
    """Call ``write(f)`` on a binary file object whose content then replaces ``path`` durably."""
    path = Path(path)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        write(f)
        f.flush()
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Replace ``path`` with ``data`` durably."""
    return atomic_write(path, lambda f: f.write(data))


def write_json(path: str | os.PathLike, obj: Any, *, indent: int = 2) -> Path:
    """Write ``obj`` as JSON (``default=str`` for paths and the like) with a final newline."""
    text = json.dumps(obj, indent=indent, default=str, ensure_ascii=False) + "\n"
    return atomic_write_bytes(path, text.encode("utf-8"))


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Replace ``path`` with ``text`` (UTF-8) durably."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def write_csv(
    path: str | os.PathLike, header: Sequence[Any], rows: Iterable[Sequence[Any]]
) -> Path:
    """Write a CSV file (header row first) durably."""
    buf = io.StringIO(newline="")
    w = csv.writer(buf)
    w.writerow(header)
    w.writerows(rows)
    return write_text(path, buf.getvalue())

"""Crash-safe training state: atomic checkpoints, fallback to the previous one, a run lock.

A checkpoint holds everything that decides the rest of a run: the trainable tensors, the
optimizer and scheduler states, the best validation state so far, the torch RNG states and the
iteration (the data order and the augmentation are pure functions of seed and iteration, see
``shpeft.training``). It is written with ``torch.save`` to a temporary file, fsynced and renamed, and
read back with ``torch.load(weights_only=True)``: nothing but tensors and plain containers is
ever unpickled. The newest ``keep`` checkpoints are kept, so a corrupt latest file falls back to
the one before.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import re
from pathlib import Path
from typing import Any

import torch

from shpeft.io_utils import atomic_write

log = logging.getLogger(__name__)

CHECKPOINT_VERSION = 1
_NAME = re.compile(r"^ckpt_(\d{8})\.pt$")


def atomic_torch_save(obj: Any, path: Path) -> None:
    """``torch.save`` with :mod:`shpeft.io_utils`' durability (temporary file, fsync, rename)."""
    atomic_write(path, lambda f: torch.save(obj, f))


def checkpoint_paths(run_dir: Path) -> list[Path]:
    """Checkpoints of a run, newest first."""
    folder = run_dir / "checkpoints"
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if _NAME.match(p.name)]
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)), reverse=True)


def save_checkpoint(run_dir: Path, state: dict[str, Any], *, keep: int = 2) -> Path:
    """Write ``state`` as the newest checkpoint and prune all but the newest ``keep``."""
    state = {"version": CHECKPOINT_VERSION, **state}
    path = run_dir / "checkpoints" / f"ckpt_{int(state['iteration']):08d}.pt"
    atomic_torch_save(state, path)
    for old in checkpoint_paths(run_dir)[keep:]:
        old.unlink(missing_ok=True)
    return path


def load_latest_checkpoint(run_dir: Path) -> dict[str, Any] | None:
    """The newest checkpoint that loads; corrupt ones are reported and skipped."""
    # temporary files of writes cut short by a crash are never valid checkpoints
    for tmp in (run_dir / "checkpoints").glob(".ckpt_*.tmp"):
        tmp.unlink(missing_ok=True)
    for path in checkpoint_paths(run_dir):
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # any failure to read means "not usable": fall back
            log.warning("checkpoint %s is unreadable (%s); trying the previous one", path, e)
            continue
        if not isinstance(state, dict) or state.get("version") != CHECKPOINT_VERSION:
            log.warning("checkpoint %s has an unknown layout; trying the previous one", path)
            continue
        log.info("resuming from %s (iteration %d)", path, state["iteration"])
        return state
    return None


class RunLock:
    """An exclusive ``flock`` on ``<run_dir>/.lock``: a second writer of the same run refuses.

    The lock dies with its process (also on ``kill -9``), so a crashed run never blocks a resume.
    """

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / ".lock"
        self._fd: int | None = None

    def __enter__(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise FileExistsError(
                    f"run directory {self.path.parent} is in use by another shpeft process"
                ) from None
            raise
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

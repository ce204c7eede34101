"""Running requests on shared backbones: one worker per base, same-task batching, apply/revert.

Each base has one worker thread and one queue, so nothing else touches its tensors while a
task's delta is in them. The worker takes the oldest job, then everything queued behind it
(optionally waiting ``batch_wait_s`` for more), groups the jobs by task in order of arrival,
and for each task:

1. writes the task's switch delta into the shared tensors (:class:`shpeft.serve.switch.Switch`,
   which keeps the overwritten values: O(k) time and memory);
2. runs its jobs in batches of at most ``max_batch`` through the task's view of the base;
3. restores the base, bit for bit, in a ``finally``, so a failing batch cannot leave one task's
   weights in place for the next.

A failure is delivered to the jobs of its own batch only. Jobs cancelled before they run (the
client went away) are skipped. Results are ``concurrent.futures.Future`` objects, awaitable
from asyncio with :func:`asyncio.wrap_future`.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from shpeft.explain import explain
from shpeft.serve.registry import Base, Registry, Task

log = logging.getLogger("shpeft.serve")

_STOP = object()


class EngineClosed(RuntimeError):
    """The engine is shutting down (or its base is unusable) and takes no more jobs."""


@dataclass
class Job:
    """One image for one task: ``predict`` gives its logits, ``explain`` its heat map."""

    task: Task
    x: Tensor
    """``(3, S, S)`` normalised input."""
    kind: str = "predict"
    target: int | None = None
    """Class to explain (``explain`` jobs); None: the predicted one."""
    future: Future = field(default_factory=Future)


class Engine:
    """The workers of every base of a registry.

    Args:
        registry: the served tasks.
        max_batch: most images in one forward pass.
        batch_wait_s: how long a worker waits for more jobs after the first (0: only batch what
            is already queued, adding no latency).
        explain_method: :func:`shpeft.explain.explain`'s ``method`` for heat maps.
    """

    def __init__(
        self,
        registry: Registry,
        *,
        max_batch: int = 32,
        batch_wait_s: float = 0.0,
        explain_method: str = "grad-rollout",
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if batch_wait_s < 0:
            raise ValueError(f"batch_wait_s must be >= 0, got {batch_wait_s}")
        if registry.engine_open:
            raise RuntimeError("this registry is already served by an engine; close that first")
        registry.engine_open = True
        self.registry = registry
        self._workers = {
            b.key: _Worker(b, registry.device, max_batch, batch_wait_s, explain_method)
            for b in registry.bases
        }

    def predict(self, task: Task, x: Tensor) -> Future:
        """Queue ``x`` for ``task``; the future gives its ``(C,)`` float32 logits on the CPU."""
        return self._submit(Job(task, x))

    def explain(self, task: Task, x: Tensor, target: int | None = None) -> Future:
        """Queue a heat map of ``x`` for ``task``; the future gives a ``(rows, cols)`` map."""
        return self._submit(Job(task, x, "explain", target))

    def _submit(self, job: Job) -> Future:
        self._workers[job.task.base.key].submit(job)
        return job.future

    def stats(self) -> list[dict[str, Any]]:
        """Per base: its tasks and how many batches, images and delta switches it ran."""
        return [w.describe() for w in self._workers.values()]

    def close(self, timeout: float = 10.0) -> None:
        """Finish the queued jobs and stop the workers."""
        for w in self._workers.values():
            w.stop()
        for w in self._workers.values():
            w.thread.join(timeout)
        self.registry.engine_open = any(w.thread.is_alive() for w in self._workers.values())


class _Worker:
    def __init__(
        self,
        base: Base,
        device: torch.device,
        max_batch: int,
        wait_s: float,
        explain_method: str,
    ) -> None:
        self.base = base
        self.device = device
        self.max_batch = max_batch
        self.wait_s = wait_s
        self.explain_method = explain_method
        self.queue: queue.SimpleQueue = queue.SimpleQueue()
        self.closed = False
        self.broken: str | None = None
        self.counts = {"batches": 0, "images": 0, "switches": 0, "explanations": 0}
        self.thread = threading.Thread(
            target=self._loop, name=f"shpeft-serve-{base.key}", daemon=True
        )
        self.thread.start()

    def submit(self, job: Job) -> None:
        if self.closed:
            raise EngineClosed("the server is shutting down")
        if self.broken:
            raise EngineClosed(self.broken)
        self.queue.put(job)

    def stop(self) -> None:
        self.closed = True
        self.queue.put(_STOP)

    def describe(self) -> dict[str, Any]:
        c = self.counts
        return {
            "base": self.base.hash,
            "model": self.base.model_name,
            "tasks": list(self.base.tasks),
            **c,
            "mean_batch": c["images"] / c["batches"] if c["batches"] else None,
        }

    def _loop(self) -> None:
        while True:
            jobs = [self.queue.get()]
            jobs += self._drain()
            stop = any(j is _STOP for j in jobs)
            by_task: dict[str, list[Job]] = {}
            for j in jobs:
                if j is not _STOP:
                    by_task.setdefault(j.task.name, []).append(j)
            for group in by_task.values():
                self._run(group[0].task, group)
            if stop:
                return

    def _drain(self) -> list:
        """What is queued now, and what arrives within ``wait_s`` (bounded)."""
        out: list = []
        deadline = time.monotonic() + self.wait_s
        while len(out) < 4 * self.max_batch:
            left = deadline - time.monotonic()
            try:
                item = self.queue.get(timeout=left) if left > 0 else self.queue.get_nowait()
            except queue.Empty:
                break
            out.append(item)
            if item is _STOP:
                break
        return out

    def _run(self, task: Task, jobs: list[Job]) -> None:
        live = [j for j in jobs if j.future.set_running_or_notify_cancel()]
        if not live:
            return
        if self.broken:
            _fail(live, EngineClosed(self.broken))
            return
        handle = None
        try:
            if task.switch is not None:
                handle = task.switch.apply()
                self.counts["switches"] += 1
        except Exception as e:  # validated at load; anything here is a bug, kept to this task
            log.exception("applying the delta of task %s failed", task.name)
            _fail(live, e)
            return
        try:
            predict = [j for j in live if j.kind == "predict"]
            for chunk in _chunks(predict, self.max_batch):
                self._forward(task, chunk)
            for j in live:
                if j.kind == "explain":
                    self._explain(task, j)
        finally:
            if handle is not None:
                try:
                    task.switch.revert(handle)
                except Exception:  # the base is no longer the base: stop serving it
                    log.exception(
                        "restoring base %s after task %s failed", self.base.key, task.name
                    )
                    self.broken = f"the backbone of task {task.name!r} could not be restored"

    def _forward(self, task: Task, chunk: list[Job]) -> None:
        try:
            x = torch.stack([j.x for j in chunk]).to(self.device)  # (B, 3, S, S)
            with torch.inference_mode():
                logits = task.model(x).float().cpu()  # (B, C)
        except Exception as e:
            log.exception("a batch of task %s failed", task.name)
            _fail(chunk, e)
            return
        self.counts["batches"] += 1
        self.counts["images"] += len(chunk)
        for j, row in zip(chunk, logits, strict=True):
            j.future.set_result(row.clone())

    def _explain(self, task: Task, job: Job) -> None:
        try:
            target = None if job.target is None else [job.target]
            maps, _ = explain(
                task.model, job.x[None].to(self.device), method=self.explain_method, target=target
            )
        except Exception as e:
            log.exception("a heat map of task %s failed", task.name)
            job.future.set_exception(e)
            return
        self.counts["explanations"] += 1
        job.future.set_result(np.asarray(maps[0]))


def _chunks(jobs: list[Job], size: int) -> Iterator[list[Job]]:
    for i in range(0, len(jobs), size):
        yield jobs[i : i + size]


def _fail(jobs: list[Job], e: BaseException) -> None:
    for j in jobs:
        if not j.future.done():
            j.future.set_exception(e)

"""Bounded, keyed, resource-aware submission of tasks to a Dask cluster.

Tasks annotated with ``resources=`` bypass the scheduler's own queueing, so the client keeps its own
window of at most ``max_in_flight`` tasks (backpressure). Every task has an explicit key, so a
resubmission after a failure is a new task rather than the cached failure. A task lost with a dead
worker is retried by the scheduler (``distributed.scheduler.allowed-failures``); an exception raised
by the task itself is retried ``retries`` times, then reported to the caller.
"""

from __future__ import annotations

import collections
import pickle
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from distributed import Client, Future, as_completed


@dataclass
class Done:
    tag: Any
    ok: bool
    value: Any = None
    error: str = ""


@dataclass
class TaskWindow:
    client: Client
    max_in_flight: int = 8
    gpu: bool = False
    _queue: collections.deque = field(default_factory=collections.deque)
    _tags: dict = field(default_factory=dict)
    _ac: as_completed | None = None
    bytes_submitted: int = 0
    stopped: bool = False

    def add(self, tag: Any, key: str, fn: Callable, *args, gpu_task: bool = False, retries: int = 0,
            front: bool = False) -> None:
        """Queue a task (``front``: before the others); it is submitted when the window has room
        (after :meth:`stop`, nothing is queued any more)."""
        if self.stopped:
            return
        item = (tag, key, fn, args, gpu_task, retries)
        if front:
            self._queue.appendleft(item)
        else:
            self._queue.append(item)
        self._fill()

    def cancel(self, predicate: Callable[[Any], bool]) -> int:
        """Drop queued tasks and cancel running ones whose tag matches."""
        kept = collections.deque(t for t in self._queue if not predicate(t[0]))
        n = len(self._queue) - len(kept)
        self._queue = kept
        for fut, tag in list(self._tags.items()):
            if predicate(tag):
                fut.cancel()
                n += 1
        return n

    def stop(self) -> int:
        """Submit nothing more: drop the queued tasks (returned: how many); those submitted finish."""
        self.stopped = True
        n = len(self._queue)
        self._queue.clear()
        return n

    @property
    def in_flight(self) -> int:
        return len(self._tags)

    @property
    def pending(self) -> int:
        return len(self._queue) + len(self._tags)

    def _fill(self) -> None:
        while self._queue and len(self._tags) < self.max_in_flight:
            tag, key, fn, args, gpu_task, retries = self._queue.popleft()
            resources = {"GPU": 1} if (gpu_task and self.gpu) else None
            fut = self.client.submit(fn, *args, key=key, pure=False, retries=retries, resources=resources)
            self.bytes_submitted += len(pickle.dumps(args))
            self._tags[fut] = tag
            if self._ac is None:
                self._ac = as_completed([fut])
            else:
                self._ac.add(fut)

    def results(self, tick: float | None = None) -> Iterator[Done | None]:
        """Yield finished tasks (success or error) until nothing is queued or running.

        With ``tick`` (seconds), ``None`` is yielded whenever no task finished for that long, so the
        caller can look at the clock and the slide folder while long tasks run; the iteration then
        also goes on while the window is empty (the caller breaks out).
        """
        while self._tags or self._queue or tick is not None:
            self._fill()
            if not self._tags:
                if tick is None:
                    return
                time.sleep(tick)
                yield None
                continue
            if tick is not None:
                waited = 0.0
                while not self._ac.has_ready() and waited < tick:
                    time.sleep(0.05)
                    waited += 0.05
                if not self._ac.has_ready():
                    yield None
                    continue
            fut: Future = next(self._ac)
            tag = self._tags.pop(fut, None)
            if tag is None:  # cancelled earlier
                continue
            if fut.status == "finished":
                value = fut.result()
                fut.release()
                yield Done(tag, True, value)
            elif fut.status == "cancelled":
                continue
            else:
                exc = fut.exception()
                fut.release()
                yield Done(tag, False, error=_describe(exc))
            self._fill()


def _describe(exc: BaseException | None) -> str:
    if exc is None:
        return "unknown error"
    name = type(exc).__name__
    text = str(exc)
    if name == "KilledWorker":
        return f"a worker died repeatedly while processing this slide ({text})"
    return text if text else name

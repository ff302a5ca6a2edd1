"""Micro-batching: concurrent calls handed to one thread that serves them together.

A handler thread ``submit``s its prepared request and blocks; the batcher
thread takes what is queued (at most ``max_batch``), serves it with one call of
``serve`` and hands each caller its own result or exception. With the GIL, many
handler threads each running the model for one request cost more than one
thread running it for all of them: the towers and the ranker run once per batch
and faiss searches the batch's queries in one call.

Collecting: under load a batch is whatever queued while the previous batch was
served, topped up until the oldest queued request has waited ``wait_s``. When
the previous batch was a single request (no concurrency to speak of) the next
request is served at once, so a lone caller pays no batching delay.

A request whose deadline passed while it waited is dropped (its caller gets
``DeadlineExceeded``; the client has given up on it anyway) and not served.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

from prometheus_client import Counter, Histogram

from services.common.errors import DeadlineExceeded, Unavailable

log = logging.getLogger("coldstart.fusion.batcher")

BATCH_SIZE = Histogram(
    "coldstart_fusion_batch_size",
    "Requests served together by one batch.",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128),
)
BATCH_DROPPED = Counter(
    "coldstart_fusion_batch_dropped_total",
    "Requests dropped from a batch because their deadline had passed.",
)

T = TypeVar("T")
R = TypeVar("R")


class _Pending(Generic[T, R]):
    __slots__ = ("_done", "deadline", "enqueued", "error", "item", "result")

    def __init__(self, item: T, deadline: float | None) -> None:
        self.item = item
        self.deadline = deadline
        self.enqueued = time.monotonic()
        self.result: R | None = None
        self.error: BaseException | None = None
        self._done = threading.Lock()  # held until the result is in: cheaper than an Event
        self._done.acquire()

    def finish(self) -> None:
        self._done.release()

    def wait(self, timeout: float | None) -> bool:
        return self._done.acquire(timeout=-1 if timeout is None else max(timeout, 0.0))


class MicroBatcher(Generic[T, R]):
    """Serve concurrent ``submit`` calls in batches on one thread.

    ``serve(items)`` returns one entry per item, in order: its result, or an
    exception instance that is raised in that item's caller only. An exception
    raised by ``serve`` itself goes to every caller of the batch.
    """

    def __init__(
        self,
        serve: Callable[[Sequence[T]], Sequence[R | BaseException]],
        *,
        wait_s: float = 0.002,
        max_batch: int = 32,
        workers: int = 1,
        name: str = "fusion-batcher",
    ) -> None:
        if max_batch < 1 or workers < 1:
            raise ValueError("max_batch and workers must be >= 1")
        self._serve = serve
        self.wait_s = wait_s
        self.max_batch = max_batch
        self._queue: collections.deque[_Pending[T, R]] = collections.deque()
        self._cond = threading.Condition(threading.Lock())
        self._closed = False
        self._last_size = 0
        self._threads = [
            threading.Thread(target=self._loop, name=f"{name}-{n}", daemon=True)
            for n in range(workers)
        ]
        for thread in self._threads:
            thread.start()

    def submit(self, item: T, deadline: float | None = None) -> R:
        """Serve ``item`` in the next batch; ``deadline`` is a ``time.monotonic()`` value."""
        pending: _Pending[T, R] = _Pending(item, deadline)
        with self._cond:
            if self._closed:
                raise Unavailable("the service is shutting down")
            self._queue.append(pending)
            # Wake the batcher only when it sleeps on an empty queue or a batch is full;
            # while it collects it wakes by itself when the wait is over.
            if len(self._queue) == 1 or len(self._queue) >= self.max_batch:
                self._cond.notify()
        # Past the deadline nobody waits for the answer (gRPC has cancelled the call).
        timeout = None if deadline is None else deadline - time.monotonic()
        if not pending.wait(timeout):
            raise DeadlineExceeded("deadline exceeded while queued for a batch")
        if pending.error is not None:
            raise pending.error
        return pending.result  # type: ignore[return-value]

    def close(self, timeout_s: float = 10.0) -> None:
        """Serve what is queued, then stop the thread; later submits get UNAVAILABLE."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        for thread in self._threads:
            thread.join(timeout=timeout_s)

    # -- the batcher thread ----------------------------------------------------
    def _take(self) -> list[_Pending[T, R]] | None:
        with self._cond:
            while not self._queue:
                if self._closed:
                    return None
                self._cond.wait()
            if self._last_size > 1 and self.wait_s > 0:
                until = self._queue[0].enqueued + self.wait_s
                while len(self._queue) < self.max_batch and not self._closed:
                    left = until - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
            count = min(len(self._queue), self.max_batch)
            batch = [self._queue.popleft() for _ in range(count)]
            if self._queue:  # more than one batch waits: another worker can start on it
                self._cond.notify()
            return batch

    def _loop(self) -> None:
        while True:
            batch = self._take()
            if batch is None:
                return
            self._last_size = len(batch)
            now = time.monotonic()
            live: list[_Pending[T, R]] = []
            for pending in batch:
                if pending.deadline is not None and pending.deadline <= now:
                    pending.error = DeadlineExceeded("deadline exceeded while queued for a batch")
                    BATCH_DROPPED.inc()
                    pending.finish()
                else:
                    live.append(pending)
            if not live:
                continue
            BATCH_SIZE.observe(len(live))
            try:
                results = self._serve([p.item for p in live])
                if len(results) != len(live):
                    raise RuntimeError(f"batch of {len(live)} served {len(results)} results")
            except BaseException as exc:  # every caller of the batch gets it; the thread lives on
                log.exception("batch failed")
                for pending in live:
                    pending.error = exc
                    pending.finish()
                continue
            for pending, result in zip(live, results, strict=True):
                if isinstance(result, BaseException):
                    pending.error = result
                else:
                    pending.result = result
                pending.finish()

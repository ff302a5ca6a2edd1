"""Micro-batching: concurrent requests handed to worker threads that serve them together.

A handler thread queues its prepared request and blocks; a worker thread takes
what is queued, serves it with one call of ``serve`` and hands each caller its
own result or exception. With the GIL, many handler threads each running a
model for one request cost more than one thread running it for all of them
(fusion: the towers and the ranker run once per batch and faiss searches the
batch's queries in one call; encoder: one ONNX run per batch, and the session
is never entered from two threads when ``workers`` is 1).

Collecting: a batch is whatever queued while the previous batch was served,
topped up until the oldest queued request has waited ``wait_s`` or the batch
holds ``max_batch`` units. A request's units are its ``size`` (1 by default;
the encoder counts texts). The top-up applies only while requests come
together (the previous batch held several): a lone caller is never delayed.
The first request is always taken, so one larger than ``max_batch`` still runs.

A request whose deadline passed while it waited, or whose caller gave up, is
dropped (its caller gets ``DeadlineExceeded``) and never served. ``max_queued``
bounds the units waiting: beyond it ``submit`` raises ``ResourceExhausted``.

Service-specific metrics come in as ``BatcherMetrics`` hooks, so the names stay
``coldstart_<service>_*``; an unset hook costs nothing per request.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from services.common.errors import DeadlineExceeded, ResourceExhausted, Unavailable

log = logging.getLogger("coldstart.common.batcher")

T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class BatcherMetrics:
    """Where a batcher reports; each hook is optional."""

    # Requests served by one call of ``serve`` (dropped ones not counted).
    batch: Callable[[int], None] | None = None
    # A request not served: reason "deadline", "cancelled" or "queue_full".
    dropped: Callable[[str], None] | None = None
    # Seconds a served request waited in the queue.
    queue_wait: Callable[[float], None] | None = None
    # Units waiting now; called on every change (under the batcher's lock).
    queued: Callable[[int], None] | None = None


NO_METRICS = BatcherMetrics()


class Ticket(Generic[T, R]):
    """One queued request: the caller's handle on its answer."""

    __slots__ = ("_done", "cancelled", "deadline", "enqueued", "error", "item", "size", "value")

    def __init__(self, item: T, deadline: float | None, size: int) -> None:
        self.item = item
        self.deadline = deadline
        self.size = size
        self.enqueued = time.monotonic()
        self.value: R | None = None
        self.error: BaseException | None = None
        self.cancelled = False
        self._done = threading.Lock()  # held until the answer is in: cheaper than an Event
        self._done.acquire()

    def finish(self) -> None:
        self._done.release()

    def wait(self, timeout: float | None = None) -> bool:
        """True once answered; False if ``timeout`` seconds passed first."""
        if not self._done.acquire(timeout=-1 if timeout is None else max(timeout, 0.0)):
            return False
        self._done.release()  # stays "done" for a later wait
        return True

    def cancel(self) -> None:
        """The caller gave up: a worker that has not started on it drops it."""
        self.cancelled = True

    def result(self, timeout: float | None = None) -> R:
        """The answer, or the request's exception raised; TimeoutError if not answered in time."""
        if not self.wait(timeout):
            raise TimeoutError("the batcher did not answer in time")
        if self.error is not None:
            raise self.error
        return self.value  # type: ignore[return-value]


class MicroBatcher(Generic[T, R]):
    """Serve concurrent ``submit`` calls in batches on ``workers`` threads.

    ``serve(items)`` returns one entry per item, in order: its result, or an
    exception instance that is raised in that item's caller only. An exception
    raised by ``serve`` itself goes to every caller of the batch.

    ``close``: with ``drain_on_close`` what is queued is served first; without,
    the batch in progress finishes and what is still queued fails UNAVAILABLE
    (for a slow model, so that a shutdown does not wait for the whole queue).
    """

    def __init__(
        self,
        serve: Callable[[Sequence[T]], Sequence[R | BaseException]],
        *,
        wait_s: float = 0.002,
        max_batch: int = 32,
        workers: int = 1,
        max_queued: int | None = None,
        max_queued_setting: str = "max_queued",
        drain_on_close: bool = True,
        metrics: BatcherMetrics = NO_METRICS,
        name: str = "batcher",
    ) -> None:
        if max_batch < 1 or workers < 1:
            raise ValueError("max_batch and workers must be >= 1")
        self._serve = serve
        self.wait_s = wait_s
        self.max_batch = max_batch
        self.max_queued = max_queued
        self.max_queued_setting = max_queued_setting
        self.drain_on_close = drain_on_close
        self.metrics = metrics
        self.name = name
        self._queue: collections.deque[Ticket[T, R]] = collections.deque()
        self._queued = 0  # units in _queue
        self._cond = threading.Condition(threading.Lock())
        self._closed = False
        self._last_size = 0
        self._threads = [
            threading.Thread(target=self._loop, name=f"{name}-batcher-{n}", daemon=True)
            for n in range(workers)
        ]
        for thread in self._threads:
            thread.start()

    # -- callers ---------------------------------------------------------------
    def enqueue(self, item: T, deadline: float | None = None, size: int = 1) -> Ticket[T, R]:
        """Queue ``item`` (``size`` units) without waiting; ``deadline`` is a
        ``time.monotonic()`` value."""
        ticket: Ticket[T, R] = Ticket(item, deadline, size)
        with self._cond:
            if self._closed:
                raise Unavailable(f"{self.name} is shutting down")
            if self.max_queued is not None and self._queued + size > self.max_queued:
                if self.metrics.dropped is not None:
                    self.metrics.dropped("queue_full")
                raise ResourceExhausted(
                    f"{self.name} queue full ({self._queued} waiting, "
                    f"{self.max_queued_setting} {self.max_queued}); retry later"
                )
            self._queue.append(ticket)
            self._queued += size
            if self.metrics.queued is not None:
                self.metrics.queued(self._queued)
            # Wake a worker only when it sleeps on an empty queue or a batch is full;
            # while it collects it wakes by itself when the wait is over.
            if len(self._queue) == 1 or self._queued >= self.max_batch:
                self._cond.notify()
        return ticket

    def submit(self, item: T, deadline: float | None = None, size: int = 1) -> R:
        """Serve ``item`` in the next batch and return its result; DeadlineExceeded
        once ``deadline`` passes (the request is then never served)."""
        ticket = self.enqueue(item, deadline, size)
        # Past the deadline nobody waits for the answer (gRPC has cancelled the call).
        # The lock taken directly, not through wait(): nobody waits on this ticket again.
        timeout = -1.0 if deadline is None else max(deadline - time.monotonic(), 0.0)
        if not ticket._done.acquire(timeout=timeout):
            ticket.cancelled = True
            raise DeadlineExceeded(f"deadline exceeded while queued for the {self.name} batcher")
        if ticket.error is not None:
            raise ticket.error
        return ticket.value  # type: ignore[return-value]

    def close(self, timeout_s: float = 10.0) -> None:
        """Stop the workers (see the class); later submits get UNAVAILABLE."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        for thread in self._threads:
            thread.join(timeout=timeout_s)

    @property
    def queued(self) -> int:
        """Units waiting for a worker."""
        return self._queued

    # -- the worker threads ------------------------------------------------------
    def _set_queued(self, units: int) -> None:
        self._queued = units
        if self.metrics.queued is not None:
            self.metrics.queued(units)

    def _take(self) -> list[Ticket[T, R]] | None:
        """The next batch; None when the batcher is closed (after failing what is
        queued, unless it drains)."""
        failed: list[Ticket[T, R]] = []
        with self._cond:
            queue = self._queue
            while True:
                while not queue:
                    if self._closed:
                        return None
                    self._cond.wait()
                if self._last_size > 1 and self.wait_s > 0:
                    until = queue[0].enqueued + self.wait_s
                    while queue and self._queued < self.max_batch and not self._closed:
                        left = until - time.monotonic()
                        if left <= 0:
                            break
                        self._cond.wait(left)
                if self._closed and not self.drain_on_close:
                    failed = list(queue)
                    queue.clear()
                    self._set_queued(0)
                    break
                if not queue:  # another worker took what this one collected
                    continue
                first = queue.popleft()
                batch = [first]
                units = first.size
                max_batch = self.max_batch
                popleft, append = queue.popleft, batch.append
                while queue and units < max_batch:
                    ticket = popleft()
                    append(ticket)
                    units += ticket.size
                self._set_queued(self._queued - units)
                if queue:  # more than one batch waits: another worker can start on it
                    self._cond.notify()
                return batch
        for ticket in failed:
            ticket.error = Unavailable(f"{self.name} is shutting down")
            ticket.finish()
        return None

    def _loop(self) -> None:
        metrics = self.metrics
        while True:
            batch = self._take()
            if batch is None:
                return
            self._last_size = len(batch)
            now = time.monotonic()
            live: list[Ticket[T, R]] = []
            for ticket in batch:
                if ticket.cancelled or (ticket.deadline is not None and ticket.deadline <= now):
                    if metrics.dropped is not None:
                        metrics.dropped("cancelled" if ticket.cancelled else "deadline")
                    ticket.error = DeadlineExceeded(
                        f"deadline exceeded while queued for the {self.name} batcher"
                    )
                    ticket.finish()
                else:
                    if metrics.queue_wait is not None:
                        metrics.queue_wait(now - ticket.enqueued)
                    live.append(ticket)
            if not live:
                continue
            if metrics.batch is not None:
                metrics.batch(len(live))
            try:
                results = self._serve([t.item for t in live])
                if len(results) != len(live):
                    raise RuntimeError(f"batch of {len(live)} served {len(results)} results")
            except BaseException as exc:  # every caller of the batch gets it; the thread lives on
                log.exception("batch failed", extra={"batcher": self.name, "requests": len(live)})
                for ticket in live:
                    ticket.error = exc
                    ticket.finish()
                continue
            for ticket, result in zip(live, results, strict=True):
                if isinstance(result, BaseException):
                    ticket.error = result
                else:
                    ticket.value = result
                ticket.finish()

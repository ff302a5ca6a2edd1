"""Merges concurrent requests into model runs.

One worker thread owns the model (the ONNX session is never entered from two
threads). Callers put a request (its texts and an absolute deadline) on a
queue and wait on a future. The worker takes the first request, then keeps
taking requests until the run holds ``max_batch`` texts or the first request
has waited ``max_wait`` seconds; under load, requests pile up while a run is
in progress, so the next run fills without waiting at all. The wait applies
only while requests come together (the previous run merged several): a lone
caller is never delayed.

Before a run, requests whose deadline has passed (or whose caller gave up) are
dropped and answered DEADLINE_EXCEEDED, never computed. The texts of a run are
de-duplicated and handed to the model, which orders them by token length and
cuts them into ``max_batch`` chunks (see ``TextModel.embed``).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from services.common.errors import DeadlineExceeded, ResourceExhausted, Unavailable
from services.encoder import metrics

log = logging.getLogger("coldstart.encoder.batcher")


class TextModel(Protocol):
    """What the batcher runs: texts -> float32 (n, dimension), unit rows."""

    @property
    def dimension(self) -> int: ...

    def embed(self, texts: Sequence[str], batch_size: int) -> np.ndarray: ...


@dataclass
class _Request:
    texts: list[str]
    deadline: float | None
    enqueued: float
    future: Future[np.ndarray] = field(default_factory=Future)


_STOP = object()


class Batcher:
    def __init__(
        self,
        model: TextModel,
        *,
        max_batch: int = 32,
        max_wait_s: float = 0.002,
        max_queued_texts: int = 4096,
        batching: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.model = model
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.max_queued_texts = max_queued_texts
        self.batching = batching
        self.clock = clock
        self._queue: queue.Queue[object] = queue.Queue()
        self._lock = threading.Lock()
        self._queued_texts = 0
        self._closed = False
        self._last_run_requests = 0
        self._thread = threading.Thread(target=self._work, name="encoder-batcher", daemon=True)
        self._thread.start()

    # -- callers -------------------------------------------------------------
    def submit(self, texts: Sequence[str], deadline: float | None = None) -> Future[np.ndarray]:
        """Queue ``texts``; the future gives their vectors in order."""
        request = _Request(list(texts), deadline, self.clock())
        with self._lock:
            if self._closed:
                raise Unavailable("encoder is shutting down")
            if self._queued_texts + len(request.texts) > self.max_queued_texts:
                metrics.DROPPED.labels("queue_full").inc()
                raise ResourceExhausted(
                    f"encoder queue full ({self._queued_texts} texts waiting, "
                    f"max_queued_texts {self.max_queued_texts}); retry later"
                )
            self._queued_texts += len(request.texts)
            metrics.QUEUED_TEXTS.set(self._queued_texts)
            self._queue.put(request)
        return request.future

    def embed(self, texts: Sequence[str], deadline: float | None = None) -> np.ndarray:
        """Vectors for ``texts``; DeadlineExceeded if ``deadline`` passes first."""
        future = self.submit(texts, deadline)
        timeout = None if deadline is None else max(0.0, deadline - self.clock())
        try:
            return future.result(timeout=timeout)
        except FutureTimeout:
            # Not computed if still queued: the worker sees the cancellation.
            future.cancel()
            raise DeadlineExceeded("deadline exceeded while waiting for the encoder") from None

    def close(self, timeout: float = 10.0) -> None:
        """Finish the run in progress, fail what is still queued, stop the worker."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._queue.put(_STOP)
        self._thread.join(timeout)

    @property
    def queued_texts(self) -> int:
        return self._queued_texts

    # -- worker --------------------------------------------------------------
    def _take(self, request: _Request) -> None:
        with self._lock:
            self._queued_texts -= len(request.texts)
            metrics.QUEUED_TEXTS.set(self._queued_texts)

    def _work(self) -> None:
        stopping = False
        while not stopping:
            item = self._queue.get()
            if item is _STOP:
                break
            assert isinstance(item, _Request)
            self._take(item)
            batch = [item]
            size = len(item.texts)
            if self.batching:
                # Wait for company only while callers come together: a lone
                # caller (the last run served one request) is not delayed.
                wait = self.max_wait_s if self._last_run_requests > 1 else 0.0
                wait_until = item.enqueued + wait
                while size < self.max_batch:
                    remaining = wait_until - self.clock()
                    try:
                        if remaining > 0:
                            nxt = self._queue.get(timeout=remaining)
                        else:
                            nxt = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if nxt is _STOP:
                        stopping = True
                        break
                    assert isinstance(nxt, _Request)
                    self._take(nxt)
                    batch.append(nxt)
                    size += len(nxt.texts)
            self._last_run_requests = len(batch)
            if self._closed:
                for request in batch:
                    self._fail(request)
                break
            try:
                self._run(batch)
            except BaseException:  # pragma: no cover - _run answers every future itself
                log.exception("batcher run failed")
        self._fail_queued()

    @staticmethod
    def _fail(request: _Request) -> None:
        if request.future.set_running_or_notify_cancel():
            request.future.set_exception(Unavailable("encoder is shutting down"))

    def _fail_queued(self) -> None:
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            if isinstance(item, _Request):
                self._take(item)
                self._fail(item)

    def _run(self, batch: list[_Request]) -> None:
        now = self.clock()
        live: list[_Request] = []
        for request in batch:
            if not request.future.set_running_or_notify_cancel():
                metrics.DROPPED.labels("cancelled").inc()
            elif request.deadline is not None and request.deadline <= now:
                metrics.DROPPED.labels("deadline").inc()
                request.future.set_exception(
                    DeadlineExceeded("deadline exceeded while queued for the encoder")
                )
            else:
                metrics.QUEUE_WAIT.observe(now - request.enqueued)
                live.append(request)
        if not live:
            return
        # Each distinct text once; rows are scattered back to every request.
        index: dict[str, int] = {}
        for request in live:
            for text in request.texts:
                index.setdefault(text, len(index))
        unique = list(index)
        started = time.perf_counter()
        try:
            vectors = self.model.embed(unique, self.max_batch)
        except Exception as exc:
            log.exception("model run failed", extra={"texts": len(unique)})
            for request in live:
                request.future.set_exception(exc)
            return
        metrics.INFERENCE.observe(time.perf_counter() - started)
        metrics.BATCH_TEXTS.observe(len(unique))
        metrics.BATCH_REQUESTS.observe(len(live))
        metrics.TEXTS.inc(len(unique))
        for request in live:
            rows = [index[text] for text in request.texts]
            request.future.set_result(vectors[rows])

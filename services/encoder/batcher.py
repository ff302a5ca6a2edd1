"""The encoder's model runs behind the common micro-batcher (services/common/batcher.py).

One worker thread owns the model (the ONNX session is never entered from two
threads). A run takes requests until it holds ``max_batch`` texts or the first
request has waited ``max_wait`` seconds, and waits only while callers come
together (see the common batcher). What is encoder-specific lives here: a
request's size is its number of texts (``max_batch`` and ``max_queued_texts``
count texts), the texts of a run are de-duplicated and handed to the model,
which orders them by token length and cuts them into ``max_batch`` chunks (see
``TextModel.embed``), and the run reports the ``coldstart_encoder_*`` metrics.
On close the run in progress finishes and what is still queued fails
UNAVAILABLE: a shutdown does not wait for a long queue of model runs.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Protocol

import numpy as np

from services.common.batcher import BatcherMetrics, MicroBatcher, Ticket
from services.encoder import metrics


class TextModel(Protocol):
    """What the batcher runs: texts -> float32 (n, dimension), unit rows."""

    @property
    def dimension(self) -> int: ...

    def embed(self, texts: Sequence[str], batch_size: int) -> np.ndarray: ...


def _dropped(reason: str) -> None:
    metrics.DROPPED.labels(reason).inc()


BATCHER_METRICS = BatcherMetrics(
    batch=metrics.BATCH_REQUESTS.observe,
    dropped=_dropped,
    queue_wait=metrics.QUEUE_WAIT.observe,
    queued=metrics.QUEUED_TEXTS.set,
)


class Batcher:
    def __init__(
        self,
        model: TextModel,
        *,
        max_batch: int = 32,
        max_wait_s: float = 0.002,
        max_queued_texts: int = 4096,
        batching: bool = True,
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.model = model
        self.max_batch = max_batch
        self.batching = batching
        self._batcher: MicroBatcher[list[str], np.ndarray] = MicroBatcher(
            self._run,
            wait_s=max_wait_s,
            # Batching off: a run takes its first request only (a batch of 1 text is full).
            max_batch=max_batch if batching else 1,
            workers=1,
            max_queued=max_queued_texts,
            max_queued_setting="max_queued_texts",
            drain_on_close=False,
            metrics=BATCHER_METRICS,
            name="encoder",
        )

    def submit(
        self, texts: Sequence[str], deadline: float | None = None
    ) -> Ticket[list[str], np.ndarray]:
        """Queue ``texts``; the ticket's ``result()`` gives their vectors in order."""
        request = list(texts)
        return self._batcher.enqueue(request, deadline, len(request))

    def embed(self, texts: Sequence[str], deadline: float | None = None) -> np.ndarray:
        """Vectors for ``texts``; DeadlineExceeded if ``deadline`` (``time.monotonic()``)
        passes first, and then the texts are not computed."""
        request = list(texts)
        return self._batcher.submit(request, deadline, len(request))

    def close(self, timeout: float = 10.0) -> None:
        """Finish the run in progress, fail what is still queued, stop the worker."""
        self._batcher.close(timeout)

    @property
    def queued_texts(self) -> int:
        return self._batcher.queued

    def _run(self, requests: Sequence[list[str]]) -> list[np.ndarray]:
        # Each distinct text once; rows are scattered back to every request.
        index: dict[str, int] = {}
        for texts in requests:
            for text in texts:
                index.setdefault(text, len(index))
        unique = list(index)
        started = time.perf_counter()
        vectors = self.model.embed(unique, self.max_batch)
        metrics.INFERENCE.observe(time.perf_counter() - started)
        metrics.BATCH_TEXTS.observe(len(unique))
        metrics.TEXTS.inc(len(unique))
        return [vectors[[index[text] for text in texts]] for texts in requests]

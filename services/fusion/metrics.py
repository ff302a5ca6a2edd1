"""Fusion's micro-batcher metrics (the common batcher reports through these hooks)."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

from services.common.batcher import BatcherMetrics

BATCH_SIZE = Histogram(
    "coldstart_fusion_batch_size",
    "Requests served together by one batch.",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128),
)
BATCH_DROPPED = Counter(
    "coldstart_fusion_batch_dropped_total",
    "Requests dropped from a batch because their deadline had passed.",
)


def _dropped(_reason: str) -> None:
    # Fusion has no queue bound, so every reason is a passed deadline (the caller's
    # own timeout is the "cancelled" case).
    BATCH_DROPPED.inc()


BATCHER_METRICS = BatcherMetrics(batch=BATCH_SIZE.observe, dropped=_dropped)

"""Kafka consumers for the services that read the events topic (trainer, fusion).

One place for how a consumer is built (``consumer_options``, ``make_consumer``),
polled and watched (``ConsumerGuard``). The guard catches the two ways a
kafka-python consumer has been seen to stop making progress (3.0.12, under CPU
stress), logs each, has the owner count it, and leaves the replacement to the
owner (only the owner knows how to subscribe or assign and where to seek):

* **stalled**: ``poll`` never returns (its main thread waiting in
  ``Fetcher.send_fetches`` for an IO-thread task that never ran). The polling
  thread cannot see that itself, so the owner's watchdog asks ``silent_for``
  (fusion: a watchdog thread that abandons the stuck thread and starts a new
  consumer) or watches something equivalent (trainer: the log writer kills a
  consumer process whose pipe has been silent for ``STALLED_AFTER_S``);
* **not fetching**: polls return, empty, for ``NOT_FETCHING_AFTER_S`` while the
  assigned partitions have a backlog (lag > 0). ``ConsumerGuard.poll`` raises
  ``ConsumerStalled``; the owner closes the consumer and makes a new one.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

log = logging.getLogger("coldstart.kafka")

# Records per poll unless the owner says otherwise.
MAX_POLL_RECORDS = 2000
# The broker answers a fetch after at most this long: a poll with a short
# timeout then returns promptly on a quiet topic.
FETCH_MAX_WAIT_MS = 50
# Lag is recomputed at most this often (it needs the partitions' end offsets).
LAG_INTERVAL_S = 0.5
# The longest a lag check may hold up the poll loop (kafka-python's default is
# its request timeout, 30 s).
LAG_TIMEOUT_MS = 1000
# Empty polls for this long with a backlog: a consumer that no longer fetches.
NOT_FETCHING_AFTER_S = 20.0
# A poll loop not heard from for this long is stuck (a poll returns within its
# timeout, a rebalance gives up after its own).
STALLED_AFTER_S = 30.0


def consumer_options(
    *,
    client_id: str,
    max_poll_records: int = MAX_POLL_RECORDS,
    check_crcs: bool = True,
    group_instance_id: str = "",
    max_partition_fetch_bytes: int | None = None,
    fetch_max_wait_ms: int = FETCH_MAX_WAIT_MS,
) -> dict[str, Any]:
    """KafkaConsumer options besides bootstrap and group (``make_consumer``'s overrides)."""
    options: dict[str, Any] = {
        "client_id": client_id,
        "max_poll_records": max_poll_records,
        "check_crcs": check_crcs,
        "fetch_max_wait_ms": fetch_max_wait_ms,
    }
    if max_partition_fetch_bytes is not None:
        options["max_partition_fetch_bytes"] = max_partition_fetch_bytes
    if group_instance_id:
        options["group_instance_id"] = group_instance_id
    return options


def make_consumer(
    bootstrap: str, group_id: str | None, topics: Iterable[str] = (), **overrides: Any
) -> Any:
    """A KafkaConsumer whose offsets move only when the caller commits them.

    ``group_id=None``: no group; the caller ``assign()``s partitions itself.
    """
    from kafka import KafkaConsumer

    options: dict[str, Any] = {
        "bootstrap_servers": bootstrap,
        "group_id": group_id,
        "enable_auto_commit": False,
        "auto_offset_reset": "earliest",
        "max_poll_records": MAX_POLL_RECORDS,
        "fetch_max_wait_ms": FETCH_MAX_WAIT_MS,
    }
    options.update(overrides)
    consumer = KafkaConsumer(**options)
    topics = list(topics)
    if topics:
        # Fetch their metadata first: a group leader that does not know the
        # partitions yet assigns nothing until the next metadata refresh.
        for topic in topics:
            consumer.partitions_for_topic(topic)
        consumer.subscribe(topics)
    return consumer


def consumer_lag(consumer: Any) -> int | None:
    """Messages behind the end, summed over the assigned partitions.

    None when nothing is assigned or the broker did not answer within
    LAG_TIMEOUT_MS: the lag is a gauge, and waiting on it would stop
    consumption meanwhile.
    """
    from kafka.errors import KafkaError

    assigned = list(consumer.assignment())
    if not assigned:
        return None
    try:
        ends = consumer.end_offsets(assigned, timeout_ms=LAG_TIMEOUT_MS)
        lag = 0
        for tp in assigned:
            position = consumer.position(tp, timeout_ms=LAG_TIMEOUT_MS)
            if position is not None:
                lag += max(0, int(ends.get(tp, position)) - int(position))
    except KafkaError as exc:
        log.debug("consumer lag unknown", extra={"error": repr(exc)})
        return None
    return lag


def close_consumer(consumer: Any) -> None:
    """Close without committing (the owners keep their offsets elsewhere); never raises."""
    try:
        consumer.close(autocommit=False, timeout_ms=5000)
    except Exception as exc:
        log.warning("consumer close failed", extra={"error": repr(exc)})


class ConsumerStalled(RuntimeError):
    """The consumer stopped making progress; the owner replaces it."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class ConsumerGuard:
    """Polls one consumer at a time and tells when it stopped making progress.

    ``count(reason)`` is called once per stall found (``"stalled"`` or
    ``"not_fetching"``): the owner's metric, e.g.
    ``coldstart_<service>_consumer_restarts_total{reason}``. Call ``started``
    after making each new consumer. Times default to this module's constants,
    read when the guard is made (tests shorten them).
    """

    def __init__(
        self,
        name: str,
        count: Callable[[str], None],
        *,
        not_fetching_after_s: float | None = None,
        lag_interval_s: float | None = None,
    ) -> None:
        self.name = name
        self.count = count
        self.not_fetching_after_s = (
            NOT_FETCHING_AFTER_S if not_fetching_after_s is None else not_fetching_after_s
        )
        self.lag_interval_s = LAG_INTERVAL_S if lag_interval_s is None else lag_interval_s
        self.lag = -1  # last measured; -1: not known yet
        self.backlog = 0  # lag at the last check; 0 also when unknown (no backlog known)
        # perf_counter() of the first poll that returned records (CLOCK_MONOTONIC
        # on Linux: one clock for every process).
        self.first_records_at: float | None = None
        self._lag_checked = 0.0
        self.started()

    def started(self) -> None:
        """A new consumer: nothing fetched yet, and no backlog known."""
        now = time.monotonic()
        self.fetched_at = now  # last poll with records (or the consumer's start)
        self.progress_at = now  # last time the poll loop was seen moving
        self.backlog = 0
        self._lag_checked = 0.0

    def poll(self, consumer: Any, timeout_ms: int, max_records: int | None = None) -> Any:
        """``consumer.poll``; raises ConsumerStalled (logged, counted) when the
        polls have returned nothing for ``not_fetching_after_s`` with a backlog."""
        self.progress_at = time.monotonic()
        if max_records is None:
            batches = consumer.poll(timeout_ms=timeout_ms)
        else:
            batches = consumer.poll(timeout_ms=timeout_ms, max_records=max_records)
        now = self.progress_at = time.monotonic()
        if batches:
            self.fetched_at = now
            if self.first_records_at is None:
                self.first_records_at = time.perf_counter()
            return batches
        self.update_lag(consumer)
        idle = now - self.fetched_at
        if self.backlog > 0 and idle > self.not_fetching_after_s:
            raise self.stalled(
                "not_fetching", f"no records for {idle:.0f} s with a lag of {self.backlog}"
            )
        return batches

    def update_lag(self, consumer: Any) -> bool:
        """Measure the lag (at most every ``lag_interval_s``); True when it was measured."""
        now = time.monotonic()
        if now - self._lag_checked < self.lag_interval_s:
            return False
        self._lag_checked = now
        lag = consumer_lag(consumer)
        self.backlog = lag or 0
        if lag is None:
            return False
        self.lag = lag
        return True

    def progress(self) -> None:
        """The owner is busy with what the last poll returned: not a stall."""
        self.progress_at = time.monotonic()

    def silent_for(self) -> float:
        """Seconds since the poll loop last started or finished a poll."""
        return time.monotonic() - self.progress_at

    def stalled(self, reason: str, detail: str) -> ConsumerStalled:
        """Log and count a stall; the exception to raise (or to note) for it."""
        log.warning(
            "consumer stalled; replacing it",
            extra={"consumer": self.name, "reason": reason, "detail": detail},
        )
        self.count(reason)
        return ConsumerStalled(reason, detail)

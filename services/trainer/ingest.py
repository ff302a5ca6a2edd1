"""The consumer loop: events topic -> event log, bad messages -> dead-letter topic.

This is the in-process loop (``ingest_processes = 0``) and the pieces the
multi-process ingest shares (``columns_of``, ``split_columns``, the dead-letter
sink, commits); ``services.trainer.ingest_procs`` runs the same steps split
over consumer processes (poll, hand the raw records over) and one log writer
(decode, dead-letter, apply).

Order of effects for one poll batch (what makes a SIGKILL at any moment safe):

1. decode every record; the ones that cannot be applied are produced to the
   dead-letter topic and acknowledged by the broker (acks=all) first;
2. the good events, the erasures and the next offsets are written to the
   event log in ONE SQLite transaction;
3. only then the offsets are committed to Kafka.

A crash before 2 re-reads the batch (the dead-letter topic may see a message
twice; the log dedupes by event id anyway). A crash after 2 resumes from the
offsets in the log, because on every partition assignment the consumer seeks
to the log's offsets: the log, not Kafka's committed offsets, is the truth.
A write or dead-letter failure never kills the loop: the consumer seeks back
to the log's offsets, backs off and reads the batch again.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from coldstart.v1 import events_pb2
from google.protobuf.message import DecodeError

from services.common.events import (
    SUPPORTED_SCHEMA_VERSIONS,
    EventDecodeError,
    decode_event,
    make_consumer,
    make_producer,
)
from services.trainer import metrics
from services.trainer.event_log import ApplyResult, EventLog, EventLogError, Incoming, Row, row_of

log = logging.getLogger("coldstart.trainer.ingest")

# Back-off after a failed batch (log or dead-letter write), doubling up to the max.
BACKOFF_MIN_S = 0.2
BACKOFF_MAX_S = 5.0
# Lag is recomputed at most this often (it needs the partitions' end offsets).
LAG_INTERVAL_S = 0.5
# The longest a lag check may hold up the consume loop.
LAG_TIMEOUT_MS = 1000
# Polls that return nothing for this long while the partitions have a backlog
# (lag > 0) mean a consumer that no longer fetches (kafka-python 3.0.12 was seen
# to): it is closed, and a new one joins and seeks to the log (the path of any
# consumer error).
NOT_FETCHING_AFTER_S = 20.0
MAX_DETAIL_CHARS = 200


class NotFetching(RuntimeError):
    """The consumer returns nothing while its partitions have a backlog."""


def check_fetching(fetched_at: float, backlog: int) -> None:
    """Raise NotFetching after NOT_FETCHING_AFTER_S without records and a backlog.

    ``fetched_at``: monotonic time of the last poll with records (or of the
    consumer's start); ``backlog``: the lag at the last check (0: none known).
    """
    idle = time.monotonic() - fetched_at
    if backlog > 0 and idle > NOT_FETCHING_AFTER_S:
        raise NotFetching(f"no records for {idle:.0f} s with a lag of {backlog}")


def log_loop_error(exc: Exception) -> None:
    """Log an error a consume loop recovers from by replacing its consumer."""
    if isinstance(exc, NotFetching):  # expected recovery, not a bug: no traceback
        log.warning("consumer stopped fetching; replacing it", extra={"error": str(exc)})
    else:
        log.exception("consumer loop error; retrying", extra={"error": repr(exc)})


class RecordLike(Protocol):
    """What the loop needs of a kafka-python ConsumerRecord."""

    @property
    def partition(self) -> int: ...
    @property
    def offset(self) -> int: ...
    @property
    def key(self) -> bytes | None: ...
    @property
    def value(self) -> bytes | None: ...


@dataclass(frozen=True)
class DeadLetter:
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    reason: str
    detail: str


@dataclass(frozen=True)
class SplitBatch:
    rows: list[Row]
    dead: list[DeadLetter]
    # partition -> offset after the last record of the batch (dead letters included)
    next_offsets: dict[int, int]


# The records of one partition out of one poll, as columns: (partition,
# offsets, keys, values), offsets ascending. What a consumer process hands to
# the log writer: lists of ints and bytes pickle and unpickle in ~0.1 us per
# record, decoded rows (tuples of strings) in ~1 us.
Columns = tuple[int, list[int], list[bytes | None], list[bytes | None]]


def columns_of(batches: Mapping[Any, Sequence[RecordLike]]) -> list[Columns]:
    """A poll's result (``{TopicPartition: [record, ...]}``) as ``Columns``, by partition."""
    out: list[Columns] = []
    for tp in sorted(batches, key=lambda t: t.partition):
        records = batches[tp]
        if records:
            out.append(
                (
                    tp.partition,
                    [r.offset for r in records],
                    [r.key for r in records],
                    [r.value for r in records],
                )
            )
    return out


def split_batch(records: Iterable[RecordLike]) -> SplitBatch:
    """``split_columns`` for a sequence of records (in offset order per partition)."""
    by_partition: dict[int, Columns] = {}
    for r in records:
        columns = by_partition.get(r.partition)
        if columns is None:
            columns = by_partition[r.partition] = (r.partition, [], [], [])
        columns[1].append(r.offset)
        columns[2].append(r.key)
        columns[3].append(r.value)
    return split_columns(by_partition.values())


def split_columns(batch: Iterable[Columns]) -> SplitBatch:
    """Decode a poll's records into log rows and dead letters.

    The hot path (interactions, the bulk of the topic) parses each value once
    and builds its row (``row_of``'s columns) from the parsed message, checking
    what ``decode_event`` checks on the way; anything else goes through
    ``decode_event`` and ``row_of``, which name the reason of a bad message
    (or, should the two ever disagree, accept it).
    """
    rows: list[Row] = []
    dead: list[DeadLetter] = []
    next_offsets: dict[int, int] = {}
    append = rows.append
    parse = events_pb2.Event.FromString
    supported = SUPPORTED_SCHEMA_VERSIONS
    for partition, offsets, keys, values in batch:
        if not offsets:
            continue
        # Dead letters move the offset too: they are handled, never re-read.
        next_offsets[partition] = offsets[-1] + 1
        for offset, value, key in zip(offsets, values, keys, strict=True):
            if value:
                try:
                    event = parse(value)
                except DecodeError:
                    event = None
                if event is not None and event.schema_version in supported and event.event_id:
                    kind = event.WhichOneof("payload")
                    if kind == "interaction":
                        it = event.interaction
                        user, item = it.user_id, it.item_id
                        if user and item:
                            append((event.event_id, partition, offset, event.timestamp_ms,
                                    user, item, it.kind, it.value))  # fmt: skip
                            continue
            try:
                decoded = decode_event(value)
            except EventDecodeError as exc:
                detail = str(exc)[:MAX_DETAIL_CHARS]
                dead.append(DeadLetter(partition, offset, key, value, exc.reason, detail))
                continue
            assert value is not None  # decode_event refuses empty values
            append(row_of(Incoming(partition, offset, decoded, value)))
    return SplitBatch(rows, dead, next_offsets)


def note_dead_letters(topic: str, dead: Sequence[DeadLetter]) -> None:
    """Count and log letters the dead-letter topic has acknowledged."""
    for letter in dead:
        metrics.EVENTS_DEAD_LETTERED.labels(letter.reason).inc()
        log.warning(
            "event dead-lettered",
            extra={
                "topic": topic,
                "partition": letter.partition,
                "offset": letter.offset,
                "reason": letter.reason,
                "detail": letter.detail,
            },
        )


class DeadLetterSink(Protocol):
    def send(self, source_topic: str, letters: Sequence[DeadLetter]) -> None:
        """Return only once every letter is durable; raise otherwise."""


class KafkaDeadLetterSink:
    """Raw bytes to the dead-letter topic with headers naming reason and origin."""

    def __init__(self, bootstrap: str, topic: str, timeout_s: float = 10.0) -> None:
        self.bootstrap = bootstrap
        self.topic = topic
        self.timeout_s = timeout_s
        self._producer: Any = None

    def send(self, source_topic: str, letters: Sequence[DeadLetter]) -> None:
        if self._producer is None:
            self._producer = make_producer(self.bootstrap, client_id="coldstart-trainer-dlq")
        futures = [
            self._producer.send(
                self.topic,
                key=letter.key,
                value=letter.value or b"",
                headers=[
                    ("reason", letter.reason.encode()),
                    ("detail", letter.detail.encode(errors="replace")),
                    ("source_topic", source_topic.encode()),
                    ("source_partition", str(letter.partition).encode()),
                    ("source_offset", str(letter.offset).encode()),
                ],
            )
            for letter in letters
        ]
        self._producer.flush(timeout=self.timeout_s)
        for future in futures:
            future.get(timeout=self.timeout_s)

    def close(self) -> None:
        if self._producer is not None:
            self._producer.close(timeout=5)
            self._producer = None


@dataclass
class IngestStatus:
    running: bool = False
    consumer_lag: int = -1  # -1: not known yet (no assignment / broker not reached)
    last_error: str = ""
    batches: int = 0
    # perf_counter() of the first poll that returned records (any consumer
    # process: CLOCK_MONOTONIC on Linux is one clock for all of them)
    first_records_at: float | None = None


def consumer_options(
    max_poll_records: int, check_crcs: bool, group_instance_id: str, client_id: str
) -> dict[str, Any]:
    """The trainer's KafkaConsumer options (besides bootstrap and group)."""
    options: dict[str, Any] = {
        "client_id": client_id,
        "max_poll_records": max_poll_records,
        # A big batch is one transaction; the broker may give us more per fetch.
        "max_partition_fetch_bytes": 4 * 1024 * 1024,
        "check_crcs": check_crcs,
    }
    if group_instance_id:
        options["group_instance_id"] = group_instance_id
    return options


def commit_offsets(consumer: Any, topic: str, next_offsets: dict[int, int], *, sync: bool) -> bool:
    """Commit offsets to Kafka (only ever after they are durable in the log).

    True when a synchronous commit went through (the caller may forget them).

    Asynchronous while running (no round trip per batch): the log, not Kafka,
    decides where consumption resumes. Synchronous on the way out.
    """
    from kafka import TopicPartition
    from kafka.errors import KafkaError
    from kafka.structs import OffsetAndMetadata

    offsets = {
        TopicPartition(topic, p): OffsetAndMetadata(o, "", -1) for p, o in next_offsets.items()
    }
    try:
        if sync:
            consumer.commit(offsets)
        else:
            consumer.commit_async(offsets)
    except KafkaError as exc:
        # Harmless: the log holds the offsets; a rebalance seeks to them.
        log.warning("offset commit to Kafka failed", extra={"error": repr(exc)})
        return False
    return sync


def consumer_lag(consumer: Any) -> int | None:
    """Messages behind the end, summed over the assigned partitions.

    None when nothing is assigned or the broker did not answer within
    LAG_TIMEOUT_MS: the lag is a gauge, and waiting on it (kafka-python's
    default is its request timeout, 30 s) would stop consumption meanwhile.
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


class Ingestor:
    """Runs the ingest until ``stop``: with ``processes = 0`` one thread polls,
    decodes and writes; with ``processes = N`` N consumer processes poll and
    decode, and a writer thread here applies their batches
    (``services.trainer.ingest_procs``)."""

    def __init__(
        self,
        event_log: EventLog,
        *,
        bootstrap: str,
        topic: str,
        group_id: str,
        dead_letters: DeadLetterSink,
        group_instance_id: str = "",
        check_crcs: bool = True,
        max_poll_records: int = 5000,
        on_applied: Callable[[ApplyResult], None] | None = None,
        consumer_factory: Callable[[], Any] | None = None,
        processes: int = 0,
    ) -> None:
        self.log = event_log
        self.bootstrap = bootstrap
        self.topic = topic
        self.group_id = group_id
        self.group_instance_id = group_instance_id
        self.check_crcs = check_crcs
        self.dead_letters = dead_letters
        self.max_poll_records = max_poll_records
        self.on_applied = on_applied
        self.consumer_factory = consumer_factory or self._default_consumer
        if processes < 0:
            raise ValueError(f"processes must be >= 0, got {processes}")
        if processes and consumer_factory is not None:
            raise ValueError("consumer_factory is for the in-process loop (processes=0)")
        self.processes = processes
        self.status = IngestStatus()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lag_checked = 0.0
        self._fetched_at = time.monotonic()  # last poll with records (or consumer start)
        self._backlog = 0  # records behind the end at the last lag check (0: none known)
        # Every partition's next offset as last applied: each commit sends them
        # all, and the synchronous one on the way out clears them.
        self._uncommitted: dict[int, int] = {}

    def _default_consumer(self) -> Any:
        options = consumer_options(
            self.max_poll_records, self.check_crcs, self.group_instance_id, "coldstart-trainer"
        )
        return make_consumer(self.bootstrap, self.group_id, **options)

    # -- lifecycle --------------------------------------------------------
    def start(self) -> None:
        target: Callable[[], None] = self._run
        if self.processes:
            from services.trainer.ingest_procs import ProcessIngest

            writer = ProcessIngest(self, self.processes)

            def target() -> None:
                writer.run(self._stop)

        self._thread = threading.Thread(target=target, name="trainer-ingest", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 15.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=timeout_s)

    # -- the loop ---------------------------------------------------------
    def _run(self) -> None:
        self.status.running = True
        backoff = BACKOFF_MIN_S
        consumer: Any = None
        try:
            while not self._stop.is_set():
                try:
                    if consumer is None:
                        consumer = self.consumer_factory()
                        self._fetched_at = time.monotonic()
                        self._subscribe(consumer)
                    self.poll_once(consumer)
                    backoff = BACKOFF_MIN_S
                except _BatchFailed as exc:
                    self.status.last_error = str(exc)
                    if not self._rewind(consumer):
                        # The next turn rebuilds the consumer, which seeks on assignment.
                        self._close(consumer)
                        consumer = None
                    self._stop.wait(backoff)
                    backoff = min(backoff * 2, BACKOFF_MAX_S)
                except Exception as exc:  # never a crash loop: log, back off, go on
                    log_loop_error(exc)
                    self.status.last_error = repr(exc)
                    if consumer is not None:
                        self._close(consumer)
                        consumer = None
                    self._stop.wait(backoff)
                    backoff = min(backoff * 2, BACKOFF_MAX_S)
        finally:
            if consumer is not None:
                self._commit_uncommitted(consumer)
                self._close(consumer)
            self.status.running = False

    def _subscribe(self, consumer: Any) -> None:
        from kafka import ConsumerRebalanceListener

        event_log, topic = self.log, self.topic

        class SeekToLog(ConsumerRebalanceListener):
            """Resume every assigned partition where the event log says."""

            def on_partitions_revoked(self, revoked: Any) -> None:
                # Nothing to hand back: every polled batch is in the log before
                # the next poll. (kafka-python 3.x may run this on its IO thread
                # while a batch is being applied; the seek below then re-reads
                # that batch, and the log counts its events as duplicates.)
                pass

            def on_partitions_assigned(self, assigned: Any) -> None:
                stored = event_log.stored_offsets(topic)
                for tp in assigned:
                    if tp.partition in stored:
                        consumer.seek(tp, stored[tp.partition])
                    else:
                        # Nothing of this partition is in the log: read it all,
                        # whatever Kafka's committed offset says.
                        consumer.seek_to_beginning(tp)
                log.info(
                    "partitions assigned",
                    extra={"partitions": sorted(tp.partition for tp in assigned)},
                )

        # Know the topic's partitions before joining: a group leader without them
        # assigns nothing, and kafka-python may not rejoin until the next
        # metadata refresh (minutes) -- seen as an empty assignment in the bench.
        consumer.partitions_for_topic(self.topic)
        consumer.subscribe([self.topic], listener=SeekToLog())

    def poll_once(self, consumer: Any) -> ApplyResult | None:
        """Poll, dead-letter, apply to the log, then commit: one batch, in order;
        None when the poll was empty.

        No writer thread: a second thread writing while this one decodes made
        the loop slower, not faster (16-27k vs 36k events/s in
        `coldstart bench ingest`). SQLite's executemany releases the GIL for
        every row and must win it back from the busy consumer thread each time.
        """
        batches = consumer.poll(timeout_ms=200, max_records=self.max_poll_records)
        if not batches:
            self._update_lag(consumer)
            check_fetching(self._fetched_at, self._backlog)
            return None
        self._fetched_at = time.monotonic()
        if self.status.first_records_at is None:
            self.status.first_records_at = time.perf_counter()
        split = split_columns(columns_of(batches))
        if split.dead:
            self._dead_letter(split.dead)
        started = time.perf_counter()
        try:
            result = self.log.apply_rows(
                self.topic, split.rows, split.next_offsets, dead_lettered=len(split.dead)
            )
        except EventLogError as exc:
            metrics.LOG_WRITE_FAILURES.inc()
            log.error("event log write failed; batch will be re-read", extra={"error": str(exc)})
            raise _BatchFailed(str(exc)) from exc
        metrics.APPLY_BATCH_SECONDS.observe(time.perf_counter() - started)
        self._commit(consumer, split.next_offsets, sync=False)
        self._update_lag(consumer)
        self._count(result)
        return result

    def _dead_letter(self, dead: list[DeadLetter]) -> None:
        try:
            self.dead_letters.send(self.topic, dead)
        except Exception as exc:
            raise _BatchFailed(f"dead-letter topic unavailable: {exc!r}") from exc
        note_dead_letters(self.topic, dead)

    def _count(self, result: ApplyResult) -> None:
        metrics.EVENTS_APPLIED.inc(result.applied)
        metrics.EVENTS_DUPLICATE.inc(result.duplicates)
        metrics.EVENTS_DROPPED_FORGOTTEN.inc(result.dropped_forgotten)
        metrics.USERS_FORGOTTEN.inc(result.forgotten_users)
        if result.erased:
            log.info("users forgotten", extra={"count": len(result.erased)})
        self.status.batches += 1
        self.status.last_error = ""
        if self.on_applied is not None:
            self.on_applied(result)

    def _commit_uncommitted(self, consumer: Any) -> None:
        if self._uncommitted:
            self._commit(consumer, self._uncommitted, sync=True)

    def _commit(self, consumer: Any, next_offsets: dict[int, int], *, sync: bool) -> None:
        self._uncommitted.update(next_offsets)
        if commit_offsets(consumer, self.topic, self._uncommitted, sync=sync):
            self._uncommitted.clear()

    def _rewind(self, consumer: Any) -> bool:
        """Seek assigned partitions back to the log's offsets (re-read a failed batch)."""
        try:
            stored = self.log.stored_offsets(self.topic)
            for tp in consumer.assignment():
                if tp.partition in stored:
                    consumer.seek(tp, stored[tp.partition])
                else:
                    consumer.seek_to_beginning(tp)
        except Exception as exc:
            log.warning("rewind failed", extra={"error": repr(exc)})
            return False
        return True

    def _update_lag(self, consumer: Any) -> None:
        now = time.monotonic()
        if now - self._lag_checked < LAG_INTERVAL_S:
            return
        self._lag_checked = now
        lag = consumer_lag(consumer)
        self._backlog = lag or 0
        if lag is None:
            return
        self.status.consumer_lag = lag
        metrics.CONSUMER_LAG.set(lag)

    def _close(self, consumer: Any) -> None:
        try:
            consumer.close(autocommit=False, timeout_ms=5000)
        except Exception as exc:
            log.warning("consumer close failed", extra={"error": repr(exc)})


class _BatchFailed(RuntimeError):
    """A batch could not be made durable; it will be re-read after a back-off."""

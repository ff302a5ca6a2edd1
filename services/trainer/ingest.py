"""Batch decoding, dead letters and the ``Ingestor`` of the trainer's ingest.

The consume loop -- the one implementation of "exactly once into the log" --
is ``services.trainer.ingest_procs``: consumer processes poll and hand the raw
records over, one log writer in the service process decodes them
(``columns_of`` -> ``split_columns``, here), dead-letters the bad ones
(``KafkaDeadLetterSink``, here) and applies each batch with its offsets in one
transaction. Its module docstring says why that is exactly-once.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from coldstart.v1 import events_pb2
from google.protobuf.message import DecodeError

from services.common.events import (
    SUPPORTED_SCHEMA_VERSIONS,
    EventDecodeError,
    decode_event,
    make_producer,
)
from services.trainer import metrics
from services.trainer.event_log import ApplyResult, EventLog, Incoming, Row, row_of

log = logging.getLogger("coldstart.trainer.ingest")

MAX_DETAIL_CHARS = 200


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


class Ingestor:
    """Runs the ingest until ``stop``: ``processes`` consumer processes poll and
    hand their batches to a log writer thread here
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
        processes: int = 1,
    ) -> None:
        if processes < 1:
            raise ValueError(f"processes must be >= 1, got {processes}")
        self.log = event_log
        self.bootstrap = bootstrap
        self.topic = topic
        self.group_id = group_id
        self.group_instance_id = group_instance_id
        self.check_crcs = check_crcs
        self.dead_letters = dead_letters
        self.max_poll_records = max_poll_records
        self.on_applied = on_applied
        self.processes = processes
        self.status = IngestStatus()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        from services.trainer.ingest_procs import ProcessIngest

        writer = ProcessIngest(self, self.processes)
        self._thread = threading.Thread(
            target=writer.run, args=(self._stop,), name="trainer-ingest", daemon=True
        )
        self._thread.start()

    def stop(self, timeout_s: float = 15.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=timeout_s)

    def count(self, result: ApplyResult) -> None:
        """Metrics, status and the ``on_applied`` hook for a batch the log holds."""
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

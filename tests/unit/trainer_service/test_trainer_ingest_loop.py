"""The consumer loop's batch handling, with a fake consumer and dead-letter sink."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from coldstart.v1 import events_pb2
from kafka import TopicPartition

from services.common.events import encode_event, new_event
from services.trainer import metrics
from services.trainer.event_log import EventLog, EventLogError
from services.trainer.ingest import (
    LAG_TIMEOUT_MS,
    DeadLetter,
    Ingestor,
    _BatchFailed,
    columns_of,
    consumer_lag,
    split_batch,
    split_columns,
)

TOPIC = "events"


@dataclass(frozen=True)
class Record:
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None


def good(i: int) -> bytes:
    # A fixed time: two calls with the same i must give the same bytes.
    return encode_event(
        new_event(
            "test",
            event_id=f"e{i}",
            timestamp_ms=1_700_000_000_000 + i,
            interaction=events_pb2.Interaction(user_id="u", item_id=f"i{i}", kind="view", value=1),
        )
    )


def bad_payloads() -> dict[str, bytes | None]:
    future = new_event("test", user_forgotten=events_pb2.UserForgotten(user_id="u"))
    future.schema_version = 99
    no_id = new_event("test", user_forgotten=events_pb2.UserForgotten(user_id="u"))
    no_id.event_id = ""
    no_item = new_event("test", interaction=events_pb2.Interaction(user_id="u"))
    return {
        "empty": None,
        "unparseable": b"\xff\xff\xff not protobuf",
        "unknown_schema_version": encode_event(future),
        "missing_field": encode_event(no_id),
        "missing_item": encode_event(no_item),
    }


def test_split_batch_sorts_good_from_bad_and_keeps_every_offset() -> None:
    bad = bad_payloads()
    records = [
        Record(0, 10, b"u", good(1)),
        *[Record(0, 11 + k, b"k", v) for k, v in enumerate(bad.values())],
        Record(1, 3, b"u", good(2)),
    ]
    split = split_batch(records)
    assert [(row[1], row[2], row[0]) for row in split.rows] == [
        (0, 10, "e1"),
        (1, 3, "e2"),
    ]
    assert [d.reason for d in split.dead] == [
        "empty",
        "unparseable",
        "unknown_schema_version",
        "missing_field",
        "missing_field",
    ]
    assert [d.offset for d in split.dead] == [11, 12, 13, 14, 15]
    assert "interaction.item_id" in split.dead[-1].detail
    assert split.dead[1].value == bad["unparseable"]
    # Dead letters move the offset too: they are handled, never re-read.
    assert split.next_offsets == {0: 16, 1: 4}


def test_split_batch_rows_are_row_of_the_decoded_event_for_every_kind() -> None:
    """The hot path (interactions) builds the same rows as decode_event + row_of."""
    from services.common.events import decode_event
    from services.trainer.event_log import Incoming, row_of

    events = [
        new_event(
            "t", interaction=events_pb2.Interaction(user_id="u", item_id="i", kind="buy", value=2.5)
        ),
        new_event("t", interaction=events_pb2.Interaction(user_id="u", item_id="i")),
        new_event("t", user_registered=events_pb2.UserRegistered(user_id="u", interest_text="x")),
        new_event("t", item_upserted=events_pb2.ItemUpserted(item_id="i", text="t")),
        new_event("t", user_forgotten=events_pb2.UserForgotten(user_id="u")),
    ]
    records = [Record(3, 7 + k, b"k", encode_event(e)) for k, e in enumerate(events)]
    split = split_batch(records)
    assert split.dead == []
    assert split.rows == [
        row_of(Incoming(r.partition, r.offset, decode_event(r.value), r.value or b""))
        for r in records
    ]


def test_columns_of_a_poll_decode_like_its_records() -> None:
    """What a consumer process hands over (``columns_of``: offsets, keys and
    values per partition, partitions in order) decodes, in the writer, to the
    rows and dead letters of the records themselves, keys kept."""
    polled = {
        TopicPartition(TOPIC, 2): [Record(2, 5, b"u", good(3)), Record(2, 6, b"x", b"junk")],
        TopicPartition(TOPIC, 0): [Record(0, 10, b"u", good(1)), Record(0, 11, None, None)],
        TopicPartition(TOPIC, 1): [],
    }
    columns = columns_of(polled)
    assert columns == [
        (0, [10, 11], [b"u", None], [good(1), None]),
        (2, [5, 6], [b"u", b"x"], [good(3), b"junk"]),
    ]
    split = split_columns(columns)
    assert split == split_batch([r for tp in sorted(polled) for r in polled[tp]])
    assert [(row[1], row[2]) for row in split.rows] == [(0, 10), (2, 5)]
    assert [(d.partition, d.offset, d.key, d.reason) for d in split.dead] == [
        (0, 11, None, "empty"),
        (2, 6, b"x", "unparseable"),
    ]
    assert split.next_offsets == {0: 12, 2: 7}


class FakeConsumer:
    def __init__(self, batches: list[list[Record]]) -> None:
        self.batches = batches
        self.commits: list[dict[int, int]] = []
        self.seeks: list[tuple[int, int]] = []

    def partitions_for_topic(self, topic: str) -> set[int]:
        return {0, 1}

    def poll(self, timeout_ms: int, max_records: int) -> dict[TopicPartition, list[Record]]:
        if not self.batches:
            return {}
        out: dict[TopicPartition, list[Record]] = {}
        for record in self.batches.pop(0):
            out.setdefault(TopicPartition(TOPIC, record.partition), []).append(record)
        return out

    def commit(self, offsets: dict[TopicPartition, Any]) -> None:
        self.commits.append({tp.partition: meta.offset for tp, meta in offsets.items()})

    commit_async = commit

    def assignment(self) -> set[TopicPartition]:
        return {TopicPartition(TOPIC, 0), TopicPartition(TOPIC, 1)}

    def seek(self, tp: TopicPartition, offset: int) -> None:
        self.seeks.append((tp.partition, offset))

    def seek_to_beginning(self, tp: TopicPartition) -> None:
        self.seeks.append((tp.partition, 0))

    def end_offsets(
        self, tps: list[TopicPartition], timeout_ms: int | None = None
    ) -> dict[TopicPartition, int]:
        return dict.fromkeys(tps, 100)

    def position(self, tp: TopicPartition, timeout_ms: int) -> int:
        return 40


class Sink:
    def __init__(self, log: EventLog, fail: bool = False) -> None:
        self.log = log
        self.fail = fail
        self.sent: list[DeadLetter] = []
        self.log_count_at_send: list[int] = []

    def send(self, source_topic: str, letters: Sequence[DeadLetter]) -> None:
        self.log_count_at_send.append(self.log.counters()["dead_lettered"])
        if self.fail:
            raise RuntimeError("broker down")
        self.sent.extend(letters)


def make(tmp_path: Path, batches: list[list[Record]], fail_sink: bool = False) -> Any:
    log = EventLog(tmp_path / "log.sqlite")
    sink = Sink(log, fail=fail_sink)
    consumer = FakeConsumer(batches)
    ingestor = Ingestor(log, bootstrap="unused", topic=TOPIC, group_id="g", dead_letters=sink)
    return log, sink, consumer, ingestor


def test_a_batch_is_dead_lettered_then_applied_then_committed(tmp_path: Path) -> None:
    batch = [Record(0, 0, b"u", good(1)), Record(0, 1, b"k", b"junk"), Record(1, 0, b"u", good(2))]
    log, sink, consumer, ingestor = make(tmp_path, [batch])
    counted = metrics.EVENTS_DEAD_LETTERED.labels("unparseable")._value.get()
    result = ingestor.poll_once(consumer)
    assert result is not None and result.applied == 2
    # The dead letter was durable before the log recorded its offset as handled.
    assert [d.offset for d in sink.sent] == [1]
    assert sink.log_count_at_send == [0]
    assert log.counters()["dead_lettered"] == 1
    assert log.stored_offsets(TOPIC) == {0: 2, 1: 1}
    assert consumer.commits == [{0: 2, 1: 1}]
    assert metrics.EVENTS_DEAD_LETTERED.labels("unparseable")._value.get() == counted + 1
    assert ingestor.status.consumer_lag == 2 * (100 - 40)
    assert ingestor.poll_once(consumer) is None


def test_dead_letter_failure_applies_and_commits_nothing(tmp_path: Path) -> None:
    batch = [Record(0, 0, b"u", good(1)), Record(0, 1, b"k", b"junk")]
    log, _sink, consumer, ingestor = make(tmp_path, [batch], fail_sink=True)
    with pytest.raises(_BatchFailed, match="dead-letter"):
        ingestor.poll_once(consumer)
    assert log.event_count() == 0
    assert log.stored_offsets(TOPIC) == {}
    assert consumer.commits == []
    # The loop's recovery: seek every assigned partition back to the log's offsets.
    assert ingestor._rewind(consumer)
    assert sorted(consumer.seeks) == [(0, 0), (1, 0)]


def test_log_write_failure_commits_nothing(tmp_path: Path) -> None:
    log, _sink, consumer, ingestor = make(tmp_path, [[Record(0, 5, b"u", good(1))]])
    log.apply(TOPIC, [], {0: 5})
    log._conn.execute("PRAGMA query_only = ON")  # every write now fails
    failures = metrics.LOG_WRITE_FAILURES._value.get()
    with pytest.raises(_BatchFailed):
        ingestor.poll_once(consumer)
    assert consumer.commits == []
    assert metrics.LOG_WRITE_FAILURES._value.get() == failures + 1
    assert ingestor._rewind(consumer)
    assert sorted(consumer.seeks) == [(0, 5), (1, 0)]


def test_the_loop_survives_failures_and_keeps_consuming(tmp_path: Path) -> None:
    """A consumer that raises, then a failing batch, then good ones: the thread goes on."""
    log = EventLog(tmp_path / "log.sqlite")
    calls = {"n": 0}
    good_consumer = FakeConsumer([[Record(0, 0, b"u", good(1))], [Record(0, 1, b"u", good(2))]])

    def factory() -> Any:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("no brokers available")
        good_consumer.subscribe = lambda topics, listener: None  # type: ignore[attr-defined]
        good_consumer.close = lambda autocommit, timeout_ms: None  # type: ignore[attr-defined]
        return good_consumer

    ingestor = Ingestor(
        log,
        bootstrap="unused",
        topic=TOPIC,
        group_id="g",
        dead_letters=Sink(log),
        consumer_factory=factory,
    )
    import services.trainer.ingest as ingest_module

    original = ingest_module.BACKOFF_MIN_S
    ingest_module.BACKOFF_MIN_S = 0.01
    try:
        ingestor.start()
        import time

        deadline = time.monotonic() + 10
        while log.event_count() < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        ingestor.stop()
        ingest_module.BACKOFF_MIN_S = original
    assert log.event_count() == 2
    assert calls["n"] == 2
    assert not ingestor.status.running


def test_a_failed_write_keeps_the_batches_before_it_and_rereads_from_there(
    tmp_path: Path,
) -> None:
    """Batch 1 lands and is committed; batch 2's write fails: nothing of it lands,
    no commit covers it, the rewind goes back to the log's offsets and the
    re-read applies it and the rest."""
    batches = [[Record(0, i, b"u", good(i))] for i in range(3)]
    log, _sink, consumer, ingestor = make(tmp_path, batches)
    real_apply = log.apply_rows
    calls = {"n": 0}

    def flaky(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 2:
            raise EventLogError("database or disk is full")
        return real_apply(*args, **kwargs)

    log.apply_rows = flaky
    assert ingestor.poll_once(consumer) is not None
    with pytest.raises(_BatchFailed):
        ingestor.poll_once(consumer)
    assert log.event_count() == 1
    assert log.stored_offsets(TOPIC) == {0: 1}
    assert consumer.commits == [{0: 1}]
    assert ingestor._rewind(consumer)
    assert (0, 1) in consumer.seeks
    consumer.batches = [[Record(0, 1, b"u", good(1))], [Record(0, 2, b"u", good(2))]]
    assert ingestor.poll_once(consumer) is not None
    assert ingestor.poll_once(consumer) is not None
    assert log.event_count() == 3
    ingestor.stop()


class SlowBroker:
    """A consumer whose broker does not answer offset requests in time."""

    def __init__(self) -> None:
        self.timeouts: list[int | None] = []

    def assignment(self) -> set[TopicPartition]:
        return {TopicPartition(TOPIC, 0)}

    def end_offsets(
        self, tps: list[TopicPartition], timeout_ms: int | None = None
    ) -> dict[TopicPartition, int]:
        from kafka.errors import KafkaTimeoutError

        self.timeouts.append(timeout_ms)
        raise KafkaTimeoutError("offsets not answered")


def test_the_lag_check_gives_up_quickly_and_does_not_stop_consumption() -> None:
    # Without a timeout kafka-python waits its whole request timeout (30 s),
    # and the consume loop with it; an error here would restart the consumer.
    broker = SlowBroker()
    assert consumer_lag(broker) is None
    assert broker.timeouts == [LAG_TIMEOUT_MS]
    assert LAG_TIMEOUT_MS <= 2000


def test_the_in_process_loop_replaces_a_consumer_that_stops_fetching(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first consumer returns one batch, then nothing while its lag says 60
    records wait; the loop closes it and the next one reads on."""
    import services.trainer.ingest as ingest_module

    monkeypatch.setattr(ingest_module, "NOT_FETCHING_AFTER_S", 0.2)
    monkeypatch.setattr(ingest_module, "LAG_INTERVAL_S", 0.01)
    monkeypatch.setattr(ingest_module, "BACKOFF_MIN_S", 0.01)
    log = EventLog(tmp_path / "log.sqlite")
    stuck = FakeConsumer([[Record(0, 0, b"u", good(1))]])
    fresh = FakeConsumer([[Record(0, 1, b"u", good(2))]])
    made: list[FakeConsumer] = []
    closed: list[FakeConsumer] = []

    def factory() -> Any:
        consumer = [stuck, fresh][len(made)]
        made.append(consumer)
        consumer.subscribe = lambda topics, listener: None  # type: ignore[attr-defined]
        consumer.close = lambda autocommit, timeout_ms: closed.append(consumer)  # type: ignore[attr-defined]
        return consumer

    ingestor = Ingestor(
        log, bootstrap="unused", topic=TOPIC, group_id="g", dead_letters=Sink(log),
        consumer_factory=factory,
    )  # fmt: skip
    ingestor.start()
    try:
        deadline = time.monotonic() + 10
        while log.event_count() < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        ingestor.stop()
    assert log.event_count() == 2
    assert made == [stuck, fresh] and closed[0] is stuck

"""The shared consumer helper: options, the lag check and the stall guard (fake consumers)."""

from __future__ import annotations

import time

import pytest
from kafka import TopicPartition

from services.common import kafka_consumer
from services.common.kafka_consumer import (
    LAG_TIMEOUT_MS,
    ConsumerGuard,
    ConsumerStalled,
    consumer_lag,
    consumer_options,
)

TOPIC = "events"


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
    # and the poll loop with it; an error here would restart the consumer.
    broker = SlowBroker()
    assert consumer_lag(broker) is None
    assert broker.timeouts == [LAG_TIMEOUT_MS]
    assert LAG_TIMEOUT_MS <= 2000


def test_options_name_only_what_is_set() -> None:
    assert consumer_options(client_id="c") == {
        "client_id": "c", "max_poll_records": 2000, "check_crcs": True, "fetch_max_wait_ms": 50,
    }  # fmt: skip
    trainer = consumer_options(
        client_id="t", max_poll_records=5000, group_instance_id="trainer-0",
        max_partition_fetch_bytes=4 << 20,
    )  # fmt: skip
    assert trainer["group_instance_id"] == "trainer-0"
    assert trainer["max_partition_fetch_bytes"] == 4 << 20


class Empty:
    """Polls return nothing; ``lag`` records wait behind the position."""

    def __init__(self, lag: int) -> None:
        self.lag = lag

    def poll(
        self, timeout_ms: int, max_records: int | None = None
    ) -> dict[TopicPartition, list[object]]:
        return {}

    def assignment(self) -> set[TopicPartition]:
        return {TopicPartition(TOPIC, 0)}

    def end_offsets(
        self, tps: list[TopicPartition], timeout_ms: int | None = None
    ) -> dict[TopicPartition, int]:
        return dict.fromkeys(tps, 10 + self.lag)

    def position(self, tp: TopicPartition, timeout_ms: int | None = None) -> int:
        return 10


def poll_for(guard: ConsumerGuard, consumer: Empty, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        guard.poll(consumer, timeout_ms=10)
        time.sleep(0.005)


def test_empty_polls_with_a_backlog_are_a_stall_logged_and_counted(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(kafka_consumer, "NOT_FETCHING_AFTER_S", 0.1)
    monkeypatch.setattr(kafka_consumer, "LAG_INTERVAL_S", 0.0)
    counted: list[str] = []
    guard = ConsumerGuard("test", counted.append)
    caplog.set_level("WARNING", logger="coldstart.kafka")
    with pytest.raises(ConsumerStalled) as stalled:
        poll_for(guard, Empty(lag=5), 2.0)
    assert stalled.value.reason == "not_fetching" and "lag of 5" in stalled.value.detail
    assert counted == ["not_fetching"]
    assert guard.lag == 5
    assert [r.__dict__["reason"] for r in caplog.records] == ["not_fetching"]
    # A new consumer starts with a clean slate.
    guard.started()
    guard.poll(Empty(lag=5), timeout_ms=10)


def test_a_quiet_topic_is_no_stall(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kafka_consumer, "NOT_FETCHING_AFTER_S", 0.05)
    monkeypatch.setattr(kafka_consumer, "LAG_INTERVAL_S", 0.0)
    counted: list[str] = []
    guard = ConsumerGuard("test", counted.append)
    poll_for(guard, Empty(lag=0), 0.3)
    assert counted == [] and guard.lag == 0


def test_silence_is_time_since_the_loop_last_moved() -> None:
    guard = ConsumerGuard("test", lambda reason: None)
    guard.poll(Empty(lag=0), timeout_ms=10)
    time.sleep(0.05)
    assert guard.silent_for() >= 0.05
    guard.progress()
    assert guard.silent_for() < 0.05

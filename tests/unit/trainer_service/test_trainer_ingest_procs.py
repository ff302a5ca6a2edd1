"""The trainer's consume loop (consumer processes feeding the log writer, its
only one): the hand-over protocol, with fake consumers in threads in place of
the processes (the real processes run in tests/integration/test_trainer_ingest.py).

What must hold whatever happens: every event id in the log once, the stored
offsets moving only with the data, and no Kafka commit ahead of the log."""

from __future__ import annotations

import multiprocessing
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
from coldstart.v1 import events_pb2
from kafka import TopicPartition

from services.common import kafka_consumer
from services.common.events import encode_event, new_event
from services.trainer import ingest_procs, metrics
from services.trainer.event_log import EventLog, EventLogError
from services.trainer.ingest import DeadLetter, Ingestor
from services.trainer.ingest_procs import ConsumerProcess, ProcessIngest

TOPIC = "events"


class Killed(BaseException):
    """A SIGKILL stand-in: nothing of the consumer runs after it."""


def view(event_id: str, user: str = "u", ts: int = 1000) -> bytes | None:
    return encode_event(
        new_event(
            "test",
            event_id=event_id,
            timestamp_ms=ts,
            interaction=events_pb2.Interaction(user_id=user, item_id="i", kind="view", value=1),
        )
    )


def forget(user: str, ts: int) -> bytes:
    return encode_event(
        new_event("test", timestamp_ms=ts, user_forgotten=events_pb2.UserForgotten(user_id=user))
    )


class Record:
    def __init__(self, partition: int, offset: int, value: bytes | None) -> None:
        self.partition, self.offset, self.key, self.value = partition, offset, b"k", value


class Topic:
    """The broker side: records per partition and the group's committed offsets."""

    def __init__(self, partitions: dict[int, list[bytes | None]], log: EventLog) -> None:
        self.partitions = partitions
        self.log = log
        self.committed: dict[int, int] = {}
        self.commits_ahead_of_log: list[tuple[dict[int, int], dict[int, int]]] = []
        self.lock = threading.Lock()

    def commit(self, offsets: dict[int, int]) -> None:
        stored = self.log.stored_offsets(TOPIC)
        with self.lock:
            if any(o > stored.get(p, 0) for p, o in offsets.items()):
                self.commits_ahead_of_log.append((dict(offsets), stored))
            self.committed.update(offsets)


class GroupConsumer:
    """A KafkaConsumer stand-in owning some partitions of ``Topic``; ``batch``
    records per partition per poll. ``kill_after`` polls with records, it
    waits until the log holds what it handed over, then raises Killed from
    then on (the writer applied the batch; its acknowledgement is never read)."""

    def __init__(
        self, topic: Topic, owned: Sequence[int], batch: int = 3, kill_after: int = 0
    ) -> None:
        self.topic = topic
        self.owned = list(owned)
        self.batch = batch
        self.kill_after = kill_after
        self.killed = False
        self.polls_with_records = 0
        self.positions: dict[int, int] = {}
        self.seeks: list[tuple[int, int]] = []
        self.listener: Any = None
        self.assigned = False

    def _alive(self) -> None:
        if self.killed:
            raise Killed

    def partitions_for_topic(self, topic: str) -> set[int]:
        return set(self.owned)

    def subscribe(self, topics: list[str], listener: Any) -> None:
        self.listener = listener

    def assignment(self) -> set[TopicPartition]:
        return {TopicPartition(TOPIC, p) for p in self.owned}

    def poll(self, timeout_ms: int, max_records: int) -> dict[TopicPartition, list[Record]]:
        self._alive()
        if not self.assigned:
            self.assigned = True
            self.listener.on_partitions_assigned(self.assignment())
        if self.kill_after and self.polls_with_records >= self.kill_after:
            handed = {p: self.positions[p] for p in self.owned}
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                stored = self.topic.log.stored_offsets(TOPIC)
                if all(stored.get(p, 0) >= o for p, o in handed.items()):
                    break
                time.sleep(0.01)
            self.killed = True
            raise Killed
        out: dict[TopicPartition, list[Record]] = {}
        for p in self.owned:
            pos = self.positions[p]
            values = self.topic.partitions[p][pos : pos + self.batch]
            if values:
                out[TopicPartition(TOPIC, p)] = [
                    Record(p, pos + k, v) for k, v in enumerate(values)
                ]
                self.positions[p] = pos + len(values)
        if out:
            self.polls_with_records += 1
        else:
            time.sleep(0.01)
        return out

    def seek(self, tp: TopicPartition, offset: int) -> None:
        self.seeks.append((tp.partition, offset))
        self.positions[tp.partition] = offset

    def seek_to_beginning(self, tp: TopicPartition) -> None:
        self.seek(tp, 0)

    def commit(self, offsets: dict[TopicPartition, Any]) -> None:
        self._alive()
        self.topic.commit({tp.partition: meta.offset for tp, meta in offsets.items()})

    commit_async = commit

    def end_offsets(
        self, tps: list[TopicPartition], timeout_ms: int | None = None
    ) -> dict[TopicPartition, int]:
        return {tp: len(self.topic.partitions[tp.partition]) for tp in tps}

    def position(self, tp: TopicPartition, timeout_ms: int) -> int:
        return self.positions.get(tp.partition, 0)

    def close(self, autocommit: bool, timeout_ms: int) -> None:
        pass


class Sink:
    def __init__(self) -> None:
        self.sent: list[DeadLetter] = []
        self.topic = "events.dlq"

    def send(self, source_topic: str, letters: Sequence[DeadLetter]) -> None:
        self.sent.extend(letters)

    def close(self) -> None:
        pass


class ThreadProcess:
    """Runs a ConsumerProcess in a thread; closes its pipe end when it ends,
    however it ends (what the OS does for a killed process)."""

    def __init__(self, worker: ConsumerProcess) -> None:
        self.worker = worker
        self.pid = threading.get_native_id()
        self.exitcode: int | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.worker.run()
            self.exitcode = 0
        except Killed:
            self.exitcode = -9
        finally:
            self.worker.conn.close()

    def join(self, timeout: float | None = None) -> None:
        self.thread.join(timeout)

    def is_alive(self) -> bool:
        return self.thread.is_alive()

    def kill(self) -> None:
        pass


class ThreadIngest(ProcessIngest):
    """ProcessIngest whose consumers are threads with fake consumers: each start
    of member i takes the next consumer from ``consumers[i]``."""

    def __init__(
        self, ingestor: Ingestor, consumers: list[list[GroupConsumer]], sink: Sink
    ) -> None:
        super().__init__(ingestor, len(consumers))
        self.consumers = consumers
        self.sink = sink
        self.started: list[GroupConsumer] = []

    def _spawn(self, index: int) -> tuple[Any, Any]:
        parent, child = multiprocessing.Pipe(duplex=True)
        consumer = self.consumers[index].pop(0)
        self.started.append(consumer)
        worker = ConsumerProcess(child, self.config(index), consumer_factory=lambda: consumer)
        return ThreadProcess(worker), parent


def run_until(
    ingest: ThreadIngest, done: Callable[[], bool], timeout_s: float = 20.0
) -> threading.Event:
    stop = threading.Event()
    thread = threading.Thread(target=ingest.run, args=(stop,), daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout_s
    try:
        while not done() and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        stop.set()
        thread.join(timeout=20)
    assert not thread.is_alive()
    return stop


def setup(
    tmp_path: Path, partitions: dict[int, list[bytes | None]]
) -> tuple[EventLog, Topic, Ingestor, Sink]:
    log = EventLog(tmp_path / "log.sqlite")
    topic = Topic(partitions, log)
    sink = Sink()
    ingestor = Ingestor(
        log, bootstrap="unused", topic=TOPIC, group_id="g", dead_letters=sink, processes=1
    )
    return log, topic, ingestor, sink


def ids(log: EventLog) -> list[str]:
    with log.reader() as conn:
        return [r[0] for r in conn.execute("SELECT event_id FROM events")]


def caught_up(log: EventLog, topic: Topic) -> Callable[[], bool]:
    ends = {p: len(v) for p, v in topic.partitions.items()}
    return lambda: log.stored_offsets(TOPIC) == ends and topic.committed == ends


@pytest.fixture(autouse=True)
def quick_restarts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ingest_procs, "RESTART_MIN_S", 0.01)
    monkeypatch.setattr(ingest_procs, "REPLY_WAIT_S", 0.05)
    monkeypatch.setattr(ingest_procs, "BACKOFF_MIN_S", 0.01)


def test_batches_land_once_and_kafka_commits_follow_the_log(tmp_path: Path) -> None:
    values = {0: [view(f"a{i}") for i in range(20)], 1: [view(f"b{i}") for i in range(7)]}
    values[0][5] = b"junk"  # dead-lettered, its offset handled like the others
    log, topic, ingestor, sink = setup(tmp_path, values)
    ingest = ThreadIngest(ingestor, [[GroupConsumer(topic, [0, 1])]], sink)
    done = caught_up(log, topic)
    counted = metrics.EVENTS_DEAD_LETTERED.labels("unparseable")._value.get()
    run_until(ingest, lambda: done() and ingestor.status.consumer_lag == 0)
    assert metrics.EVENTS_DEAD_LETTERED.labels("unparseable")._value.get() == counted + 1
    assert sorted(ids(log)) == sorted(
        [f"a{i}" for i in range(20) if i != 5] + [f"b{i}" for i in range(7)]
    )
    assert log.counters()["applied"] == 26 and log.counters()["dead_lettered"] == 1
    assert [d.offset for d in sink.sent] == [5]
    assert topic.committed == {0: 20, 1: 7}
    assert topic.commits_ahead_of_log == []
    assert ingestor.status.first_records_at is not None
    # (run_until waited for consumer_lag == 0; stopped, it is unknown again)
    assert ingestor.status.consumer_lag == -1


def test_a_kill_after_the_write_and_before_the_kafka_commit_resumes_from_the_log(
    tmp_path: Path,
) -> None:
    """The writer applied batches the consumer never saw acknowledged (so never
    committed to Kafka). The restarted consumer resumes from the log's offsets,
    not Kafka's: nothing is applied twice (not even as a counted duplicate),
    nothing is skipped."""
    values = {0: [view(f"a{i}") for i in range(30)]}
    log, topic, ingestor, sink = setup(tmp_path, values)
    first = GroupConsumer(topic, [0], kill_after=4)
    second = GroupConsumer(topic, [0])
    ingest = ThreadIngest(ingestor, [[first, second]], sink)
    run_until(ingest, caught_up(log, topic))
    assert first.killed
    assert len(ingest.started) == 2
    # Killed with 12 records in the log; at most what was acknowledged before
    # the kill reached Kafka (the last batch's acknowledgement was never read).
    assert second.seeks[0] == (0, 12)
    assert sorted(ids(log)) == sorted(f"a{i}" for i in range(30))
    assert log.counters() == {
        "applied": 30, "duplicates": 0, "dropped_forgotten": 0, "forgotten_users": 0,
        "dead_lettered": 0,
    }  # fmt: skip
    assert topic.commits_ahead_of_log == []


def test_a_failed_write_drops_the_batches_read_past_it_and_rereads(tmp_path: Path) -> None:
    """The second transaction fails (disk full) while later batches are already
    on their way: none of them may land before the failed one. The consumer
    seeks back to the log and re-reads; the log ends with every offset once,
    in order."""
    values = {0: [view(f"a{i}") for i in range(30)]}
    log, topic, ingestor, sink = setup(tmp_path, values)
    real_apply = log.apply_batches
    calls: list[tuple[list[int], bool]] = []

    def flaky(topic_name: str, batches: Any) -> Any:
        offsets = [row[2] for rows, _, _ in batches for row in rows]
        if len(calls) == 1:
            time.sleep(0.2)  # let the consumer send more batches meanwhile
            calls.append((offsets, False))
            raise EventLogError("database or disk is full")
        calls.append((offsets, True))
        return real_apply(topic_name, batches)

    log.apply_batches = flaky  # type: ignore[method-assign,assignment]
    consumer = GroupConsumer(topic, [0])
    ingest = ThreadIngest(ingestor, [[consumer]], sink)
    write_failures = metrics.LOG_WRITE_FAILURES._value.get()
    run_until(ingest, caught_up(log, topic))
    assert metrics.LOG_WRITE_FAILURES._value.get() == write_failures + 1
    failed = calls[1][0]
    applied = [o for offsets, ok in calls if ok for o in offsets]
    assert applied == list(range(30))  # every offset once, in order
    assert failed[0] == len(calls[0][0])  # it follows the first transaction
    assert (0, failed[0]) in consumer.seeks
    # Batches were read past the failed one (and dropped): the consumer's
    # position had gone beyond what the failed transaction held.
    assert consumer.polls_with_records > 10
    assert sorted(ids(log)) == sorted(f"a{i}" for i in range(30))
    assert log.counters()["duplicates"] == 0
    assert topic.commits_ahead_of_log == []


def test_duplicate_ids_across_batches_partitions_and_consumers_are_stored_once(
    tmp_path: Path,
) -> None:
    """Producer retries (same id again, later, same partition) and an id that
    arrives on two partitions read by two consumer processes."""
    p0 = [view(f"e{i}") for i in range(12)] + [view("e1"), view("e2")]
    p1 = [view(f"e{i}") for i in range(6, 18)]
    log, topic, ingestor, sink = setup(tmp_path, {0: p0, 1: p1})
    ingest = ThreadIngest(
        ingestor, [[GroupConsumer(topic, [0])], [GroupConsumer(topic, [1])]], sink
    )
    run_until(ingest, caught_up(log, topic))
    stored = ids(log)
    assert sorted(stored) == sorted(f"e{i}" for i in range(18))
    assert len(stored) == len(set(stored))
    counters = log.counters()
    assert counters["applied"] == 18
    assert counters["duplicates"] == len(p0) + len(p1) - 18
    assert topic.commits_ahead_of_log == []


def test_forgetting_a_user_covers_every_partition_and_consumer(tmp_path: Path) -> None:
    """The user's events arrive on two partitions read by two processes; the
    erasure on one of them removes those of both, whichever lands first, and
    drops the ones older than the erasure that arrive after it."""
    p0 = [view(f"v0-{i}", user="v", ts=100 + i) for i in range(6)] + [forget("v", 500)]
    p0 += [view(f"w0-{i}", user="w", ts=600) for i in range(3)]
    p1 = [view(f"v1-{i}", user="v", ts=200 + i) for i in range(9)]
    p1 += [view(f"w1-{i}", user="w", ts=700) for i in range(3)]
    log, topic, ingestor, sink = setup(tmp_path, {0: p0, 1: p1})
    ingest = ThreadIngest(
        ingestor, [[GroupConsumer(topic, [0], batch=2)], [GroupConsumer(topic, [1], batch=2)]], sink
    )
    run_until(ingest, caught_up(log, topic))
    with log.reader() as conn:
        users = {r[0] for r in conn.execute("SELECT user_id FROM events")}
    assert users == {"w"}
    assert len(ids(log)) == 6
    counters = log.counters()
    assert counters["forgotten_users"] == 1
    # Each of v's 15 events was either written then erased or dropped on arrival.
    assert counters["applied"] + counters["dropped_forgotten"] == 15 + 6
    assert log.forgotten_users() == {"v"}


class FlakySink(Sink):
    """Refuses the first ``failures`` sends (the dead-letter topic is down);
    notes the log's offsets at every send."""

    def __init__(self, log: EventLog, failures: int) -> None:
        super().__init__()
        self.log = log
        self.failures = failures
        self.attempts: list[dict[int, int]] = []

    def send(self, source_topic: str, letters: Sequence[DeadLetter]) -> None:
        self.attempts.append(self.log.stored_offsets(TOPIC))
        if len(self.attempts) <= self.failures:
            raise ConnectionError("dead-letter topic unreachable")
        super().send(source_topic, letters)


def test_the_writer_dead_letters_before_it_applies_and_rereads_when_it_cannot(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Consumers hand raw records over; the writer decodes them. A bad record
    goes to the dead-letter topic (with its key and bytes) before its batch is
    applied; while that topic is down nothing of the batch, nor of what the
    consumer read after it, is applied, and the consumer re-reads from the log."""
    values = {0: [view(f"a{i}") for i in range(20)], 1: [view(f"b{i}") for i in range(4)]}
    values[0][7] = b"junk"
    log, topic, ingestor, _ = setup(tmp_path, values)
    sink = FlakySink(log, failures=2)
    ingestor.dead_letters = sink
    consumer = GroupConsumer(topic, [0, 1])
    ingest = ThreadIngest(ingestor, [[consumer]], sink)
    caplog.set_level("WARNING", logger="coldstart.trainer.ingest")
    run_until(ingest, caught_up(log, topic))
    assert len(sink.attempts) == 3
    # The junk's batch (offsets 6-8 of partition 0) was never in the log at a send.
    assert all(stored.get(0, 0) <= 7 for stored in sink.attempts)
    assert [(d.partition, d.offset, d.key, d.value, d.reason) for d in sink.sent] == [
        (0, 7, b"k", b"junk", "unparseable")
    ]
    # Sought back to the log's offsets after each failure, never past the junk.
    rewinds = [o for p, o in consumer.seeks if p == 0]
    assert len(rewinds) == 3 and all(o <= 7 for o in rewinds)
    assert sorted(ids(log)) == sorted(
        [f"a{i}" for i in range(20) if i != 7] + [f"b{i}" for i in range(4)]
    )
    assert log.counters()["dead_lettered"] == 1
    assert log.counters()["duplicates"] == 0
    assert topic.commits_ahead_of_log == []
    lettered = [r for r in caplog.records if r.getMessage() == "event dead-lettered"]
    assert [(r.__dict__["partition"], r.__dict__["offset"]) for r in lettered] == [(0, 7)]


def test_a_consumer_hands_over_raw_columns_and_next_offsets(tmp_path: Path) -> None:
    """What crosses the pipe: per partition, the records' offsets, keys and
    values as polled (no decoding in the consumer process)."""
    values = {0: [view("a0"), b"junk", view("a2")], 1: [view("b0")]}
    _log, topic, ingestor, _ = setup(tmp_path, values)
    parent, child = multiprocessing.Pipe(duplex=True)
    consumer = GroupConsumer(topic, [0, 1])
    worker = ConsumerProcess(
        child, ProcessIngest(ingestor, 1).config(0), consumer_factory=lambda: consumer
    )
    try:
        consumer.listener = None
        consumer.assigned = True
        consumer.positions = {0: 0, 1: 0}
        assert worker.poll_once(consumer)
        message = parent.recv()
        while message[0] != "batch":
            message = parent.recv()
        _, seq, epoch, columns, _lag, first_at = message
        assert columns == [(0, [0, 1, 2], [b"k"] * 3, values[0]), (1, [0], [b"k"], values[1])]
        assert worker.in_flight[seq] == {0: 3, 1: 1}
        assert epoch == 0 and first_at is not None
    finally:
        worker._outbox.put(None)
        parent.close()
        child.close()


class IoThreadRebalances(GroupConsumer):
    """kafka-python 3.x finishes a join on its IO thread, and a poll that timed
    out waiting for it has returned: the listener then runs beside the
    consumer's main thread. Here every few polls a rebalance (revoke, then
    assign the same partitions) starts on another thread while poll returns."""

    def __init__(self, topic: Topic, owned: Sequence[int], every: int) -> None:
        super().__init__(topic, owned, batch=2)
        self.every = every
        self.polls = 0
        self.rebalances: list[threading.Thread] = []
        self.listener_errors: list[BaseException] = []
        self.moves = threading.RLock()  # the fake's own positions, seeked from both threads

    def _rebalance(self) -> None:
        try:
            self.listener.on_partitions_revoked(self.assignment())
            self.listener.on_partitions_assigned(self.assignment())
        except BaseException as exc:  # kafka-python logs and swallows listener errors
            self.listener_errors.append(exc)

    def poll(self, timeout_ms: int, max_records: int) -> dict[TopicPartition, list[Record]]:
        self.polls += 1
        if self.assigned and self.polls % self.every == 0:
            thread = threading.Thread(target=self._rebalance, daemon=True)
            self.rebalances.append(thread)
            thread.start()
        with self.moves:
            return super().poll(timeout_ms, max_records)

    def seek(self, tp: TopicPartition, offset: int) -> None:
        with self.moves:
            super().seek(tp, offset)


def test_rebalance_listeners_on_kafkas_io_thread_do_not_hang_the_hand_over(
    tmp_path: Path,
) -> None:
    values = {0: [view(f"a{i}") for i in range(300)], 1: [view(f"b{i}") for i in range(300)]}
    log, topic, ingestor, sink = setup(tmp_path, values)
    consumer = IoThreadRebalances(topic, [0, 1], every=3)
    ingest = ThreadIngest(ingestor, [[consumer]], sink)
    run_until(ingest, caught_up(log, topic), timeout_s=30)
    for thread in consumer.rebalances:
        thread.join(timeout=5)
    assert len(consumer.rebalances) > 20
    assert consumer.listener_errors == []
    assert len(ingest.started) == 1  # never restarted
    # Re-reads after a seek back to the log are duplicates, never second rows.
    assert sorted(ids(log)) == sorted([f"a{i}" for i in range(300)] + [f"b{i}" for i in range(300)])
    assert topic.commits_ahead_of_log == []


class HangsInPoll(GroupConsumer):
    """After ``polls`` polls with records, poll blocks until the process is killed
    (kafka-python 3.0.12 was seen to: a task its IO thread never ran)."""

    def __init__(self, topic: Topic, owned: Sequence[int], polls: int) -> None:
        super().__init__(topic, owned, batch=5)
        self.polls = polls
        self.hung = threading.Event()
        self.released = threading.Event()

    def poll(self, timeout_ms: int, max_records: int) -> dict[TopicPartition, list[Record]]:
        if self.polls_with_records >= self.polls:
            self.hung.set()
            self.released.wait(30)
            raise Killed
        return super().poll(timeout_ms, max_records)


class KillableThreadIngest(ThreadIngest):
    """ThreadIngest whose kill() releases a hung fake consumer (as SIGKILL ends it)."""

    def _spawn(self, index: int) -> tuple[Any, Any]:
        process, conn = super()._spawn(index)
        consumer = self.started[-1]
        if isinstance(consumer, HangsInPoll):
            process.kill = consumer.released.set
        return process, conn


def test_a_consumer_that_stops_talking_is_killed_and_replaced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ingest_procs, "ALIVE_EVERY_S", 0.05)
    monkeypatch.setattr(ingest_procs, "STALLED_AFTER_S", 0.5)
    values = {0: [view(f"a{i}") for i in range(60)]}
    log, topic, ingestor, sink = setup(tmp_path, values)
    hung = HangsInPoll(topic, [0], polls=4)
    ingest = KillableThreadIngest(ingestor, [[hung, GroupConsumer(topic, [0])]], sink)
    before = metrics.CONSUMER_RESTARTS.labels("stalled")._value.get()
    run_until(ingest, caught_up(log, topic))
    assert hung.hung.is_set() and hung.released.is_set()
    assert len(ingest.started) == 2
    assert metrics.CONSUMER_RESTARTS.labels("stalled")._value.get() == before + 1
    assert sorted(ids(log)) == sorted(f"a{i}" for i in range(60))
    assert topic.commits_ahead_of_log == []


def test_a_quiet_topic_is_not_a_stalled_consumer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Nothing to read for many stall periods: the consumer still says it is alive."""
    monkeypatch.setattr(ingest_procs, "ALIVE_EVERY_S", 0.05)
    monkeypatch.setattr(ingest_procs, "STALLED_AFTER_S", 0.3)
    values: dict[int, list[bytes | None]] = {0: [view("a0")]}
    log, topic, ingestor, sink = setup(tmp_path, values)
    ingest = ThreadIngest(ingestor, [[GroupConsumer(topic, [0])]], sink)
    started = time.monotonic()
    run_until(ingest, lambda: time.monotonic() - started > 2.0, timeout_s=5)
    assert len(ingest.started) == 1
    assert ids(log) == ["a0"]


class StopsFetching(GroupConsumer):
    """After ``polls`` polls with records it returns nothing though records are
    left (lag > 0), until it is closed: a consumer that no longer fetches."""

    def __init__(self, topic: Topic, owned: Sequence[int], polls: int) -> None:
        super().__init__(topic, owned, batch=5)
        self.polls = polls
        self.closed = 0

    def poll(self, timeout_ms: int, max_records: int) -> dict[TopicPartition, list[Record]]:
        if self.polls_with_records >= self.polls and not self.closed:
            time.sleep(0.01)
            return {}
        return super().poll(timeout_ms, max_records)

    def close(self, autocommit: bool, timeout_ms: int) -> None:
        self.closed += 1


def test_a_consumer_that_stops_fetching_with_a_backlog_is_replaced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(kafka_consumer, "NOT_FETCHING_AFTER_S", 0.3)
    monkeypatch.setattr(kafka_consumer, "LAG_INTERVAL_S", 0.01)
    values = {0: [view(f"a{i}") for i in range(60)]}
    log, topic, ingestor, sink = setup(tmp_path, values)
    stuck = StopsFetching(topic, [0], polls=3)
    ingest = ThreadIngest(ingestor, [[stuck]], sink)
    before = metrics.CONSUMER_RESTARTS.labels("not_fetching")._value.get()
    run_until(ingest, caught_up(log, topic))
    assert stuck.closed >= 2  # replaced in the same process, then closed at the stop
    assert len(ingest.started) == 1
    # Counted in the service process (the consumer process tells the writer).
    assert metrics.CONSUMER_RESTARTS.labels("not_fetching")._value.get() == before + 1
    assert sorted(ids(log)) == sorted(f"a{i}" for i in range(60))
    assert topic.commits_ahead_of_log == []


class FirstConsumerFails(ThreadIngest):
    """The first consumer a process makes raises (no broker reachable yet)."""

    def _spawn(self, index: int) -> tuple[Any, Any]:
        parent, child = multiprocessing.Pipe(duplex=True)
        consumer = self.consumers[index].pop(0)
        self.started.append(consumer)
        made = {"n": 0}

        def factory() -> Any:
            made["n"] += 1
            if made["n"] == 1:
                raise RuntimeError("no brokers available")
            return consumer

        worker = ConsumerProcess(child, self.config(index), consumer_factory=factory)
        return ThreadProcess(worker), parent


def test_a_consumer_that_cannot_be_made_is_retried_in_its_process(tmp_path: Path) -> None:
    values = {0: [view(f"a{i}") for i in range(10)]}
    log, topic, ingestor, sink = setup(tmp_path, values)
    ingest = FirstConsumerFails(ingestor, [[GroupConsumer(topic, [0])]], sink)
    run_until(ingest, caught_up(log, topic))
    assert len(ingest.started) == 1  # the process lived on
    assert sorted(ids(log)) == sorted(f"a{i}" for i in range(10))
    assert topic.commits_ahead_of_log == []
    assert not ingestor.status.running


def test_the_in_process_loop_is_gone() -> None:
    """``ingest_processes = 0`` was measured at about half the rate and removed."""
    from services.common.settings import SettingsError
    from services.trainer.settings import TrainerSettings

    with pytest.raises(ValueError, match="processes must be >= 1"):
        Ingestor(
            EventLog.__new__(EventLog), bootstrap="b", topic=TOPIC, group_id="g",
            dead_letters=Sink(), processes=0,
        )  # fmt: skip
    with pytest.raises(SettingsError, match=r"ingest_processes: must be in \[1, 64\]"):
        TrainerSettings(ingest_processes=0).validate()

"""The trainer's consumer against the real broker: SIGKILLs while 50,000 events
are produced, bad input to the dead-letter topic, erasure, the status RPC."""

from __future__ import annotations

import json
import random
import sqlite3
import threading
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import grpc
import pytest
from coldstart.v1 import events_pb2, trainer_pb2, trainer_pb2_grpc
from kafka import KafkaConsumer, TopicPartition

from services.common.events import encode_event, make_producer, new_event, produce_and_wait
from services.common.kafka.local_broker import Topic, create_topics
from tests.support.processes import running_service

pytestmark = pytest.mark.integration

EVENTS = 50_000
PACE = 1_500  # events per second: production takes about 33 s
PARTITIONS = 6


def topics(bootstrap: str, partitions: int = PARTITIONS) -> tuple[str, str]:
    name = f"test.trainer.{uuid.uuid4().hex[:8]}"
    create_topics(bootstrap, (Topic(name, partitions), Topic(f"{name}.dlq", 1)))
    return name, f"{name}.dlq"


def service_settings(bootstrap: str, topic: str, dlq: str, tmp_path: Path) -> dict[str, object]:
    return {
        "kafka_bootstrap": bootstrap,
        "events_topic": topic,
        "dead_letter_topic": dlq,
        "group_id": f"trainer-{topic}",
        "log_dir": tmp_path / "state",
        "registry_dir": tmp_path / "registry",
    }


def log_rows(db: Path, sql: str = "SELECT COUNT(*) FROM events") -> Any:
    if not db.exists():
        return 0
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
    try:
        return conn.execute(sql).fetchone()[0]
    except sqlite3.OperationalError:  # the schema is not created yet
        return 0
    finally:
        conn.close()


def stored_offsets(db: Path) -> dict[int, int]:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
    try:
        return {
            int(p): int(o) for p, o in conn.execute("SELECT partition, next_offset FROM offsets")
        }
    finally:
        conn.close()


def interaction(i: int) -> events_pb2.Event:
    return new_event(
        "test",
        interaction=events_pb2.Interaction(
            user_id=f"u{i % 997}", item_id=f"i{i % 1682}", kind="view", value=1.0
        ),
    )


def end_offsets(bootstrap: str, topic: str) -> dict[int, int]:
    consumer = KafkaConsumer(bootstrap_servers=bootstrap)
    try:
        parts = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or ()]
        return {tp.partition: int(o) for tp, o in consumer.end_offsets(parts).items()}
    finally:
        consumer.close()


def status(address: str) -> trainer_pb2.TrainerStatus:
    with grpc.insecure_channel(address) as channel:
        reply: trainer_pb2.TrainerStatus = trainer_pb2_grpc.TrainerServiceStub(channel).GetStatus(
            trainer_pb2.GetStatusRequest(), timeout=10
        )
        return reply


def consumer_pids(trainer: Any) -> list[int]:
    """Pids of the consumer processes this service incarnation started (from its logs)."""
    pids = []
    for line in trainer.logs().splitlines():
        if '"consumer process started"' in line:
            pids.append(int(json.loads(line)["pid"]))
    return pids


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def wait_gone(pids: list[int], timeout_s: float = 10.0) -> list[int]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and any(alive(p) for p in pids):
        time.sleep(0.05)
    return [p for p in pids if alive(p)]


class PacedProducer:
    """Produces ``events`` in chunks at PACE events/s on a thread, then ``resent``
    again (a producer's retry after an unacknowledged send: the same ids twice)."""

    def __init__(
        self,
        bootstrap: str,
        topic: str,
        events: list[events_pb2.Event],
        resent: list[events_pb2.Event],
        chunk: int,
    ) -> None:
        self.done = threading.Event()
        self.failure: list[BaseException] = []
        self.producer = make_producer(bootstrap, linger_ms=20, batch_size=256 * 1024)
        self._thread = threading.Thread(
            target=self._run, args=(topic, events, resent, chunk), daemon=True
        )

    def _run(
        self,
        topic: str,
        events: list[events_pb2.Event],
        resent: list[events_pb2.Event],
        chunk: int,
    ) -> None:
        try:
            began = time.monotonic()
            for start in range(0, len(events), chunk):
                produce_and_wait(self.producer, topic, events[start : start + chunk], timeout_s=60)
                time.sleep(max(0.0, began + (start + chunk) / PACE - time.monotonic()))
            produce_and_wait(self.producer, topic, resent, timeout_s=60)
            self.done.set()
        except BaseException as exc:
            self.failure.append(exc)

    def start(self) -> None:
        self._thread.start()

    def join(self, timeout: float) -> None:
        self._thread.join(timeout=timeout)


@pytest.mark.parametrize("processes", [1, 2])
def test_three_sigkills_while_50k_events_are_produced_lose_and_double_nothing(
    kafka_broker: str, tmp_path: Path, processes: int
) -> None:
    """With N consumer processes feeding the log writer (1: the default; 2; the
    in-process loop, 0, is gone). A SIGKILL of the service takes its consumer
    processes with it."""
    topic, dlq = topics(kafka_broker)
    events = [interaction(i) for i in range(EVENTS)]
    produced = {e.event_id for e in events}
    resent = random.Random(7).sample(events, 500)
    # Paced so that all three kills land while producing.
    writer = PacedProducer(kafka_broker, topic, events, resent, chunk=2500)

    seed = random.randrange(1_000_000)
    # Three random moments (seconds after production starts) within its first 14 s;
    # a restart takes a few seconds, so the last kill still lands before it ends.
    rng = random.Random(seed)
    kills = sorted(rng.uniform(2.0, 14.0) for _ in range(3))
    db = tmp_path / "state" / "events.sqlite"
    settings = {
        **service_settings(kafka_broker, topic, dlq, tmp_path),
        "ingest_processes": processes,
    }
    writer.start()
    seen_at_kill: list[int] = []
    producing: list[bool] = []
    began = time.monotonic()
    try:
        for moment in kills:
            with running_service("trainer", tmp_path / "logs", settings=settings) as trainer:
                # Kill at the moment, or (if a restart took us past it) as soon as
                # this incarnation has applied something: always mid-consumption.
                rows_at_start = log_rows(db)
                deadline = time.monotonic() + 120
                while time.monotonic() < deadline and (
                    time.monotonic() - began < moment or log_rows(db) <= rows_at_start
                ):
                    assert trainer.process.poll() is None, trainer.logs()[-2000:]
                    time.sleep(0.01)
                trainer.kill()  # SIGKILL, mid-stream
                producing.append(not writer.done.is_set())
                pids = consumer_pids(trainer)
                assert len(pids) == processes, trainer.logs()[-2000:]
                assert wait_gone(pids) == [], "consumer processes outlived the service"
                seen_at_kill.append(log_rows(db))
                print(f"killed at {seen_at_kill[-1]} rows, {time.monotonic() - began:.1f}s")
        writer.join(timeout=180)
        assert writer.done.is_set(), writer.failure
        with running_service("trainer", tmp_path / "logs", settings=settings) as trainer:
            deadline = time.monotonic() + 120
            target = end_offsets(kafka_broker, topic)
            reply = status(trainer.address)
            stored: dict[int, int] = {}
            while time.monotonic() < deadline:
                reply = status(trainer.address)
                stored = stored_offsets(db)
                if stored == target and reply.consumer_lag == 0:
                    break
                time.sleep(0.2)
            print(f"caught up after {time.monotonic() - began:.1f}s")
            assert stored == target, (seed, kills)
            assert reply.consumer_lag == 0
            assert reply.events_applied == EVENTS
            assert reply.events_dead_lettered == 0
    finally:
        writer.producer.close()

    assert producing == [True, True, True], (seed, kills, seen_at_kill)
    assert seen_at_kill[0] > 0 and seen_at_kill[-1] < EVENTS, (seed, kills, seen_at_kill)
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    ids = [r[0] for r in conn.execute("SELECT event_id FROM events")]
    counters = dict(conn.execute("SELECT key, value FROM meta").fetchall())
    conn.close()
    assert len(ids) == EVENTS, (seed, kills)
    assert set(ids) == produced  # every id, exactly once
    assert counters["applied"] == EVENTS  # the counters moved with the data, never twice
    assert counters["duplicates"] >= len(resent)


def test_sigkilled_consumer_processes_are_restarted_and_lose_and_double_nothing(
    kafka_broker: str, tmp_path: Path
) -> None:
    """Two consumer processes; one of them is SIGKILLed at three random moments
    while 20,000 events (+200 re-sent ids) are produced. The service stays up,
    restarts it, and the log ends with every id once."""
    import os
    import signal

    topic, dlq = topics(kafka_broker)
    n = 20_000
    events = [interaction(i) for i in range(n)]
    resent = random.Random(11).sample(events, 200)
    writer = PacedProducer(kafka_broker, topic, events, resent, chunk=2000)

    seed = random.randrange(1_000_000)
    rng = random.Random(seed)
    db = tmp_path / "state" / "events.sqlite"
    settings = {**service_settings(kafka_broker, topic, dlq, tmp_path), "ingest_processes": 2}
    try:
        with running_service("trainer", tmp_path / "logs", settings=settings) as trainer:
            deadline = time.monotonic() + 60
            while len(consumer_pids(trainer)) < 2 and time.monotonic() < deadline:
                time.sleep(0.05)
            writer.start()
            killed: list[int] = []
            for _ in range(3):
                time.sleep(rng.uniform(1.0, 3.0))
                victim = rng.choice([p for p in consumer_pids(trainer) if alive(p)])
                os.kill(victim, signal.SIGKILL)
                killed.append(victim)
                assert wait_gone([victim]) == []
                # The writer notices and starts a new one.
                deadline = time.monotonic() + 30
                while time.monotonic() < deadline and (
                    sum(alive(p) for p in consumer_pids(trainer)) < 2
                ):
                    time.sleep(0.05)
                assert sum(alive(p) for p in consumer_pids(trainer)) == 2, trainer.logs()[-3000:]
            writer.join(timeout=120)
            assert writer.done.is_set(), writer.failure
            deadline = time.monotonic() + 120
            target = end_offsets(kafka_broker, topic)
            reply = status(trainer.address)
            stored: dict[int, int] = {}
            while time.monotonic() < deadline:
                reply = status(trainer.address)
                stored = stored_offsets(db)
                if stored == target and reply.consumer_lag == 0:
                    break
                time.sleep(0.2)
            assert stored == target, seed
            assert reply.consumer_lag == 0
            assert reply.events_applied == n
            assert trainer.process.poll() is None
            assert "consumer process exited; restarting" in trainer.logs()
            live = [p for p in consumer_pids(trainer) if alive(p)]
        # A clean stop ends the consumer processes too.
        assert wait_gone(live) == []
    finally:
        writer.producer.close()
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    ids = [r[0] for r in conn.execute("SELECT event_id FROM events")]
    counters = dict(conn.execute("SELECT key, value FROM meta").fetchall())
    conn.close()
    assert len(ids) == n, seed
    assert set(ids) == {e.event_id for e in events}
    assert counters["applied"] == n
    assert counters["duplicates"] >= len(resent)


def metrics_text(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        text: str = reply.read().decode()
        return text


def raw_send(producer: Any, topic: str, value: bytes | None, key: bytes = b"k") -> None:
    producer.send(topic, key=key, value=value).get(timeout=30)


def test_bad_input_goes_to_the_dead_letter_topic_and_consumption_goes_on(
    kafka_broker: str, tmp_path: Path
) -> None:
    topic, dlq = topics(kafka_broker, partitions=1)
    future = new_event("test", user_forgotten=events_pb2.UserForgotten(user_id="x"))
    future.schema_version = 7
    no_user = new_event("test", interaction=events_pb2.Interaction(item_id="i1"))
    bad: list[tuple[bytes | None, str]] = [
        (b"\x0a\xff\xff garbage", "unparseable"),
        (encode_event(future), "unknown_schema_version"),
        (encode_event(no_user), "missing_field"),
        (None, "empty"),
    ]
    good = [interaction(i) for i in range(20)]
    victim = good[0].interaction.user_id
    producer = make_producer(kafka_broker)
    try:
        # good, bad, good, bad...: offsets 0..: good at even, bad at odd positions
        expected: list[tuple[int, str]] = []
        offset = 0
        for k, event in enumerate(good):
            raw_send(producer, topic, encode_event(event))
            offset += 1
            if k < len(bad):
                raw_send(producer, topic, bad[k][0])
                expected.append((offset, bad[k][1]))
                offset += 1
        settings = service_settings(kafka_broker, topic, dlq, tmp_path)
        with running_service("trainer", tmp_path / "logs", settings=settings) as trainer:
            deadline = time.monotonic() + 120
            reply = status(trainer.address)
            while time.monotonic() < deadline and reply.events_applied < len(good):
                time.sleep(0.1)
                reply = status(trainer.address)
            assert reply.events_applied == len(good)
            assert reply.events_dead_lettered == len(bad)

            # The erasure travels the same way.
            produce_and_wait(
                producer,
                topic,
                [new_event("test", user_forgotten=events_pb2.UserForgotten(user_id=victim))],
            )
            db = tmp_path / "state" / "events.sqlite"
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and log_rows(
                db, f"SELECT COUNT(*) FROM events WHERE user_id = '{victim}'"
            ):
                time.sleep(0.1)
            assert log_rows(db, f"SELECT COUNT(*) FROM events WHERE user_id = '{victim}'") == 0
            assert log_rows(db) == len([e for e in good if e.interaction.user_id != victim])

            # The log commits first; the counters follow on the consumer thread, and the
            # lag gauge at the next lag check (every 0.5 s; a consumer replaced for not
            # fetching reported a lag of 1 until then).
            deadline = time.monotonic() + 30
            body = metrics_text(trainer.metrics_port)
            while time.monotonic() < deadline and not (
                "users_forgotten_total 1.0" in body and "consumer_lag 0.0" in body
            ):
                time.sleep(0.05)
                body = metrics_text(trainer.metrics_port)
            for reason in ("unparseable", "unknown_schema_version", "missing_field", "empty"):
                assert f'coldstart_trainer_events_dead_lettered_total{{reason="{reason}"}}' in body
            assert (
                'coldstart_trainer_events_dead_lettered_total{reason="missing_field"} 1.0' in body
            )
            assert "coldstart_trainer_events_applied_total 20.0" in body
            assert "coldstart_trainer_users_forgotten_total 1.0" in body
            assert "coldstart_trainer_consumer_lag 0.0" in body
            assert trainer.process.poll() is None
            logs = trainer.logs()
    finally:
        producer.close()

    # Every bad message is in the dead-letter topic with its reason and origin.
    reader = KafkaConsumer(
        bootstrap_servers=kafka_broker, auto_offset_reset="earliest", consumer_timeout_ms=5000
    )
    reader.assign([TopicPartition(dlq, 0)])
    letters = [r for r in reader][: len(bad) + 5]
    reader.close()
    got = []
    for record in letters:
        headers = dict(record.headers)
        assert headers["source_topic"].decode() == topic
        got.append((int(headers["source_offset"]), headers["reason"].decode()))
    assert got == expected
    assert letters[0].value == bad[0][0]
    # ... and logged with its offset.
    for offset, reason in expected:
        assert f'"offset": {offset}, "reason": "{reason}"' in logs


def test_status_and_rpc_validation(kafka_broker: str, tmp_path: Path) -> None:
    topic, dlq = topics(kafka_broker, partitions=1)
    settings = {**service_settings(kafka_broker, topic, dlq, tmp_path), "consume": "false"}
    with (
        running_service("trainer", tmp_path / "logs", settings=settings) as trainer,
        grpc.insecure_channel(trainer.address) as channel,
    ):
        stub = trainer_pb2_grpc.TrainerServiceStub(channel)
        reply = stub.GetStatus(trainer_pb2.GetStatusRequest(), timeout=10)
        assert reply.consumer_lag == -1  # not consuming: unknown, not "0 behind"
        assert reply.current_model.version == ""
        assert list(reply.kept_versions) == []
        for request, code, field in [
            (
                trainer_pb2.RollbackRequest(version="../x"),
                grpc.StatusCode.INVALID_ARGUMENT,
                "version",
            ),
            (trainer_pb2.RollbackRequest(version="v1"), grpc.StatusCode.NOT_FOUND, "v1"),
            (trainer_pb2.RollbackRequest(), grpc.StatusCode.FAILED_PRECONDITION, "roll back"),
        ]:
            with pytest.raises(grpc.RpcError) as raised:
                stub.Rollback(request, timeout=10)
            assert raised.value.code() == code
            assert field in (raised.value.details() or "")
        with pytest.raises(grpc.RpcError) as raised:
            stub.TriggerRetrain(trainer_pb2.TriggerRetrainRequest(reason="x" * 500), timeout=10)
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "reason" in (raised.value.details() or "")
        # An empty log and no initial data: the run fails loudly, the service stays up.
        started = stub.TriggerRetrain(trainer_pb2.TriggerRetrainRequest(reason="try"), timeout=10)
        assert started.started and started.run_id
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            reply = stub.GetStatus(trainer_pb2.GetStatusRequest(), timeout=10)
            if reply.last_run.state in ("published", "gated", "failed"):
                break
            time.sleep(0.1)
        assert reply.last_run.run_id == started.run_id
        assert reply.last_run.state == "failed"
        assert "no training rows" in reply.last_run.message
        assert trainer.process.poll() is None

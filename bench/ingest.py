"""`coldstart bench ingest`: the trainer's event log ingestion and retraining.

1. Events per second applied by the trainer's ingest (consumer processes
   polling and handing the raw records over, the log writer decoding them and
   applying one SQLite transaction per poll batch (or group of batches) with
   dedupe and offsets, Kafka commit after it; `--ingest-processes`),
   against a bare kafka-python consume loop over the same events in the same
   run (targets: >= 20,000/s and >= 50% of the bare loop). Both rates are
   timed from the first poll that returns records to the last record.
2. Retraining time on ML-100K with 1 and 2 workers (the configured training
   command, `coldstart train` by default), when that command is in the build.
3. Time from the event that crosses ``retrain_every_events`` (its produce
   acknowledgement) to a new CURRENT in the registry.

Uses a temporary local broker unless ``--bootstrap`` is given.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench.runner import write_results
from services.common.events import make_producer, new_event, produce_and_wait
from services.common.kafka_consumer import make_consumer
from services.common.registry import ModelRegistry
from services.trainer.event_log import EventLog
from services.trainer.ingest import Ingestor, KafkaDeadLetterSink
from services.trainer.retrain import Retrainer, RetrainScheduler
from services.trainer.settings import DEFAULT_TRAIN_COMMAND, TrainerSettings

PARTITIONS = 6
STAND_IN = (
    "{python} -m tests.unit.trainer_service.fake_trainer --data {data} "
    "--registry {registry} --tag {run_id} --workers {workers}"
)


@contextlib.contextmanager
def broker(bootstrap: str, work: Path) -> Iterator[str]:
    if bootstrap:
        yield bootstrap
        return
    from services.common.kafka.local_broker import LocalKafka

    local = LocalKafka(work / "kafka", owned=True)
    try:
        yield local.start(topics=()).bootstrap
    finally:
        local.stop()


def make_topic(bootstrap: str, prefix: str, partitions: int = PARTITIONS) -> str:
    from services.common.kafka.local_broker import Topic, create_topics

    name = f"bench.{prefix}.{uuid.uuid4().hex[:8]}"
    create_topics(bootstrap, (Topic(name, partitions), Topic(f"{name}.dlq", 1)))
    return name


def interactions(n: int, offset: int = 0) -> list[Any]:
    from coldstart.v1 import events_pb2

    return [
        new_event(
            "bench",
            interaction=events_pb2.Interaction(
                user_id=f"u{(offset + i) % 5000}",
                item_id=f"i{(offset + i) % 1682}",
                kind="view",
                value=1.0,
            ),
        )
        for i in range(n)
    ]


def produce(bootstrap: str, topic: str, events: list[Any]) -> float:
    producer = make_producer(bootstrap, client_id="bench-ingest", linger_ms=50, batch_size=1 << 20)
    started = time.perf_counter()
    try:
        for start in range(0, len(events), 5000):
            produce_and_wait(producer, topic, events[start : start + 5000], timeout_s=120)
    finally:
        producer.close()
    return len(events) / (time.perf_counter() - started)


class FirstRecordClock:
    """A consumer proxy that notes when a poll first returned records."""

    def __init__(self, consumer: Any) -> None:
        self.consumer = consumer
        self.first: float | None = None

    def poll(self, *args: Any, **kwargs: Any) -> Any:
        batches = self.consumer.poll(*args, **kwargs)
        if batches and self.first is None:
            self.first = time.perf_counter()
        return batches

    def __getattr__(self, name: str) -> Any:
        return getattr(self.consumer, name)


def bare_loop_rate(bootstrap: str, topic: str, n: int, max_records: int, crcs: bool) -> float:
    from kafka import TopicPartition

    consumer = make_consumer(
        bootstrap,
        f"bench-bare-{uuid.uuid4().hex[:6]}",
        max_poll_records=max_records,
        max_partition_fetch_bytes=4 * 1024 * 1024,
        check_crcs=crcs,
    )
    partitions = [TopicPartition(topic, p) for p in range(PARTITIONS)]
    consumer.assign(partitions)
    consumer.seek_to_beginning(*partitions)
    clock = FirstRecordClock(consumer)
    seen = 0
    deadline = time.monotonic() + 600
    try:
        while seen < n and time.monotonic() < deadline:
            for records in clock.poll(timeout_ms=200, max_records=max_records).values():
                for _record in records:
                    seen += 1
        ended = time.perf_counter()
    finally:
        consumer.close(autocommit=False)
    assert clock.first is not None and seen == n, f"bare loop saw {seen} of {n}"
    return n / (ended - clock.first)


def trainer_rate(
    bootstrap: str,
    topic: str,
    n: int,
    work: Path,
    max_records: int,
    crcs: bool,
    processes: int,
    *,
    timeout_s: float = 180.0,
    log_path: Path | None = None,
) -> float:
    """The service's own ingest (`Ingestor.start`: with ``processes`` consumer
    processes feeding the log writer), timed from
    its first non-empty poll to the moment the n-th event is durable in the log.
    ``log_path``: keep the log there (bench scale exports it afterwards)."""
    import threading

    log = EventLog(log_path or work / f"events-{uuid.uuid4().hex[:6]}.sqlite")
    sink = KafkaDeadLetterSink(bootstrap, f"{topic}.dlq")
    applied = 0
    done = threading.Event()
    ended = 0.0

    def count(result: Any) -> None:
        nonlocal applied, ended
        applied += result.applied
        if applied >= n and not done.is_set():
            ended = time.perf_counter()
            done.set()

    ingestor = Ingestor(
        log,
        bootstrap=bootstrap,
        topic=topic,
        group_id=f"bench-trainer-{uuid.uuid4().hex[:6]}",
        dead_letters=sink,
        max_poll_records=max_records,
        check_crcs=crcs,
        on_applied=count,
        processes=processes,
    )
    ingestor.start()
    try:
        done.wait(timeout=timeout_s)
    finally:
        ingestor.stop()
        sink.close()
        log.close()
    first = ingestor.status.first_records_at
    assert first is not None and done.is_set(), (
        f"trainer applied {applied} of {n}; status {ingestor.status}"
    )
    return n / (ended - first)


TRAIN_EXTRA: list[str] = []  # --train-extra, appended to the training command


def training_command() -> tuple[str, str]:
    """(template, label): `coldstart train` when it is in this build, else the stand-in."""
    extra = " ".join(TRAIN_EXTRA)
    if importlib.util.find_spec("services.trainer.model.train_cli") is not None:
        template = f"{DEFAULT_TRAIN_COMMAND} {extra}".strip()
        return template, f"coldstart train {extra}".strip()
    return STAND_IN, "stand-in (coldstart train not in this build)"


def retrain_rows(work: Path, workers: tuple[int, ...]) -> list[dict[str, Any]]:
    template, label = training_command()
    rows: list[dict[str, Any]] = []
    for n in workers:
        if template == STAND_IN:
            rows.append(
                {"measure": f"retrain ml-100k, {n} worker(s)", "value": None, "unit": "s",
                 "notes": "skipped: coldstart train is not in this build"}
            )  # fmt: skip
            continue
        settings = TrainerSettings(
            log_dir=str(work / f"retrain-{n}"),
            registry_dir=str(work / f"registry-{n}"),
            initial_data="ml-100k",
            workers=n,
            train_command=template,
        )
        log = EventLog(work / f"retrain-{n}" / "events.sqlite")
        retrainer = Retrainer(settings, log, ModelRegistry(work / f"registry-{n}"))
        started = time.perf_counter()
        record = retrainer.run(f"bench {n} workers")
        total = time.perf_counter() - started
        rows.append(
            {
                "measure": f"retrain ml-100k, {n} worker(s)",
                "value": record.candidate_metrics.get("training_seconds"),
                "unit": "s",
                "notes": f"{label}; run {total:.1f}s, {record.state}: {record.message[:80]}",
            }
        )
    return rows


def trigger_to_published(bootstrap: str, work: Path, every: int) -> dict[str, Any]:
    from coldstart.v1 import events_pb2

    template, label = training_command()
    topic = make_topic(bootstrap, "trigger")
    settings = TrainerSettings(
        log_dir=str(work / "trigger"),
        registry_dir=str(work / "trigger-registry"),
        initial_data="" if template == STAND_IN else "ml-100k",
        train_command=template,
        retrain_every_events=every,
        events_topic=topic,
    )
    log = EventLog(work / "trigger" / "events.sqlite")
    registry = ModelRegistry(work / "trigger-registry")
    retrainer = Retrainer(settings, log, registry)
    scheduler = RetrainScheduler(retrainer, every, 0)
    sink = KafkaDeadLetterSink(bootstrap, f"{topic}.dlq")
    ingestor = Ingestor(
        log,
        bootstrap=bootstrap,
        topic=topic,
        group_id=f"bench-trigger-{uuid.uuid4().hex[:6]}",
        dead_letters=sink,
        on_applied=lambda result: scheduler.on_applied(result.applied),
    )
    items = [
        new_event("bench", item_upserted=events_pb2.ItemUpserted(item_id=f"i{n}", text=f"item {n}"))
        for n in range(1682)
    ]
    before = interactions(every - len(items) - 1)
    trigger = interactions(1, offset=every)
    producer = make_producer(bootstrap, client_id="bench-trigger", linger_ms=20)
    scheduler.start()
    ingestor.start()
    try:
        produce_and_wait(producer, topic, items + before, timeout_s=120)
        deadline = time.monotonic() + 120
        while log.counters()["applied"] < every - 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        produce_and_wait(producer, topic, trigger, timeout_s=30)
        acked = time.perf_counter()
        deadline = time.monotonic() + 1800
        while registry.current() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        published = time.perf_counter()
        retrainer.wait(60)
    finally:
        ingestor.stop()
        scheduler.stop()
        producer.close()
        sink.close()
    record = retrainer.last_run()
    ok = registry.current() is not None
    return {
        "measure": "triggering event -> published version",
        "value": published - acked if ok else None,
        "unit": "s",
        "notes": (
            f"{label}; retrain_every_events={every}; training "
            f"{record.candidate_metrics.get('training_seconds') if record else None}s; "
            f"{record.state if record else 'no run'}"
        ),
    }


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="coldstart bench ingest")
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--max-poll-records", type=int, default=5000)
    parser.add_argument(
        "--bootstrap", default="", help="use this broker (default: a temporary one)"
    )
    parser.add_argument("--trigger-events", type=int, default=5000)
    parser.add_argument(
        "--ingest-processes",
        type=int,
        default=TrainerSettings().ingest_processes,
        help="consumer processes of the trainer's ingest (default: the service default)",
    )
    parser.add_argument("--skip-training", action="store_true")
    parser.add_argument(
        "--train-extra",
        default="",
        help='options appended to `coldstart train` (e.g. "--epochs 2"); default: none',
    )
    args = parser.parse_args(argv)
    TRAIN_EXTRA[:] = args.train_extra.split()

    rows: list[dict[str, Any]] = []
    procs = args.ingest_processes
    meta: dict[str, Any] = {
        "events": args.events,
        "partitions": PARTITIONS,
        "ingest_processes": procs,
        "cpus": os.cpu_count(),
    }
    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as tmp:
        work = Path(tmp)
        with broker(args.bootstrap, work) as bootstrap:
            topic = make_topic(bootstrap, "ingest")
            polled = args.max_poll_records
            meta["produce_events_per_s"] = round(
                produce(bootstrap, topic, interactions(args.events))
            )
            crcs = TrainerSettings().check_crcs
            bare: list[float] = []
            applied: list[float] = []
            for _ in range(args.repeats):
                # Alternate so that neither side gets the warmer page cache every time.
                bare.append(bare_loop_rate(bootstrap, topic, args.events, polled, crcs))
                applied.append(
                    trainer_rate(bootstrap, topic, args.events, work, polled, crcs, procs)
                )
            best_bare, best_applied = max(bare), max(applied)
            note = f"check_crcs={crcs} (the service default); ingest_processes={procs}"
            rows.append(
                {"measure": "bare kafka-python consume loop", "value": round(best_bare),
                 "unit": "events/s", "notes": f"{note}; runs: {[round(r) for r in bare]}"}
            )  # fmt: skip
            rows.append(
                {"measure": "trainer ingest (applied to the log)", "value": round(best_applied),
                 "unit": "events/s",
                 "notes": f"{note}; runs: {[round(r) for r in applied]}; "
                 f"{best_applied / best_bare:.0%} of bare; target >= 20000 and >= 50%"}
            )  # fmt: skip
            meta["ingest_ok"] = best_applied >= 20_000 and best_applied >= 0.5 * best_bare
            # The same pair with kafka-python's CRC checks flipped, for reference.
            bare_crc = bare_loop_rate(bootstrap, topic, args.events, polled, not crcs)
            applied_crc = trainer_rate(bootstrap, topic, args.events, work, polled, not crcs, procs)
            rows.append(
                {"measure": "bare kafka-python consume loop", "value": round(bare_crc),
                 "unit": "events/s", "notes": f"check_crcs={not crcs}, one run"}
            )  # fmt: skip
            rows.append(
                {"measure": "trainer ingest (applied to the log)", "value": round(applied_crc),
                 "unit": "events/s",
                 "notes": f"check_crcs={not crcs}, one run; {applied_crc / bare_crc:.0%} of bare"}
            )  # fmt: skip
            if not args.skip_training:
                rows += retrain_rows(work, (1, 2))
                rows.append(trigger_to_published(bootstrap, work, args.trigger_events))
    write_results("ingest", rows, meta)
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main(sys.argv[1:]))

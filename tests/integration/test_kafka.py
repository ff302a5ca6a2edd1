"""A real broker: acks=all production and at-least-once consumption across a SIGKILL."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from coldstart.v1 import events_pb2

from services.common.errors import Unavailable
from services.common.events import make_producer, new_event, produce_and_wait
from services.common.paths import REPO_ROOT

pytestmark = pytest.mark.integration

TOPIC = "test.at-least-once"
EVENTS = 20_000


def start_consumer(bootstrap: str, out: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tests.support.id_consumer",
            "--bootstrap",
            bootstrap,
            "--topic",
            TOPIC,
            "--group",
            "at-least-once",
            "--out",
            str(out),
        ],
        cwd=REPO_ROOT,
    )


def lines(path: Path) -> list[str]:
    return path.read_text().split() if path.exists() else []


def test_sigkilled_consumer_resumes_without_skipping(kafka_broker: str, tmp_path: Path) -> None:
    events = [
        new_event(
            "test",
            interaction=events_pb2.Interaction(
                user_id=f"u{i % 97}", item_id=f"i{i}", kind="view", value=1.0
            ),
        )
        for i in range(EVENTS)
    ]
    produced = {e.event_id for e in events}
    producers = [make_producer(kafka_broker)]
    done = threading.Event()

    def produce() -> None:
        for start in range(0, EVENTS, 1000):
            for _attempt in range(3):
                try:
                    produce_and_wait(
                        producers[-1], TOPIC, events[start : start + 1000], timeout_s=30
                    )
                    break
                except Unavailable:
                    # What any writer does: retry the same events (same ids) on a
                    # fresh producer; duplicates are allowed, losses are not.
                    producers.append(make_producer(kafka_broker))
        done.set()

    out = tmp_path / "seen.txt"
    writer = threading.Thread(target=produce)
    writer.start()
    consumer = start_consumer(kafka_broker, out)
    try:
        deadline = time.monotonic() + 120
        while len(lines(out)) < 3000 and time.monotonic() < deadline:
            if consumer.poll() is not None:  # reached the end before we could kill it
                break
            time.sleep(0.02)
        consumer.kill()  # SIGKILL mid-stream
        consumer.wait(timeout=10)
        seen_before_kill = len(lines(out))
        assert 0 < seen_before_kill < EVENTS
        writer.join(timeout=120)
        assert done.is_set()

        consumer = start_consumer(kafka_broker, out)
        assert consumer.wait(timeout=180) == 0
    finally:
        if consumer.poll() is None:
            consumer.kill()
            consumer.wait(timeout=10)
        for producer in producers:
            producer.close()

    seen = lines(out)
    assert set(seen) == produced  # none skipped, none invented
    assert len(seen) >= EVENTS  # re-deliveries after the kill are allowed

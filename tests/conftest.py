"""Shared fixtures. Integration tests share one real Kafka broker per session."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from services.common.kafka.local_broker import LocalKafka, Topic
from services.common.paths import shared_data_dir

TEST_TOPICS = (
    Topic("coldstart.events", 6),
    Topic("coldstart.events.dlq", 1),
    Topic("test.at-least-once", 4),
)


@pytest.fixture(scope="session")
def kafka_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Bootstrap address of a real single-node broker on free ports."""
    broker = LocalKafka(tmp_path_factory.mktemp("kafka"), owned=True)
    try:
        state = broker.start(topics=TEST_TOPICS)
        yield state.bootstrap
    finally:
        broker.stop()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data; tests that need it skip cleanly when it is absent."""
    root = shared_data_dir()
    if not (root / "ml-100k" / "u.data").exists():
        pytest.skip(f"shared datasets not found at {root}")
    return root

"""The event envelope that travels on the events topic: building, encoding,
decoding with validation, and the Kafka producer settings every service uses
(acks=all). Consumers are built and watched in ``services.common.kafka_consumer``."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable
from typing import Any

from coldstart.v1 import events_pb2
from google.protobuf.message import DecodeError

from services.common.errors import Unavailable

SCHEMA_VERSION = 1
SUPPORTED_SCHEMA_VERSIONS = frozenset({1})
PAYLOAD_KINDS = ("user_registered", "interaction", "item_upserted", "user_forgotten")


class EventDecodeError(ValueError):
    """A message on the topic that cannot be applied. ``reason`` is a short
    machine-friendly tag (used as a metric label and dead-letter header)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


def new_event(
    source: str, *, event_id: str | None = None, timestamp_ms: int | None = None, **payload: Any
) -> events_pb2.Event:
    """Build an Event with exactly one payload, e.g. ``new_event("gateway", interaction=msg)``."""
    if len(payload) != 1 or next(iter(payload)) not in PAYLOAD_KINDS:
        raise ValueError(f"exactly one payload of {PAYLOAD_KINDS} is needed, got {sorted(payload)}")
    return events_pb2.Event(
        event_id=event_id or str(uuid.uuid4()),
        schema_version=SCHEMA_VERSION,
        timestamp_ms=timestamp_ms if timestamp_ms is not None else int(time.time() * 1000),
        source=source,
        **payload,
    )


def event_key(event: events_pb2.Event) -> bytes:
    """Partition key: the user id (so a user's events stay in order), else the item id."""
    kind = event.WhichOneof("payload")
    if kind == "item_upserted":
        return event.item_upserted.item_id.encode()
    if kind is None:
        return b""
    user_id: str = getattr(event, kind).user_id
    return user_id.encode()


def encode_event(event: events_pb2.Event) -> bytes:
    return event.SerializeToString()


def decode_event(data: bytes | None) -> events_pb2.Event:
    """Parse and check an event; raise EventDecodeError naming what is wrong."""
    if not data:
        raise EventDecodeError("empty", "message has no value")
    event = events_pb2.Event()
    try:
        event.ParseFromString(data)
    except DecodeError as exc:
        raise EventDecodeError("unparseable", str(exc)) from None
    if event.schema_version not in SUPPORTED_SCHEMA_VERSIONS:
        raise EventDecodeError("unknown_schema_version", f"schema_version {event.schema_version}")
    if not event.event_id:
        raise EventDecodeError("missing_field", "event_id is empty")
    kind = event.WhichOneof("payload")
    if kind is None:
        raise EventDecodeError("missing_field", "no payload")
    if kind == "item_upserted":
        if not event.item_upserted.item_id:
            raise EventDecodeError("missing_field", "item_upserted.item_id is empty")
    elif not getattr(event, kind).user_id:
        raise EventDecodeError("missing_field", f"{kind}.user_id is empty")
    if kind == "interaction" and not event.interaction.item_id:
        raise EventDecodeError("missing_field", "interaction.item_id is empty")
    return event


def make_producer(bootstrap: str, client_id: str = "coldstart", **overrides: Any) -> Any:
    """A KafkaProducer that only reports success once every in-sync replica has the
    event (acks=all), with idempotence so its own retries cannot duplicate."""
    from kafka import KafkaProducer

    options: dict[str, Any] = {
        "bootstrap_servers": bootstrap,
        "client_id": client_id,
        "acks": "all",
        "enable_idempotence": True,
        "linger_ms": 2,
        "retries": 5,
        "request_timeout_ms": 10_000,
        "max_block_ms": 5_000,
        # The constructor blocks until it reaches a broker (30 s by default);
        # a writer whose broker is down should say so sooner.
        "bootstrap_timeout_ms": 5_000,
    }
    options.update(overrides)
    return KafkaProducer(**options)


def produce_and_wait(
    producer: Any, topic: str, events: Iterable[events_pb2.Event], timeout_s: float = 10.0
) -> None:
    """Send events and block until the broker acknowledged every one.

    Raises Unavailable when the broker cannot be reached or refuses: the caller
    must not acknowledge its own request then.
    """
    from kafka.errors import KafkaError

    try:
        pending = [producer.send(topic, key=event_key(e), value=encode_event(e)) for e in events]
        producer.flush(timeout=timeout_s)
        for future in pending:
            future.get(timeout=timeout_s)
    except KafkaError as exc:
        raise Unavailable(f"event broker unavailable: {type(exc).__name__}") from None

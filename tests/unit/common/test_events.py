from __future__ import annotations

import pytest
from coldstart.v1 import events_pb2

from services.common.events import (
    EventDecodeError,
    decode_event,
    encode_event,
    event_key,
    new_event,
)


def test_round_trip_keeps_envelope_and_payload() -> None:
    event = new_event(
        "test",
        interaction=events_pb2.Interaction(user_id="u1", item_id="i9", kind="click", value=1.0),
    )
    decoded = decode_event(encode_event(event))
    assert decoded == event
    assert decoded.schema_version == 1
    assert len(decoded.event_id) == 36
    assert decoded.timestamp_ms > 1_600_000_000_000
    assert event_key(decoded) == b"u1"


def test_item_events_are_keyed_by_item() -> None:
    event = new_event("test", item_upserted=events_pb2.ItemUpserted(item_id="i1", text="t"))
    assert event_key(event) == b"i1"


def test_new_event_needs_exactly_one_known_payload() -> None:
    with pytest.raises(ValueError, match="exactly one payload"):
        new_event("test")
    with pytest.raises(ValueError, match="exactly one payload"):
        new_event("test", purchase=1)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "empty"),
        (None, "empty"),
        (b"\xff\xff\xff\xff", "unparseable"),
        (
            events_pb2.Event(
                event_id="e",
                schema_version=99,
                user_forgotten=events_pb2.UserForgotten(user_id="u"),
            ).SerializeToString(),
            "unknown_schema_version",
        ),
        (
            events_pb2.Event(
                schema_version=1, user_forgotten=events_pb2.UserForgotten(user_id="u")
            ).SerializeToString(),
            "missing_field",
        ),
        (events_pb2.Event(event_id="e", schema_version=1).SerializeToString(), "missing_field"),
        (
            events_pb2.Event(
                event_id="e", schema_version=1, interaction=events_pb2.Interaction(user_id="u")
            ).SerializeToString(),
            "missing_field",
        ),
        (
            events_pb2.Event(
                event_id="e", schema_version=1, item_upserted=events_pb2.ItemUpserted(text="x")
            ).SerializeToString(),
            "missing_field",
        ),
    ],
)
def test_bad_events_are_refused_with_a_reason(data: bytes | None, reason: str) -> None:
    with pytest.raises(EventDecodeError) as raised:
        decode_event(data)
    assert raised.value.reason == reason

"""Batch decoding: what the log writer makes of the records a consumer hands over.

The consume loop itself (there is one: consumer processes + log writer) is
tested in test_trainer_ingest_procs.py."""

from __future__ import annotations

from dataclasses import dataclass

from coldstart.v1 import events_pb2
from kafka import TopicPartition

from services.common.events import encode_event, new_event
from services.trainer.ingest import columns_of, split_batch, split_columns

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

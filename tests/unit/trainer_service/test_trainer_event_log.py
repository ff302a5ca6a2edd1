"""The SQLite event log: atomic batches, dedupe, offsets, erasure, disk full."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from coldstart.v1 import events_pb2

from services.common.events import encode_event, new_event
from services.trainer.event_log import EventLog, EventLogError, Incoming

TOPIC = "t"


def interaction(user: str, item: str, ts: int, event_id: str | None = None) -> events_pb2.Event:
    return new_event(
        "test",
        event_id=event_id,
        timestamp_ms=ts,
        interaction=events_pb2.Interaction(user_id=user, item_id=item, kind="view", value=1.0),
    )


def forget(user: str, ts: int) -> events_pb2.Event:
    return new_event("test", timestamp_ms=ts, user_forgotten=events_pb2.UserForgotten(user_id=user))


def register(user: str, ts: int) -> events_pb2.Event:
    return new_event(
        "test", timestamp_ms=ts, user_registered=events_pb2.UserRegistered(user_id=user)
    )


def incoming(events: list[events_pb2.Event], partition: int = 0, first: int = 0) -> list[Incoming]:
    return [Incoming(partition, first + i, e, encode_event(e)) for i, e in enumerate(events)]


def ids(log: EventLog) -> list[str]:
    with log.reader() as conn:
        return [r[0] for r in conn.execute("SELECT event_id FROM events ORDER BY seq")]


def users(log: EventLog) -> set[str]:
    with log.reader() as conn:
        return {r[0] for r in conn.execute("SELECT user_id FROM events") if r[0]}


def test_batch_is_applied_with_its_offsets_and_counters(tmp_path: Path) -> None:
    log = EventLog(tmp_path / "log.sqlite")
    events = [interaction("u1", f"i{i}", 1000 + i) for i in range(5)]
    result = log.apply(TOPIC, incoming(events, partition=2, first=40), {2: 45, 3: 7})
    assert result.applied == 5 and result.duplicates == 0
    assert ids(log) == [e.event_id for e in events]
    assert log.stored_offsets(TOPIC) == {2: 45, 3: 7}
    assert log.stored_offsets("other") == {}
    assert log.counters()["applied"] == 5
    # The row keeps where it came from and the raw bytes.
    with log.reader() as conn:
        row = conn.execute(
            "SELECT partition, offset, ts_ms, kind, user_id, item_id, action, value, payload "
            "FROM events WHERE event_id = ?",
            (events[0].event_id,),
        ).fetchone()
    assert row == (2, 40, 1000, "interaction", "u1", "i0", "view", 1.0, None)
    profile = register("u1", 5)
    log.apply(TOPIC, incoming([profile], first=45), {2: 46})
    with log.reader() as conn:
        (payload,) = conn.execute(
            "SELECT payload FROM events WHERE event_id = ?", (profile.event_id,)
        ).fetchone()
    assert payload == encode_event(profile)  # profiles and items keep their raw bytes


def test_replayed_and_repeated_event_ids_are_stored_once(tmp_path: Path) -> None:
    log = EventLog(tmp_path / "log.sqlite")
    events = [interaction("u1", f"i{i}", 1000 + i) for i in range(4)]
    log.apply(TOPIC, incoming(events), {0: 4})
    # A replay of the same batch plus a producer retry inside one batch.
    again = log.apply(TOPIC, incoming([*events, events[1]]), {0: 9})
    assert again.applied == 0 and again.duplicates == 5
    assert ids(log) == [e.event_id for e in events]
    assert log.counters() == {
        "applied": 4,
        "duplicates": 5,
        "dropped_forgotten": 0,
        "forgotten_users": 0,
        "dead_lettered": 0,
    }
    assert log.stored_offsets(TOPIC) == {0: 9}


def test_offsets_and_dead_letters_advance_without_events(tmp_path: Path) -> None:
    log = EventLog(tmp_path / "log.sqlite")
    result = log.apply(TOPIC, [], {1: 3}, dead_lettered=3)
    assert result.dead_lettered == 3
    assert log.stored_offsets(TOPIC) == {1: 3}
    assert log.counters()["dead_lettered"] == 3
    assert log.event_count() == 0


def test_forgetting_deletes_the_user_and_drops_their_later_events(tmp_path: Path) -> None:
    path = tmp_path / "log.sqlite"
    log = EventLog(path)
    log.apply(
        TOPIC,
        incoming(
            [
                interaction("gone", "i1", 100),
                interaction("stays", "i1", 101),
                register("gone", 90),
                interaction("gone", "i2", 102),
            ]
        ),
        {0: 4},
    )
    result = log.apply(
        TOPIC,
        incoming(
            [
                interaction("gone", "i3", 150),  # before the erasure in the same batch: erased
                forget("gone", 200),
                interaction("gone", "i4", 190),  # late, older than the erasure
                interaction("gone", "i5", 300),  # newer but no re-registration yet
            ],
            first=4,
        ),
        {0: 8},
    )
    assert result.forgotten_users == 1 and result.erased == ["gone"]
    assert result.dropped_forgotten == 2
    assert users(log) == {"stays"}
    assert log.forgotten_users() == {"gone"}
    # The tombstone survives a restart.
    log.close()
    log = EventLog(path)
    late = log.apply(TOPIC, incoming([interaction("gone", "i6", 400)], first=8), {0: 9})
    assert late.applied == 0 and late.dropped_forgotten == 1
    assert users(log) == {"stays"}
    # No payload of the user is left in the database file's live pages either.
    with sqlite3.connect(path) as conn:
        assert conn.execute(
            "SELECT COUNT(*) FROM events WHERE payload LIKE '%gone%'"
        ).fetchone() == (0,)


def test_re_registration_after_erasure_starts_a_new_history(tmp_path: Path) -> None:
    log = EventLog(tmp_path / "log.sqlite")
    log.apply(TOPIC, incoming([interaction("u", "old", 100), forget("u", 200)]), {0: 2})
    fresh = [register("u", 300), interaction("u", "new", 310)]
    result = log.apply(
        TOPIC, incoming([register("u", 150), *fresh], first=2), {0: 5}
    )  # the stale registration (older than the erasure) is dropped
    assert result.applied == 2 and result.dropped_forgotten == 1
    with log.reader() as conn:
        assert [
            r[0] for r in conn.execute("SELECT item_id FROM events WHERE kind='interaction'")
        ] == ["new"]
    # A replay of the old erasure must not erase the new history.
    replay = log.apply(TOPIC, incoming([forget("u", 200)], first=5), {0: 6})
    assert replay.forgotten_users == 0 and replay.duplicates == 1
    assert log.event_count() == 2
    # A new erasure does.
    log.apply(TOPIC, incoming([forget("u", 400)], first=6), {0: 7})
    assert log.event_count() == 0


def test_disk_full_applies_nothing_and_raises(tmp_path: Path) -> None:
    path = tmp_path / "log.sqlite"
    log = EventLog(path)
    log.apply(TOPIC, incoming([interaction("u0", "i0", 1)]), {0: 1})
    before_ids, before_offsets = ids(log), log.stored_offsets(TOPIC)
    # Cap the database at its current size: the next big batch cannot fit.
    (pages,) = log._conn.execute("PRAGMA page_count").fetchone()
    log._conn.execute(f"PRAGMA max_page_count = {pages}")
    big = [interaction(f"u{i}", f"item-{i:06d}" * 20, 10 + i) for i in range(2000)]
    with pytest.raises(EventLogError, match="full"):
        log.apply(TOPIC, incoming([*big, forget("u0", 5000)], first=1), {0: 2002})
    assert ids(log) == before_ids
    assert log.stored_offsets(TOPIC) == before_offsets
    assert log.counters()["applied"] == 1
    # The failed batch's erasure did not leak into the in-memory tombstones.
    assert log.forgotten_users() == set()
    log._conn.execute("PRAGMA max_page_count = 1073741823")
    assert log.apply(TOPIC, incoming(big, first=1), {0: 2001}).applied == 2000


def test_unopenable_log_raises_event_log_error(tmp_path: Path) -> None:
    folder = tmp_path / "is-a-folder.sqlite"
    folder.mkdir()
    with pytest.raises(EventLogError, match="cannot open"):
        EventLog(folder)


def test_a_new_log_gets_big_pages_and_an_existing_one_keeps_its_own(tmp_path: Path) -> None:
    """Page size and checkpoint interval are speed settings: a log created by
    an older build (4 KiB pages) opens, keeps its page size and its events."""
    from services.trainer import event_log

    new = EventLog(tmp_path / "new.sqlite")
    new.apply(TOPIC, incoming([interaction("u", "i", 1)]), {0: 1})
    (page,) = new._conn.execute("PRAGMA page_size").fetchone()
    (pages,) = new._conn.execute("PRAGMA wal_autocheckpoint").fetchone()
    assert page == event_log.PAGE_SIZE
    assert pages * page == event_log.WAL_CHECKPOINT_BYTES
    new.close()

    old_path = tmp_path / "old.sqlite"
    conn = sqlite3.connect(old_path)
    conn.execute("PRAGMA page_size = 4096")
    conn.execute("PRAGMA journal_mode=WAL")
    conn.executescript(event_log.SCHEMA)
    conn.close()
    old = EventLog(old_path)
    old.apply(TOPIC, incoming([interaction("u", "i", 1, event_id="a")]), {0: 1})
    old.close()
    old = EventLog(old_path)
    assert old._conn.execute("PRAGMA page_size").fetchone() == (4096,)
    assert old._conn.execute("PRAGMA wal_autocheckpoint").fetchone() == (
        event_log.WAL_CHECKPOINT_BYTES // 4096,
    )
    assert ids(old) == ["a"] and old.stored_offsets(TOPIC) == {0: 1}
    old.close()


def test_a_mixed_batch_keeps_its_order_and_every_kind_its_columns(tmp_path: Path) -> None:
    """Interactions and other events go in with two statements; the log keeps
    the batch's order (seq) and the first of two events with one id."""
    item = new_event(
        "test", event_id="it", item_upserted=events_pb2.ItemUpserted(item_id="i", text="t")
    )
    batch = [
        interaction("u", "i", 1, event_id="a"),
        register("u", 2),
        interaction("u", "j", 3, event_id="b"),
        item,
        interaction("v", "i", 4, event_id="a"),  # same id as the first: ignored
        interaction("u", "k", 5, event_id="c"),
    ]
    log = EventLog(tmp_path / "log.sqlite")
    result = log.apply(TOPIC, incoming(batch), {0: len(batch)})
    assert (result.applied, result.duplicates) == (5, 1)
    with log.reader() as conn:
        rows = conn.execute(
            "SELECT offset, kind, user_id, item_id, action, value, payload IS NOT NULL "
            "FROM events ORDER BY seq"
        ).fetchall()
    assert rows == [
        (0, "interaction", "u", "i", "view", 1.0, 0),
        (1, "user_registered", "u", None, None, None, 1),
        (2, "interaction", "u", "j", "view", 1.0, 0),
        (3, "item_upserted", None, "i", None, None, 1),
        (5, "interaction", "u", "k", "view", 1.0, 0),
    ]
    log.close()

from __future__ import annotations

import base64
import json
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from coldstart.v1 import events_pb2
from kafka import TopicPartition

from services.common import kafka_consumer
from services.common.events import encode_event, new_event
from services.fusion.online_state import (
    CONSUMER_RESTARTS,
    LEGACY_SNAPSHOT_FILE,
    SNAPSHOT_FILE,
    SNAPSHOT_FORMAT,
    EventConsumer,
    ItemEvent,
    UserStore,
    read_snapshot,
    write_snapshot,
)

# Apply, dedupe, forget, the history cap and ratings are the store contract
# (tests/support/state_contract.py, run on every backend by
# test_fusion_state_contract.py and tests/integration/test_fusion_redis_state.py).


def registered(user: str, **kwargs: object) -> events_pb2.Event:
    return new_event("test", user_registered=events_pb2.UserRegistered(user_id=user, **kwargs))  # type: ignore[arg-type]


def interaction(user: str, item: str, kind: str = "view", value: float = 1) -> events_pb2.Event:
    return new_event(
        "test",
        interaction=events_pb2.Interaction(user_id=user, item_id=item, kind=kind, value=value),
    )


def test_interest_text_goes_to_the_encoder_or_stays_unset() -> None:
    without = UserStore()
    without.apply(registered("u", interest_text="space opera"))
    state = without.get("u")
    assert state is not None and state.interest_vector is None

    texts: list[str] = []

    def encode(text: str) -> np.ndarray:
        texts.append(text)
        return np.asarray([0.5, 0.5], dtype=np.float32)

    with_encoder = UserStore(encoder=encode)
    with_encoder.apply(registered("u", interest_text="space opera"))
    state = with_encoder.get("u")
    assert texts == ["space opera"]
    assert state is not None and state.interest_vector is not None


def test_item_events_with_a_vector_reach_the_index_callback() -> None:
    seen: list[ItemEvent] = []
    store = UserStore(on_item=seen.append)
    store.apply(
        new_event(
            "test",
            item_upserted=events_pb2.ItemUpserted(item_id="x", text="X", content_vector=[1.0, 2.0]),
        )
    )
    store.apply(new_event("test", item_upserted=events_pb2.ItemUpserted(item_id="y", text="Y")))
    assert [e.item_id for e in seen] == ["x"]


def test_snapshot_round_trip_keeps_state_and_offsets(tmp_path: Path) -> None:
    store = UserStore()
    store.apply(registered("u", attributes={"age_band": "18-24"}, interest_vector=[0.25, -1.5]))
    seen_before = interaction("u", "a")
    store.apply(seen_before)
    document = {"format": SNAPSHOT_FORMAT, "topic": "t", "offsets": {"0": 7, "1": 3}}
    document.update(UserStore.encode(store.capture()))
    path = tmp_path / "snap" / "state.json"
    write_snapshot(path, document)
    assert [p.name for p in path.parent.iterdir()] == ["state.json"]  # no temp file left

    loaded = read_snapshot(path)
    assert loaded is not None and loaded["offsets"] == {"0": 7, "1": 3}
    restored = UserStore()
    restored.restore(loaded)
    state = restored.get("u")
    assert state is not None
    assert state.recent_item_ids == ("a",)
    assert state.interest_vector is not None and state.interest_vector.tolist() == [0.25, -1.5]
    # Event ids travel with the snapshot, so a replay after restore stays a no-op.
    assert not restored.apply(seen_before)


def test_unreadable_snapshot_means_full_replay(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    path.write_text("{half")
    assert read_snapshot(path) is None
    assert read_snapshot(tmp_path / "absent.json") is None


def test_snapshot_keeps_ratings_and_an_old_snapshot_restores_all_liked(tmp_path: Path) -> None:
    store = UserStore(history_length=3)
    for item, kind, value in (("a", "rating", 1), ("b", "view", 1), ("c", "rating", 4.5)):
        store.apply(interaction("u", item, kind, value))
    store.apply(interaction("v", "x"))
    restored = round_trip(store, tmp_path, history_length=3)
    state = restored.get("u")
    assert state is not None and dict(state.ratings) == {"a": 1.0, "c": 4.5}
    other = restored.get("v")
    assert other is not None and dict(other.ratings) == {}
    # A shorter history keeps the ratings of the ids it keeps only.
    shorter = round_trip(store, tmp_path, history_length=2)
    state = shorter.get("u")
    assert state is not None
    assert state.recent_item_ids == ("b", "c") and dict(state.ratings) == {"c": 4.5}

    # The JSON snapshots (format 1) of before the columnar ones, with and without "g".
    document = legacy_document(
        {"u": {"a": {}, "v": None, "r": ["a", "b", "c"], "t": 5, "g": {"a": 1.0, "c": 4.5}}}
    )
    shorter = UserStore(history_length=2)
    shorter.restore(document)
    state = shorter.get("u")
    assert state is not None
    assert state.recent_item_ids == ("b", "c") and dict(state.ratings) == {"c": 4.5}
    # A snapshot written before ratings were kept: no "g", every item liked as before.
    del document["users"]["u"]["g"]
    old = UserStore(history_length=3)
    old.restore(document)
    state = old.get("u")
    assert state is not None
    assert state.recent_item_ids == ("a", "b", "c") and dict(state.ratings) == {}


def round_trip(store: UserStore, tmp_path: Path, history_length: int = 200) -> UserStore:
    path = tmp_path / "round-trip" / SNAPSHOT_FILE
    write_snapshot(path, {"format": SNAPSHOT_FORMAT, **UserStore.encode(store.capture())})
    loaded = read_snapshot(path)
    assert loaded is not None
    restored = UserStore(history_length=history_length)
    restored.restore(loaded)
    return restored


def legacy_document(users: dict[str, dict[str, object]], **header: object) -> dict[str, Any]:
    """What the JSON writer (format 1) wrote: "v" is base64 of little-endian float32."""
    return {
        "format": 1,
        "topic": "t",
        "offsets": {"0": 4},
        "taken_at_ms": 1,
        "items": [],
        **header,
        "users": users,
        "seen": ["e1", "e2"],
    }


def assert_same_state(left: UserStore, right: UserStore) -> None:
    assert left._users.keys() == right._users.keys()
    for uid, a in left._users.items():
        b = right._users[uid]
        assert dict(a.attributes) == dict(b.attributes), uid
        assert a.recent_item_ids == b.recent_item_ids, uid
        assert a.updated_at_ms == b.updated_at_ms, uid
        assert dict(a.ratings) == dict(b.ratings), uid
        if a.interest_vector is None or not a.interest_vector.size:
            assert b.interest_vector is None, uid
        else:
            assert b.interest_vector is not None and b.interest_vector.dtype == np.float32
            assert np.array_equal(a.interest_vector, b.interest_vector), uid
    assert list(left._seen) == list(right._seen)


def test_columnar_round_trip_rebuilds_every_user_exactly(tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    store = UserStore(history_length=20)
    items = [f"item-{i}" for i in range(40)] + ["ünïcødé ✓", ""]
    for n in range(300):
        user = f"user-{n}" if n % 50 else f"用户-{n}"
        if n % 7:  # some users only ever interacted: no attributes, no vector
            attributes = {"region": ["eu", "us"][n % 2], f"k{n % 5}": str(n % 3)} if n % 3 else {}
            vector = rng.standard_normal(8 if n % 11 else 3).astype(np.float32).tolist()
            store.apply(registered(user, attributes=attributes, interest_vector=vector))
        for _ in range(int(rng.integers(0, 30))):
            kind = ["view", "like", "rating"][int(rng.integers(0, 3))]
            value = float(rng.integers(1, 11)) / 2
            store.apply(interaction(user, items[int(rng.integers(0, len(items)))], kind, value))
    store.apply(registered("no-vector", interest_text="unencoded"))
    store.apply(new_event("test", user_forgotten=events_pb2.UserForgotten(user_id="user-3")))
    assert any(s.ratings for s in store._users.values())

    restored = round_trip(store, tmp_path, history_length=20)
    assert_same_state(store, restored)
    # A replay after the restore is deduplicated as before it.
    assert len(restored._seen) == len(store._seen)

    empty = round_trip(UserStore(), tmp_path)
    assert len(empty) == 0 and not empty._seen


def test_columnar_snapshot_keeps_header_and_leaves_no_temp_file(tmp_path: Path) -> None:
    store = UserStore()
    store.apply(registered("u", interest_vector=[0.25, -1.5]))
    items = [{"id": "x", "text": "X", "attributes": {}, "tags": [], "content": [1.0, 2.0]}]
    document = {"topic": "t", "offsets": {"0": 7}, "taken_at_ms": 9, "items": items}
    document.update(UserStore.encode(store.capture()))
    path = tmp_path / "snap" / SNAPSHOT_FILE
    write_snapshot(path, document)
    assert [p.name for p in path.parent.iterdir()] == [SNAPSHOT_FILE]
    assert path.read_bytes()[:1] != b"{"
    loaded = read_snapshot(path)
    assert loaded is not None
    assert loaded["format"] == SNAPSHOT_FORMAT and loaded["offsets"] == {"0": 7}
    assert loaded["topic"] == "t"
    assert loaded["items"] == items and loaded["taken_at_ms"] == 9


def test_a_json_snapshot_from_before_the_upgrade_is_restored_then_replaced(
    tmp_path: Path,
) -> None:
    vector = base64.b64encode(np.asarray([0.5, 2.0], dtype="<f4").tobytes()).decode()
    document = legacy_document(
        {"u": {"a": {"region": "eu"}, "v": vector, "r": ["a", "b"], "t": 3, "g": {"b": 4.0}}},
        topic="events",
    )
    (tmp_path / LEGACY_SNAPSHOT_FILE).write_text(json.dumps(document))
    path = tmp_path / SNAPSHOT_FILE
    loaded = read_snapshot(path)  # no state.bin yet: the JSON stands in
    assert loaded is not None and loaded["offsets"] == {"0": 4} and loaded["topic"] == "events"
    store = UserStore()
    store.apply(registered("u", interest_vector=[1.0]))
    store.restore(loaded)
    state = store.get("u")
    assert state is not None and dict(state.attributes) == {"region": "eu"}
    assert state.interest_vector is not None and state.interest_vector.tolist() == [0.5, 2.0]
    assert state.recent_item_ids == ("a", "b") and dict(state.ratings) == {"b": 4.0}
    assert list(store._seen) == ["e1", "e2"]

    write_snapshot(path, {"topic": "events", **UserStore.encode(store.capture())})
    assert sorted(p.name for p in tmp_path.iterdir()) == [SNAPSHOT_FILE]
    again = UserStore()
    reloaded = read_snapshot(path)
    assert reloaded is not None
    again.restore(reloaded)
    assert_same_state(store, again)


def test_a_damaged_or_unknown_columnar_snapshot_means_full_replay(tmp_path: Path) -> None:
    store = UserStore()
    store.apply(registered("u", interest_vector=[0.25] * 16))
    store.apply(interaction("u", "a"))
    path = tmp_path / SNAPSHOT_FILE
    write_snapshot(path, UserStore.encode(store.capture()))
    good = path.read_bytes()
    path.write_bytes(good[: len(good) - 9])  # truncated
    assert read_snapshot(path) is None
    path.write_bytes(good[:20])  # the header cut short
    assert read_snapshot(path) is None
    # A code outside its table (flipped bytes that still parse) is caught before restore.
    damaged = bytearray(good)
    header_end = 16 + int.from_bytes(good[8:16], "little")
    header = json.loads(good[16:header_end])
    at = header["arrays"]["item_codes"]["offset"]
    damaged[at : at + 4] = (1000).to_bytes(4, "little")
    path.write_bytes(bytes(damaged))
    assert read_snapshot(path) is None
    # A format this build does not know (a newer one, rolled back): replay, not guess.
    header["format"] = SNAPSHOT_FORMAT + 1
    encoded = json.dumps(header).encode().ljust(header_end - 16)
    path.write_bytes(good[:16] + encoded + good[header_end:])
    assert read_snapshot(path) is None
    path.write_text(json.dumps(legacy_document({}, format=7)))
    assert read_snapshot(path) is None
    path.write_text("[]")
    assert read_snapshot(path) is None


# -- the consumer and its stall guard (fake consumers, no broker) -------------

TOPIC = "events"


class FakeRecord:
    def __init__(self, partition: int, offset: int, value: bytes) -> None:
        self.partition, self.offset, self.key, self.value = partition, offset, b"k", value


class FakeConsumer:
    """An assign()ed KafkaConsumer stand-in over ``log`` (partition -> values).

    ``hang_after``: polls with records before every later poll blocks until
    ``close`` (a poll that never returns); ``dry_after``: polls with records
    before every later poll returns nothing though records are left."""

    def __init__(
        self, log: dict[int, list[bytes]], *, hang_after: int = -1, dry_after: int = -1
    ) -> None:
        self.log = log
        self.hang_after = hang_after
        self.dry_after = dry_after
        self.positions: dict[int, int] = {}
        self.seeks: list[tuple[int, int]] = []
        self.polls_with_records = 0
        self.hanging = threading.Event()
        self.closed = threading.Event()
        self.late: list[FakeRecord] = []  # what a hung poll returns once released

    def partitions_for_topic(self, topic: str) -> set[int]:
        return set(self.log)

    def assign(self, partitions: list[TopicPartition]) -> None:
        self.assigned = list(partitions)

    def assignment(self) -> set[TopicPartition]:
        return set(self.assigned)

    def seek(self, tp: TopicPartition, offset: int) -> None:
        self.seeks.append((tp.partition, offset))
        self.positions[tp.partition] = offset

    def seek_to_beginning(self, tp: TopicPartition) -> None:
        self.seek(tp, 0)

    def position(self, tp: TopicPartition, timeout_ms: int | None = None) -> int:
        return self.positions[tp.partition]

    def end_offsets(
        self, tps: list[TopicPartition], timeout_ms: int | None = None
    ) -> dict[TopicPartition, int]:
        return {tp: len(self.log[tp.partition]) for tp in tps}

    def poll(self, timeout_ms: int) -> dict[TopicPartition, list[FakeRecord]]:
        if 0 <= self.hang_after <= self.polls_with_records:
            self.hanging.set()
            self.closed.wait(30)
            # Returns late, with a batch the abandoned thread must not apply.
            return {TopicPartition(TOPIC, 0): self.late}
        if 0 <= self.dry_after <= self.polls_with_records:
            time.sleep(0.005)
            return {}
        out: dict[TopicPartition, list[FakeRecord]] = {}
        for p, values in self.log.items():
            pos = self.positions[p]
            if pos < len(values):
                out[TopicPartition(TOPIC, p)] = [FakeRecord(p, pos, values[pos])]
                self.positions[p] = pos + 1
        if out:
            self.polls_with_records += 1
        else:
            time.sleep(0.005)
        return out

    def close(self, autocommit: bool = True, timeout_ms: int | None = None) -> None:
        self.closed.set()


def views(user: str, n: int) -> list[bytes]:
    return [encode_event(interaction(user, f"i{k}")) for k in range(n)]


def wait_for(condition: Callable[[], bool], timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)
    return condition()


def consumer_over(
    tmp_path: Path, consumers: list[FakeConsumer], stalled_after_s: float = 0.3
) -> tuple[EventConsumer, UserStore]:
    store = UserStore(history_length=1000)
    made = iter(consumers)
    consumer = EventConsumer(
        store, "unused", TOPIC, tmp_path / "state.json", snapshot_interval_s=60,
        stalled_after_s=stalled_after_s, consumer_factory=lambda: next(made),
    )  # fmt: skip
    return consumer, store


def test_a_poll_that_never_returns_is_abandoned_and_a_new_consumer_reads_on(
    tmp_path: Path,
) -> None:
    """The first consumer hangs in poll after three records; the watchdog counts
    a stall, starts a second consumer at the applied offsets, and the first
    one's late batch (once its close releases it) is never applied."""
    log = {0: views("u", 8), 1: views("v", 2)}
    stuck = FakeConsumer(log, hang_after=3)
    stuck.late = [FakeRecord(0, 99, encode_event(interaction("late", "x")))]
    fresh = FakeConsumer(log)
    consumer, store = consumer_over(tmp_path, [stuck, fresh])
    before = CONSUMER_RESTARTS.labels("stalled")._value.get()
    consumer.start()
    try:
        assert wait_for(lambda: consumer.applied == 10)
        assert stuck.hanging.is_set() and stuck.closed.is_set()
        time.sleep(0.1)  # room for the released poll's thread to (not) apply
    finally:
        consumer.stop()
    assert CONSUMER_RESTARTS.labels("stalled")._value.get() == before + 1
    # Resumed where the store was: three polls had applied offsets 0-2 of p0, 0-1 of p1.
    assert sorted(fresh.seeks) == [(0, 3), (1, 2)]
    state = store.get("u")
    assert state is not None and len(state.recent_item_ids) == 8
    assert store.get("late") is None
    assert consumer.applied == 10
    snapshot = read_snapshot(tmp_path / "state.json")
    assert snapshot is not None and snapshot["offsets"] == {"0": 8, "1": 2}


def test_a_consumer_that_stops_fetching_with_a_backlog_is_replaced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(kafka_consumer, "NOT_FETCHING_AFTER_S", 0.2)
    monkeypatch.setattr(kafka_consumer, "LAG_INTERVAL_S", 0.01)
    log = {0: views("u", 6)}
    dry = FakeConsumer(log, dry_after=2)
    fresh = FakeConsumer(log)
    consumer, _store = consumer_over(tmp_path, [dry, fresh], stalled_after_s=30)
    before = CONSUMER_RESTARTS.labels("not_fetching")._value.get()
    consumer.start()
    try:
        assert wait_for(lambda: consumer.applied == 6)
    finally:
        consumer.stop()
    assert dry.closed.is_set()
    assert fresh.seeks == [(0, 2)]
    assert CONSUMER_RESTARTS.labels("not_fetching")._value.get() == before + 1


def test_a_quiet_topic_is_neither_stalled_nor_not_fetching(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(kafka_consumer, "NOT_FETCHING_AFTER_S", 0.1)
    monkeypatch.setattr(kafka_consumer, "LAG_INTERVAL_S", 0.01)
    log = {0: views("u", 1)}
    only = FakeConsumer(log)
    consumer, _store = consumer_over(tmp_path, [only], stalled_after_s=0.2)
    consumer.start()
    try:
        time.sleep(1.0)  # five stall periods, nothing to read after the first record
    finally:
        consumer.stop()
    assert consumer.applied == 1
    assert only.seeks == [(0, 0)]  # never replaced

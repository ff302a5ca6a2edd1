from __future__ import annotations

from pathlib import Path

import numpy as np
from coldstart.v1 import events_pb2

from services.common.events import new_event
from services.fusion.online_state import (
    SNAPSHOT_FORMAT,
    ItemEvent,
    UserStore,
    read_snapshot,
    write_snapshot,
)


def registered(user: str, **kwargs: object) -> events_pb2.Event:
    return new_event("test", user_registered=events_pb2.UserRegistered(user_id=user, **kwargs))  # type: ignore[arg-type]


def interaction(user: str, item: str, kind: str = "view", value: float = 1) -> events_pb2.Event:
    return new_event(
        "test",
        interaction=events_pb2.Interaction(user_id=user, item_id=item, kind=kind, value=value),
    )


def test_events_build_user_state_and_forgotten_users_leave() -> None:
    store = UserStore(history_length=3)
    assert store.apply(registered("u", attributes={"region": "eu"}, interest_vector=[1.0, 0.0]))
    for item in ("a", "b", "c", "a", "d"):
        store.apply(interaction("u", item))
    state = store.get("u")
    assert state is not None
    assert dict(state.attributes) == {"region": "eu"}
    assert state.interest_vector is not None and state.interest_vector.tolist() == [1.0, 0.0]
    # Bounded, most recent last, a repeat moved to the end rather than duplicated.
    assert state.recent_item_ids == ("c", "a", "d")
    store.apply(new_event("test", user_forgotten=events_pb2.UserForgotten(user_id="u")))
    assert store.get("u") is None


def test_a_replayed_event_id_is_applied_once() -> None:
    store = UserStore()
    event = interaction("u", "a")
    assert store.apply(event)
    store.apply(interaction("u", "b"))
    assert not store.apply(event)
    state = store.get("u")
    assert state is not None and state.recent_item_ids == ("a", "b")


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


def test_ratings_are_kept_for_recent_items_until_another_kind_or_the_cap() -> None:
    store = UserStore(history_length=3)
    store.apply(interaction("u", "a", "rating", 2))
    store.apply(interaction("u", "b", "like"))
    store.apply(interaction("u", "c", "rating", 5))
    state = store.get("u")
    assert state is not None
    # Only ratings have a value; the other kinds are implicit positives.
    assert dict(state.ratings) == {"a": 2.0, "c": 5.0}
    store.apply(interaction("u", "a", "view"))  # a later view: no longer a rating
    store.apply(registered("u", attributes={"region": "eu"}))  # keeps history and ratings
    state = store.get("u")
    assert state is not None
    assert state.recent_item_ids == ("b", "c", "a") and dict(state.ratings) == {"c": 5.0}
    store.apply(interaction("u", "b", "rating", 1))  # the latest rating wins
    store.apply(interaction("u", "d", "rating", 3))
    store.apply(interaction("u", "e"))
    state = store.get("u")
    assert state is not None
    # "c" fell out of the capped history and took its rating with it.
    assert state.recent_item_ids == ("b", "d", "e")
    assert dict(state.ratings) == {"b": 1.0, "d": 3.0}


def test_snapshot_keeps_ratings_and_an_old_snapshot_restores_all_liked() -> None:
    store = UserStore(history_length=3)
    for item, kind, value in (("a", "rating", 1), ("b", "view", 1), ("c", "rating", 4.5)):
        store.apply(interaction("u", item, kind, value))
    store.apply(interaction("v", "x"))
    document = UserStore.encode(store.capture())
    assert document["users"]["u"]["g"] == {"a": 1.0, "c": 4.5}
    assert "g" not in document["users"]["v"]  # no ratings: the old record, unchanged

    restored = UserStore(history_length=3)
    restored.restore(document)
    state = restored.get("u")
    assert state is not None and dict(state.ratings) == {"a": 1.0, "c": 4.5}
    # A shorter history keeps the ratings of the ids it keeps only.
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

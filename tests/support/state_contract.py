"""The online-state store contract: what every ``UserStateStore`` backend does.

Test modules import these functions and provide a ``make_store`` fixture
(``history_length -> a fresh, empty store``): tests/unit/fusion/
test_fusion_state_contract.py runs them on the in-process ``UserStore``,
tests/integration/test_fusion_redis_state.py on ``RedisUserStore`` against a real
redis-server. One set of assertions, so the backends cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from coldstart.v1 import events_pb2

from services.common.events import new_event
from services.fusion.online_state import UserState, UserStateStore

MakeStore = Callable[[int], UserStateStore]


def registered(user: str, **kwargs: object) -> events_pb2.Event:
    return new_event("test", user_registered=events_pb2.UserRegistered(user_id=user, **kwargs))  # type: ignore[arg-type]


def interaction(user: str, item: str, kind: str = "view", value: float = 1) -> events_pb2.Event:
    return new_event(
        "test",
        interaction=events_pb2.Interaction(user_id=user, item_id=item, kind=kind, value=value),
    )


def forgotten(user: str) -> events_pb2.Event:
    return new_event("test", user_forgotten=events_pb2.UserForgotten(user_id=user))


def one(store: UserStateStore, user_id: str) -> UserState | None:
    return store.get_many([user_id])[0]


def test_events_build_user_state_and_forgotten_users_leave(make_store: MakeStore) -> None:
    store = make_store(3)
    assert store.apply(registered("u", attributes={"region": "eu"}, interest_vector=[1.0, 0.0]))
    for item in ("a", "b", "c", "a", "d"):
        store.apply(interaction("u", item))
    state = one(store, "u")
    assert state is not None
    assert dict(state.attributes) == {"region": "eu"}
    assert state.interest_vector is not None and state.interest_vector.tolist() == [1.0, 0.0]
    # Bounded, most recent last, a repeat moved to the end rather than duplicated.
    assert state.recent_item_ids == ("c", "a", "d")
    assert store.apply(forgotten("u"))
    assert one(store, "u") is None
    # A later event starts the user afresh.
    store.apply(interaction("u", "z"))
    state = one(store, "u")
    assert state is not None and state.recent_item_ids == ("z",) and not state.attributes


def test_a_replayed_event_id_is_applied_once(make_store: MakeStore) -> None:
    store = make_store(200)
    event = interaction("u", "a")
    assert store.apply(event)
    store.apply(interaction("u", "b"))
    assert not store.apply(event)  # else "a" would move to the end
    state = one(store, "u")
    assert state is not None and state.recent_item_ids == ("a", "b")
    # Within one batch too, and a batch's duplicate does not stop the rest.
    again = interaction("u", "c")
    assert store.apply_events([again, event, again, interaction("u", "d")]) == 2
    state = one(store, "u")
    assert state is not None and state.recent_item_ids == ("a", "b", "c", "d")


def test_ratings_are_kept_for_recent_items_until_another_kind_or_the_cap(
    make_store: MakeStore,
) -> None:
    store = make_store(3)
    store.apply(interaction("u", "a", "rating", 2))
    store.apply(interaction("u", "b", "like"))
    store.apply(interaction("u", "c", "rating", 5))
    state = one(store, "u")
    assert state is not None
    # Only ratings have a value; the other kinds are implicit positives.
    assert dict(state.ratings) == {"a": 2.0, "c": 5.0}
    store.apply(interaction("u", "a", "view"))  # a later view: no longer a rating
    store.apply(registered("u", attributes={"region": "eu"}))  # keeps history and ratings
    state = one(store, "u")
    assert state is not None
    assert state.recent_item_ids == ("b", "c", "a") and dict(state.ratings) == {"c": 5.0}
    assert dict(state.attributes) == {"region": "eu"}
    store.apply(interaction("u", "b", "rating", 1))  # the latest rating wins
    store.apply(interaction("u", "d", "rating", 3))
    store.apply(interaction("u", "e"))
    state = one(store, "u")
    assert state is not None
    # "c" fell out of the capped history and took its rating with it.
    assert state.recent_item_ids == ("b", "d", "e")
    assert dict(state.ratings) == {"b": 1.0, "d": 3.0}


def test_get_many_answers_in_order_with_none_for_unknown_users(make_store: MakeStore) -> None:
    store = make_store(200)
    assert store.get_many([]) == []
    vector = np.linspace(-1, 1, 384, dtype=np.float32)
    store.apply_events(
        [
            registered("ü-1", attributes={"région": "Zürich", "age_band": ""}),
            interaction("ü-1", "film/ñ"),
            registered("u2", interest_vector=vector.tolist()),
            interaction("u2", "x", "rating", 4.25),
        ]
    )
    first, unknown, second, again = store.get_many(["ü-1", "nobody", "u2", "ü-1"])
    assert unknown is None
    assert first is not None and again is not None
    assert dict(first.attributes) == {"région": "Zürich", "age_band": ""}
    assert first.recent_item_ids == ("film/ñ",) == again.recent_item_ids
    assert first.interest_vector is None
    assert second is not None and second.interest_vector is not None
    # float32 kept exactly (no JSON round trip of the values).
    assert second.interest_vector.dtype == np.float32
    assert np.array_equal(second.interest_vector, vector)
    assert dict(second.ratings) == {"x": 4.25}
    assert second.updated_at_ms > 0


def test_a_long_history_is_capped_at_history_length(make_store: MakeStore) -> None:
    store = make_store(50)
    store.apply_events([interaction("u", f"item-{n}", "rating", n % 5) for n in range(120)])
    state = one(store, "u")
    assert state is not None
    assert state.recent_item_ids == tuple(f"item-{n}" for n in range(70, 120))
    assert dict(state.ratings) == {f"item-{n}": float(n % 5) for n in range(70, 120)}

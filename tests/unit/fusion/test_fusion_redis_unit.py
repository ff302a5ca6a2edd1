"""The Redis backend without a server: the packed value, and what a failing
Redis means for reads and for Recommend. Against a real redis-server:
tests/integration/test_fusion_redis_state.py."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import pytest
import redis
from coldstart.v1 import events_pb2
from prometheus_client import REGISTRY

from services.common.registry import ModelRegistry
from services.common.settings import SettingsError
from services.fusion.core import ModelHolder, Recommender, UserQuery
from services.fusion.model_version import ModelVersion
from services.fusion.online_state import StateUnavailable, UserState
from services.fusion.redis_state import (
    RedisUserStore,
    StateFormatError,
    pack_state,
    unpack_state,
)
from services.fusion.settings import FusionSettings


def errors(op: str) -> float:
    return REGISTRY.get_sample_value("coldstart_fusion_state_errors_total", {"op": op}) or 0.0


def test_a_packed_state_unpacks_to_the_same_state() -> None:
    vector = np.random.default_rng(0).standard_normal(384).astype(np.float32)
    state = UserState(
        attributes={"région": "Zürich", "empty": ""},
        interest_vector=vector,
        recent_item_ids=("a", "ñ/b", "", "c"),
        updated_at_ms=1_700_000_000_123,
        ratings={"ñ/b": 2.5, "c": 4.0},
    )
    version, back = unpack_state(pack_state(state, 7))
    assert version == 7
    assert dict(back.attributes) == dict(state.attributes)
    assert back.recent_item_ids == state.recent_item_ids
    assert dict(back.ratings) == dict(state.ratings)
    assert back.updated_at_ms == state.updated_at_ms
    assert back.interest_vector is not None and np.array_equal(back.interest_vector, vector)
    # Compact: the vector's 1,536 bytes plus a few bytes per item.
    assert len(pack_state(state, 7)) < 384 * 4 + 100

    _, empty = unpack_state(pack_state(UserState(), 1))
    assert empty == UserState(interest_vector=None)


def test_an_id_with_a_nul_is_refused_and_a_damaged_value_is_reported() -> None:
    with pytest.raises(StateFormatError):
        pack_state(UserState(recent_item_ids=("a\x00b",)), 1)
    blob = pack_state(UserState(recent_item_ids=("a", "b")), 1)
    for damaged in (blob[:-1], b"\x09" + blob[1:], blob + b"x", b""):
        with pytest.raises(StateFormatError):
            unpack_state(damaged)


class FailingClient:
    """Stands in for redis.Redis when the server is down."""

    def __init__(self) -> None:
        self.calls = 0

    def register_script(self, _source: str) -> Any:
        return None

    def mget(self, _keys: Sequence[str]) -> list[bytes | None]:
        self.calls += 1
        raise redis.ConnectionError("connection refused")


def test_a_failed_read_is_counted_and_reads_fail_fast_for_a_while() -> None:
    client = FailingClient()
    store = RedisUserStore(client, retry_after_s=60.0)
    before = errors("read")
    with pytest.raises(StateUnavailable):
        store.get_many(["u"])
    with pytest.raises(StateUnavailable):
        store.get_many(["u", "v"])
    assert client.calls == 1  # the second read did not wait on Redis again
    assert errors("read") == before + 2
    assert store.get_many([]) == []


class DownStore:
    history_length = 200

    def get_many(self, user_ids: Sequence[str]) -> list[UserState | None]:
        raise StateUnavailable("down")

    def apply_events(self, events: Iterable[events_pb2.Event]) -> int:
        raise StateUnavailable("down")

    def apply(self, event: events_pb2.Event) -> bool:
        raise StateUnavailable("down")


@pytest.mark.parametrize("max_batch", [1, 8])
def test_recommend_without_its_store_answers_as_a_new_user_flagged_degraded(
    synthetic_registry: ModelRegistry, max_batch: int
) -> None:
    holder = ModelHolder(synthetic_registry, ModelVersion.load)
    core = Recommender(holder, DownStore(), candidates=100, max_batch=max_batch)
    holder.load_initial()
    try:
        result = core.recommend(UserQuery(user_id="u"), 5)
        assert result.degraded and result.new_user and len(result.items) == 5
        # No user id: nothing to read, nothing degraded.
        assert not core.recommend(UserQuery(), 5).degraded
        ranked = core.rank(UserQuery(user_id="u"), ["item-1", "item-2"])
        assert ranked.degraded and len(ranked.items) == 2
    finally:
        core.close()


def test_state_settings_are_checked_by_name() -> None:
    def message(**values: Any) -> str:
        with pytest.raises(SettingsError) as caught:
            FusionSettings(**values).validate()
        return str(caught.value)

    assert message(state_backend="sqlite").startswith("state_backend:")
    assert message(state_backend="redis", redis_url="localhost:6379").startswith("redis_url:")
    assert message(state_writer=True).startswith("state_writer:")
    assert message(state_backend="redis", state_writer=True).startswith("state_writer:")
    assert message(state_backend="redis", redis_timeout_ms=0).startswith("redis_timeout_ms")
    FusionSettings(state_backend="redis").validate()
    FusionSettings(state_backend="redis", state_writer=True, kafka_bootstrap="k:9092").validate()

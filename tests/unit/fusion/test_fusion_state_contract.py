"""The online-state contract (tests/support/state_contract.py) on the in-process
store; tests/integration/test_fusion_redis_state.py runs it on Redis."""

from __future__ import annotations

import pytest

from services.fusion.online_state import UserStore
from tests.support.state_contract import (
    MakeStore,
    test_a_long_history_is_capped_at_history_length,
    test_a_replayed_event_id_is_applied_once,
    test_events_build_user_state_and_forgotten_users_leave,
    test_get_many_answers_in_order_with_none_for_unknown_users,
    test_ratings_are_kept_for_recent_items_until_another_kind_or_the_cap,
)

__all__ = [
    "test_a_long_history_is_capped_at_history_length",
    "test_a_replayed_event_id_is_applied_once",
    "test_events_build_user_state_and_forgotten_users_leave",
    "test_get_many_answers_in_order_with_none_for_unknown_users",
    "test_ratings_are_kept_for_recent_items_until_another_kind_or_the_cap",
]


@pytest.fixture()
def make_store() -> MakeStore:
    return lambda history_length: UserStore(history_length=history_length)

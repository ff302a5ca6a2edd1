"""Freezing the heap after a model swap (services/common/heap.py) leaks nothing
only if a swapped-out version is freed by reference counting alone, i.e. its
object graph holds no reference cycle. These tests would catch one creeping in."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest

from services.common.heap import freeze_long_lived
from services.fusion.core import ModelHolder, Recommender, UserQuery
from services.fusion.model_version import ModelVersion
from services.fusion.online_state import UserStore


@pytest.fixture()
def collector_off() -> Iterator[None]:
    """The collector off for the test; what the test froze is thawed after it (the
    pytest process lives on, and its objects must be collectable at exit)."""
    was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.unfreeze()
        if was_enabled:
            gc.enable()


def test_a_served_version_is_freed_without_the_collector(
    version_path: Path, collector_off: None
) -> None:
    model = ModelVersion.load(version_path)
    holder = SimpleNamespace(current=model)  # not a class: a class is itself a cycle
    core = Recommender(holder, UserStore())  # type: ignore[arg-type]
    first = model.index.meta(0).item_id
    core.recommend(UserQuery(user_id="u", recent_item_ids=[first]), 5)
    version, index = weakref.ref(model), weakref.ref(model.index)
    del holder, core, model
    assert version() is None and index() is None


def test_a_swap_freezes_the_new_version(
    version_path: Path, tmp_path: Path, collector_off: None
) -> None:
    from services.common.registry import ModelRegistry
    from services.fusion.synthetic import publish_version

    registry = ModelRegistry(tmp_path / "registry")
    publish_version(registry, n_items=300, seed=1)
    holder = ModelHolder(registry, ModelVersion.load)
    holder.load_initial()
    before = freeze_long_lived(collect_first=False)
    old = weakref.ref(holder.current)
    publish_version(registry, n_items=300, seed=2)
    assert holder.poll_once()
    assert gc.get_freeze_count() > before  # the new version's objects joined the frozen ones
    assert old() is None  # and the old one, frozen at start, was freed all the same

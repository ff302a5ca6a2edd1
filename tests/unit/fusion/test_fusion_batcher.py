"""Batched Recommend calls against one-at-a-time ones (same answers, one version
per batch) and fusion's batcher metrics; the common micro-batcher itself is
tested in tests/unit/common/test_batcher.py."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import REGISTRY

from services.common.errors import InvalidArgument
from services.common.registry import ModelRegistry
from services.fusion import index as index_module
from services.fusion.core import (
    Filters,
    ItemInput,
    ModelHolder,
    Recommender,
    Result,
    UserQuery,
    _Call,
)
from services.fusion.model_version import ModelVersion
from services.fusion.online_state import UserStore
from services.fusion.synthetic import publish_version
from tests.support.concurrency import run_concurrently


@pytest.fixture()
def registry(tmp_path: Path, version_path: Path) -> ModelRegistry:
    import shutil

    registry = ModelRegistry(tmp_path / "registry")
    registry.versions_dir.mkdir(parents=True)
    shutil.copytree(version_path, registry.path(version_path.name))
    registry.set_current(version_path.name)
    return registry


def make_core(
    registry: ModelRegistry, *, max_batch: int = 1, batch_wait_ms: float = 0.0
) -> Recommender:
    holder = ModelHolder(registry, ModelVersion.load)
    core = Recommender(
        holder, UserStore(), candidates=100, max_batch=max_batch, batch_wait_ms=batch_wait_ms
    )
    holder.load_initial()
    return core


CALLS: list[tuple[UserQuery, int, list[str], Filters | None]] = [
    (UserQuery(), 10, [], None),
    (UserQuery(recent_item_ids=["item-5", "item-17"]), 7, [], None),
    (UserQuery(recent_item_ids=["item-1"]), 5, ["item-2", "ghost"], None),
    (UserQuery(attributes={"age_band": "18-24"}), 12, [], Filters({"category": "c3"}, ["t1"])),
    (UserQuery(recent_item_ids=["item-9"]), 20, [], Filters({}, ["t2"])),
    (UserQuery(), 5, [], Filters({"category": "none"})),  # nothing matches: empty
    (
        UserQuery(attributes={"region": "eu"}, recent_item_ids=[f"item-{i}" for i in range(30)]),
        150,
        [],
        None,
    ),
]


@pytest.mark.parametrize("exact_filter_limit", [20_000, 10], ids=["exact-filters", "ann-filters"])
def test_batched_answers_equal_one_at_a_time_answers(
    registry: ModelRegistry,
    version_path: Path,
    exact_filter_limit: int,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(index_module, "EXACT_FILTER_LIMIT", exact_filter_limit)
    index = ModelVersion.load(version_path).index
    interest = index.content(np.asarray([index.row("item-42")]))[0].tolist()
    calls = [*CALLS, (UserQuery(interest_vector=interest), 8, [], None)] * 3
    alone = make_core(registry)
    batched = make_core(registry, max_batch=16, batch_wait_ms=20.0)
    # Upserted items sit in the exact side buffer, merged with the ANN results.
    fresh = [
        ItemInput(
            f"fresh-{n}",
            (np.asarray(interest) + 0.01 * n).tolist(),
            f"Fresh {n}",
            {"category": "c3"},
            ["t1"],
        )
        for n in range(3)
    ]
    for core in (alone, batched):
        core.upsert_items(fresh)
    expected = [alone.recommend(q, k, ex, f) for q, k, ex, f in calls]
    assert any(i.item_id.startswith("fresh-") for r in expected for i in r.items)
    try:
        got = run_concurrently(calls, lambda call: batched.recommend(*call))
    finally:
        batched.close()
    for want, result in zip(expected, got, strict=True):
        assert isinstance(result, Result)
        assert [i.item_id for i in result.items] == [i.item_id for i in want.items]
        assert [i.reason for i in result.items] == [i.reason for i in want.items]
        assert np.allclose(
            [i.score for i in result.items], [i.score for i in want.items], atol=1e-5
        )
        assert result.new_user == want.new_user
    assert isinstance(got[5], Result) and got[5].items == []


def test_invalid_calls_fail_alone_without_touching_the_batch(registry: ModelRegistry) -> None:
    core = make_core(registry, max_batch=8, batch_wait_ms=20.0)
    try:
        calls: list[tuple[UserQuery, int]] = [
            (UserQuery(), 5),
            (UserQuery(), 0),
            (UserQuery(interest_vector=[1.0]), 5),
            (UserQuery(), 6),
        ]
        results = run_concurrently(calls, lambda call: core.recommend(*call))
    finally:
        core.close()
    assert isinstance(results[1], InvalidArgument) and results[1].field == "k"
    assert isinstance(results[2], InvalidArgument)
    assert results[2].field == "user.interest_vector"
    assert isinstance(results[0], Result) and len(results[0].items) == 5
    assert isinstance(results[3], Result) and len(results[3].items) == 6


def test_one_pass_per_version_when_a_batch_spans_a_swap(registry: ModelRegistry) -> None:
    core = make_core(registry)
    old = core.holder.current
    before = [core._prepare(UserQuery(recent_item_ids=["item-3"]), 5) for _ in range(2)]
    publish_version(registry, n_items=300, seed=7)
    assert core.holder.poll_once()
    new = core.holder.current
    after = [core._prepare(UserQuery(recent_item_ids=["item-3"]), 5) for _ in range(2)]
    mixed = [before[0], after[0], before[1], after[1]]
    results = core._serve(mixed)
    assert all(isinstance(r, Result) for r in results)
    assert [r.model_version for r in results if isinstance(r, Result)] == [
        old.version,
        new.version,
        old.version,
        new.version,
    ]
    for request, result in zip(mixed, results, strict=True):
        alone = core._serve([request])[0]
        assert result == alone


def test_calls_queued_across_a_swap_keep_the_version_they_started_on(
    registry: ModelRegistry,
) -> None:
    core = make_core(registry, max_batch=32, batch_wait_ms=0.0)
    assert core._batcher is not None
    batcher = core._batcher
    serve = batcher._serve
    release = threading.Event()
    batches: list[list[str]] = []

    def held(requests: Sequence[_Call]) -> Sequence[Result | BaseException]:
        if not batches:
            release.wait(10)  # the first batch holds the worker while the others queue
        results = serve(requests)
        batches.append([r.model_version for r in results if isinstance(r, Result)])
        return results

    batcher._serve = held
    results: dict[str, Result] = {}

    def call(name: str) -> None:
        results[name] = core.recommend(UserQuery(recent_item_ids=["item-3"]), 5)

    def start(name: str, queued: int) -> threading.Thread:
        thread = threading.Thread(target=call, args=(name,))
        thread.start()
        deadline = time.monotonic() + 10
        while len(batcher._queue) < queued and time.monotonic() < deadline:
            time.sleep(0.001)
        return thread

    try:
        old = core.holder.current.version
        threads = [start("first", 0)]
        time.sleep(0.05)  # the first call is being served (held)
        threads += [start("old-1", 1), start("old-2", 2)]
        publish_version(registry, n_items=300, seed=7)
        assert core.holder.poll_once()
        new = core.holder.current.version
        threads += [start("new-1", 3), start("new-2", 4)]
        release.set()
        for thread in threads:
            thread.join(timeout=30)
    finally:
        release.set()
        core.close()
    versions = {name: r.model_version for name, r in results.items()}
    assert versions == {
        "first": old,
        "old-1": old,
        "old-2": old,
        "new-1": new,
        "new-2": new,
    }
    assert sorted(batches[1]) == sorted([old, old, new, new])  # one batch, both versions


def test_batched_calls_report_fusions_batch_metrics(registry: ModelRegistry) -> None:
    def count() -> float:
        return REGISTRY.get_sample_value("coldstart_fusion_batch_size_count") or 0.0

    core = make_core(registry, max_batch=8, batch_wait_ms=5.0)
    before = count()
    try:
        results = run_concurrently([UserQuery()] * 4, lambda query: core.recommend(query, 3))
    finally:
        core.close()
    assert all(isinstance(r, Result) for r in results)
    assert 1 <= count() - before <= 4  # one observation per batch served

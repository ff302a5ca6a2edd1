"""The micro-batcher alone (fan-out, deadlines, errors) and batched Recommend
calls against one-at-a-time ones (same answers, one version per batch)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

import numpy as np
import pytest

from services.common.errors import DeadlineExceeded, InvalidArgument, Unavailable
from services.common.registry import ModelRegistry
from services.fusion import index as index_module
from services.fusion.batcher import MicroBatcher
from services.fusion.core import (
    Filters,
    ItemInput,
    ModelHolder,
    Recommender,
    Result,
    UserQuery,
    _Request,
)
from services.fusion.model_version import ModelVersion
from services.fusion.online_state import UserStore
from services.fusion.synthetic import publish_version

C = TypeVar("C")
R = TypeVar("R")


def run_concurrently(calls: Sequence[C], target: Callable[[C], R]) -> list[R | BaseException]:
    """Call ``target(call)`` for every call on its own thread; results (or exceptions) in order."""
    results: list[R | BaseException] = [RuntimeError("not run")] * len(calls)
    start = threading.Barrier(len(calls))

    def one(n: int) -> None:
        start.wait()
        try:
            results[n] = target(calls[n])
        except BaseException as exc:
            results[n] = exc

    threads = [threading.Thread(target=one, args=(n,)) for n in range(len(calls))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    return results


class Recorder:
    """A ``serve`` that records its batches; a slow first batch lets a queue build up."""

    def __init__(self, first_delay_s: float = 0.0) -> None:
        self.batches: list[list[int]] = []
        self.first_delay_s = first_delay_s
        self.lock = threading.Lock()

    def __call__(self, items: Sequence[int]) -> list[int | BaseException]:
        with self.lock:
            first = not self.batches
            self.batches.append(list(items))
        if first:
            time.sleep(self.first_delay_s)
        return [ValueError(f"odd {i}") if i % 7 == 6 else i * 10 for i in items]


def test_results_fan_out_to_their_own_callers_in_batches() -> None:
    recorder = Recorder(first_delay_s=0.1)
    batcher: MicroBatcher[int, int] = MicroBatcher(recorder, wait_s=0.005, max_batch=8)
    try:
        results = run_concurrently(list(range(40)), batcher.submit)
    finally:
        batcher.close()
    for n, result in enumerate(results):
        if n % 7 == 6:  # an exception for one item reaches that caller only
            assert isinstance(result, ValueError) and str(result) == f"odd {n}"
        else:
            assert result == n * 10
    sizes = [len(b) for b in recorder.batches]
    assert sum(sizes) == 40 and max(sizes) <= 8
    assert max(sizes) > 1  # calls that queued behind the slow first batch were served together
    assert sorted(i for b in recorder.batches for i in b) == list(range(40))


def test_a_lone_call_is_served_at_once() -> None:
    batcher: MicroBatcher[int, int] = MicroBatcher(Recorder(), wait_s=5.0, max_batch=32)
    try:
        started = time.monotonic()
        assert batcher.submit(3) == 30
        assert batcher.submit(4) == 40
        assert time.monotonic() - started < 2.0  # no 5 s collection wait for single calls
    finally:
        batcher.close()


def test_expired_requests_are_dropped_not_served() -> None:
    release = threading.Event()
    served: list[int] = []

    def serve(items: Sequence[int]) -> list[int]:
        served.extend(items)
        if items[0] == 0:
            release.wait(10)  # hold the only worker while the others queue and expire
        return list(items)

    batcher: MicroBatcher[int, int] = MicroBatcher(serve, wait_s=0.0, max_batch=8)
    outcomes: dict[int, object] = {}

    def call(item: int, deadline: float | None) -> None:
        try:
            outcomes[item] = batcher.submit(item, deadline)
        except BaseException as exc:
            outcomes[item] = exc

    try:
        first = threading.Thread(target=call, args=(0, None))
        first.start()
        while not served:
            time.sleep(0.001)
        soon = time.monotonic() + 0.05
        threads = [
            threading.Thread(target=call, args=(n, deadline))
            for n, deadline in ((1, soon), (2, soon), (3, None))
        ]
        for thread in threads:
            thread.start()
        threads[0].join(timeout=10)
        threads[1].join(timeout=10)
        # Their callers gave up at the deadline...
        assert isinstance(outcomes[1], DeadlineExceeded)
        assert isinstance(outcomes[2], DeadlineExceeded)
        release.set()
        for thread in (first, threads[2]):
            thread.join(timeout=10)
    finally:
        release.set()
        batcher.close()
    assert outcomes[0] == 0 and outcomes[3] == 3
    assert 1 not in served and 2 not in served  # ...and the batcher never ran them


def test_a_failing_batch_fails_its_callers_and_the_batcher_lives_on() -> None:
    calls = 0

    def serve(items: Sequence[int]) -> list[int]:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("boom")
        return list(items)

    batcher: MicroBatcher[int, int] = MicroBatcher(serve, wait_s=0.0, max_batch=4)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            batcher.submit(1)
        assert batcher.submit(2) == 2
    finally:
        batcher.close()
    with pytest.raises(Unavailable):
        batcher.submit(3)


# -- batched Recommend -----------------------------------------------------------
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

    def held(requests: Sequence[_Request]) -> Sequence[Result | BaseException]:
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

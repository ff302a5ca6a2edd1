"""The common micro-batcher alone (services/common/batcher.py): merging, limits,
deadlines, errors, close; the services' own parts are tested in
tests/unit/encoder/test_enc_batcher.py and tests/unit/fusion/test_fusion_batcher.py."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

import pytest

from services.common.batcher import BatcherMetrics, MicroBatcher, Ticket
from services.common.errors import DeadlineExceeded, ResourceExhausted, Unavailable
from tests.support.concurrency import run_concurrently


class Recorder:
    """A ``serve`` that records its batches; ``hold()`` blocks the next batch inside
    ``serve`` so that later requests queue up behind it."""

    def __init__(self, first_delay_s: float = 0.0) -> None:
        self.batches: list[list[int]] = []
        self.first_delay_s = first_delay_s
        self.lock = threading.Lock()
        self.gate: threading.Event | None = None
        self.started = threading.Event()
        self.fail_with: BaseException | None = None

    def __call__(self, items: Sequence[int]) -> list[int | BaseException]:
        with self.lock:
            first = not self.batches
            self.batches.append(list(items))
        self.started.set()
        if self.gate is not None:
            self.gate.wait(10)
        if first:
            time.sleep(self.first_delay_s)
        if self.fail_with is not None:
            raise self.fail_with
        return [ValueError(f"odd {i}") if i % 7 == 6 else i * 10 for i in items]

    def hold(
        self, batcher: MicroBatcher[int, int], item: int = 100
    ) -> tuple[threading.Event, Ticket]:
        """Block the worker inside a batch of ``item`` alone; (the gate to open, its ticket)."""
        gate = threading.Event()
        self.gate = gate
        self.started.clear()
        ticket = batcher.enqueue(item)
        assert self.started.wait(5)
        return gate, ticket

    @property
    def served(self) -> list[int]:
        return [i for batch in self.batches for i in batch]


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
    assert sorted(recorder.served) == list(range(40))


def test_requests_queued_behind_a_batch_are_served_together() -> None:
    recorder = Recorder()
    batcher: MicroBatcher[int, int] = MicroBatcher(recorder, wait_s=0.05, max_batch=32)
    try:
        gate, first = recorder.hold(batcher)
        tickets = [batcher.enqueue(i) for i in range(6)]
        gate.set()
        assert first.result(5) == 1000
        assert [t.result(5) for t in tickets] == [0, 10, 20, 30, 40, 50]
    finally:
        batcher.close()
    assert recorder.batches == [[100], [0, 1, 2, 3, 4, 5]]


def test_a_batch_stops_at_max_batch_units() -> None:
    recorder = Recorder()
    batcher: MicroBatcher[int, int] = MicroBatcher(recorder, wait_s=0.05, max_batch=3)
    try:
        gate, first = recorder.hold(batcher)
        ones = [batcher.enqueue(i) for i in range(7)]
        gate.set()
        for ticket in [first, *ones]:
            ticket.wait(5)
        assert [len(b) for b in recorder.batches] == [1, 3, 3, 1]
        # Units are the requests' sizes: the first request is always taken, then
        # requests until the batch holds max_batch units.
        gate, first = recorder.hold(batcher)
        big = [batcher.enqueue(i, size=2) for i in (10, 11, 12)] + [batcher.enqueue(13, size=5)]
        gate.set()
        for ticket in [first, *big]:
            ticket.wait(5)
        assert recorder.batches[5:] == [[10, 11], [12, 13]]
    finally:
        batcher.close()


def test_a_lone_caller_is_not_delayed_but_merged_callers_wait_for_company() -> None:
    recorder = Recorder()
    batcher: MicroBatcher[int, int] = MicroBatcher(recorder, wait_s=0.3, max_batch=32)
    try:
        started = time.monotonic()
        assert batcher.submit(3) == 30
        assert batcher.submit(4) == 40
        assert time.monotonic() - started < 0.25  # no collection wait for single calls
        # Two callers together: that batch merged requests ...
        gate, first = recorder.hold(batcher)
        pair = [batcher.enqueue(1), batcher.enqueue(2)]
        gate.set()
        recorder.gate = None
        for ticket in [first, *pair]:
            ticket.wait(5)
        assert recorder.batches[-1] == [1, 2]
        # ... so the next first request waits up to wait_s for company.
        started = time.monotonic()
        batcher.submit(5)
        assert 0.25 <= time.monotonic() - started < 3.0
    finally:
        batcher.close()


def test_expired_requests_are_dropped_not_served() -> None:
    recorder = Recorder()
    dropped: list[str] = []
    batcher: MicroBatcher[int, int] = MicroBatcher(
        recorder, wait_s=0.0, max_batch=8, metrics=BatcherMetrics(dropped=dropped.append)
    )
    try:
        gate, first = recorder.hold(batcher)
        doomed = batcher.enqueue(1, deadline=time.monotonic() + 0.05)
        alive = batcher.enqueue(2, deadline=time.monotonic() + 30)
        time.sleep(0.1)
        gate.set()
        assert first.result(5) == 1000
        with pytest.raises(DeadlineExceeded):
            doomed.result(5)
        assert alive.result(5) == 20
    finally:
        batcher.close()
    assert 1 not in recorder.served and 2 in recorder.served
    assert dropped == ["deadline"]


def test_submit_gives_up_at_the_deadline_and_the_request_is_never_served() -> None:
    recorder = Recorder()
    dropped: list[str] = []
    batcher: MicroBatcher[int, int] = MicroBatcher(
        recorder, wait_s=0.0, max_batch=8, metrics=BatcherMetrics(dropped=dropped.append)
    )
    try:
        gate, first = recorder.hold(batcher)
        started = time.monotonic()
        with pytest.raises(DeadlineExceeded):
            batcher.submit(1, deadline=time.monotonic() + 0.1)
        assert time.monotonic() - started < 2.0
        gate.set()
        first.result(5)
        assert batcher.submit(2) == 20  # the worker moved past the abandoned request
    finally:
        batcher.close()
    assert 1 not in recorder.served
    assert dropped == ["cancelled"]


def test_max_queued_bounds_the_waiting_units() -> None:
    recorder = Recorder()
    dropped: list[str] = []
    queued: list[int] = []
    batcher: MicroBatcher[int, int] = MicroBatcher(
        recorder,
        wait_s=0.0,
        max_batch=8,
        max_queued=5,
        max_queued_setting="max_queued_things",
        metrics=BatcherMetrics(dropped=dropped.append, queued=queued.append),
        name="thing",
    )
    try:
        gate, first = recorder.hold(batcher)
        waiting = batcher.enqueue(1, size=4)
        with pytest.raises(ResourceExhausted, match=r"thing queue full .*max_queued_things 5"):
            batcher.enqueue(2, size=2)
        assert batcher.queued == 4
        gate.set()
        first.result(5)
        assert waiting.result(5) == 10
        assert batcher.queued == 0
        assert batcher.submit(2, size=2) == 20  # room again
    finally:
        batcher.close()
    assert dropped == ["queue_full"]
    assert queued[:3] == [1, 0, 4]  # the held request, taken, then the 4-unit one


def test_a_failing_batch_fails_its_callers_and_the_batcher_lives_on() -> None:
    recorder = Recorder()
    batcher: MicroBatcher[int, int] = MicroBatcher(recorder, wait_s=0.0, max_batch=4)
    try:
        recorder.fail_with = RuntimeError("boom")
        with pytest.raises(RuntimeError, match="boom"):
            batcher.submit(1)
        recorder.fail_with = None
        assert batcher.submit(2) == 20
    finally:
        batcher.close()
    with pytest.raises(Unavailable):
        batcher.submit(3)


def test_a_serve_answering_the_wrong_count_fails_the_batch() -> None:
    batcher: MicroBatcher[int, int] = MicroBatcher(lambda items: [], wait_s=0.0)
    try:
        with pytest.raises(RuntimeError, match="batch of 1 served 0 results"):
            batcher.submit(1)
    finally:
        batcher.close()


@pytest.mark.parametrize("drain", [True, False], ids=["drains", "fails-queued"])
def test_close_serves_or_fails_what_is_queued_and_refuses_new_requests(drain: bool) -> None:
    recorder = Recorder()
    batcher: MicroBatcher[int, int] = MicroBatcher(
        recorder, wait_s=0.0, max_batch=1, drain_on_close=drain
    )
    gate, first = recorder.hold(batcher)
    queued = batcher.enqueue(1)
    closer = threading.Thread(target=batcher.close)
    closer.start()
    time.sleep(0.05)
    with pytest.raises(Unavailable, match="batcher is shutting down"):
        batcher.submit(2)
    gate.set()
    closer.join(5)
    assert first.result(5) == 1000  # the batch in progress finishes either way
    if drain:
        assert queued.result(5) == 10
    else:
        with pytest.raises(Unavailable):
            queued.result(5)
        assert 1 not in recorder.served


def test_workers_serve_batches_side_by_side_and_report_batch_sizes() -> None:
    both = threading.Barrier(2, timeout=5)
    sizes: list[int] = []

    def serve(items: Sequence[int]) -> list[int]:
        both.wait()  # passes only when two batches are being served at once
        return list(items)

    batcher: MicroBatcher[int, int] = MicroBatcher(
        serve, wait_s=0.0, max_batch=1, workers=2, metrics=BatcherMetrics(batch=sizes.append)
    )
    try:
        assert run_concurrently([1, 2], batcher.submit) == [1, 2]
    finally:
        batcher.close()
    assert sizes == [1, 1]


def test_max_batch_and_workers_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_batch and workers"):
        MicroBatcher(list, max_batch=0)

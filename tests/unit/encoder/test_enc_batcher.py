from __future__ import annotations

import threading
import time
from concurrent.futures import Future

import numpy as np
import pytest

from services.common.errors import DeadlineExceeded, ResourceExhausted, Unavailable
from services.encoder.batcher import Batcher
from tests.unit.encoder.conftest import FakeModel


def _gate_first_run(model: FakeModel, batcher: Batcher) -> tuple[threading.Event, Future]:
    """Block the worker inside a first run so that the next requests queue up."""
    gate = threading.Event()
    model.gate = gate
    model.started.clear()
    first = batcher.submit(["blocker"])
    assert model.started.wait(5)
    return gate, first


def test_results_come_back_in_request_order(fake_model: FakeModel) -> None:
    batcher = Batcher(fake_model, max_batch=4, max_wait_s=0.0)
    try:
        texts = [f"text {i}" for i in range(10)]
        vectors = batcher.embed(texts)
        expected = np.stack([FakeModel.vector(t) for t in texts])
        np.testing.assert_allclose(vectors, expected)
    finally:
        batcher.close()


def test_queued_requests_are_merged_into_one_run(fake_model: FakeModel) -> None:
    batcher = Batcher(fake_model, max_batch=32, max_wait_s=0.05)
    try:
        gate, first = _gate_first_run(fake_model, batcher)
        futures = [batcher.submit([f"t{i}"]) for i in range(8)]
        gate.set()
        first.result(5)
        results = [f.result(5) for f in futures]
        for i, vectors in enumerate(results):
            np.testing.assert_allclose(vectors[0], FakeModel.vector(f"t{i}"))
        # The blocker ran alone; the eight queued requests ran together.
        assert fake_model.runs[0] == ["blocker"]
        assert sorted(fake_model.runs[1]) == sorted(f"t{i}" for i in range(8))
        assert len(fake_model.runs) == 2
    finally:
        batcher.close()


def test_a_run_stops_taking_requests_at_max_batch(fake_model: FakeModel) -> None:
    batcher = Batcher(fake_model, max_batch=3, max_wait_s=0.05)
    try:
        gate, first = _gate_first_run(fake_model, batcher)
        futures = [batcher.submit([f"t{i}"]) for i in range(7)]
        gate.set()
        for f in [first, *futures]:
            f.result(5)
        assert [len(r) for r in fake_model.runs] == [1, 3, 3, 1]
    finally:
        batcher.close()


def test_batching_off_runs_each_request_alone(fake_model: FakeModel) -> None:
    batcher = Batcher(fake_model, max_batch=32, max_wait_s=0.05, batching=False)
    try:
        gate, first = _gate_first_run(fake_model, batcher)
        futures = [batcher.submit([f"t{i}", f"u{i}"]) for i in range(4)]
        gate.set()
        for f in [first, *futures]:
            f.result(5)
        assert [len(r) for r in fake_model.runs] == [1, 2, 2, 2, 2]
    finally:
        batcher.close()


def test_a_lone_caller_is_not_delayed_but_merged_callers_wait_for_company(
    fake_model: FakeModel,
) -> None:
    batcher = Batcher(fake_model, max_batch=32, max_wait_s=0.3)
    try:
        started = time.monotonic()
        batcher.embed(["alone"])
        assert time.monotonic() - started < 0.25
        # Two callers together: that run merged requests ...
        gate, first = _gate_first_run(fake_model, batcher)
        pair = [batcher.submit(["p1"]), batcher.submit(["p2"])]
        gate.set()
        fake_model.gate = None
        for f in [first, *pair]:
            f.result(5)
        assert sorted(fake_model.runs[-1]) == ["p1", "p2"]
        # ... so the next first request waits up to max_wait for company.
        started = time.monotonic()
        batcher.embed(["next"])
        waited = time.monotonic() - started
        assert 0.25 <= waited < 3.0
    finally:
        batcher.close()


def test_duplicate_texts_are_computed_once_per_run(fake_model: FakeModel) -> None:
    batcher = Batcher(fake_model, max_batch=32, max_wait_s=0.05)
    try:
        gate, first = _gate_first_run(fake_model, batcher)
        a = batcher.submit(["same", "other", "same"])
        b = batcher.submit(["same"])
        gate.set()
        first.result(5)
        va, vb = a.result(5), b.result(5)
        assert sorted(fake_model.runs[1]) == ["other", "same"]
        np.testing.assert_allclose(va[0], va[2])
        np.testing.assert_allclose(va[0], vb[0])
    finally:
        batcher.close()


def test_request_whose_deadline_passes_while_queued_is_dropped_not_computed(
    fake_model: FakeModel,
) -> None:
    batcher = Batcher(fake_model, max_batch=32, max_wait_s=0.0)
    try:
        gate, first = _gate_first_run(fake_model, batcher)
        doomed = batcher.submit(["doomed"], deadline=time.monotonic() + 0.05)
        alive = batcher.submit(["alive"], deadline=time.monotonic() + 30)
        time.sleep(0.1)
        gate.set()
        first.result(5)
        with pytest.raises(DeadlineExceeded):
            doomed.result(5)
        assert alive.result(5).shape == (1, 4)
        computed = [t for run in fake_model.runs for t in run]
        assert "doomed" not in computed
        assert "alive" in computed
    finally:
        batcher.close()


def test_embed_raises_deadline_exceeded_and_the_text_is_never_computed(
    fake_model: FakeModel,
) -> None:
    batcher = Batcher(fake_model, max_batch=32, max_wait_s=0.0)
    try:
        gate, first = _gate_first_run(fake_model, batcher)
        started = time.monotonic()
        with pytest.raises(DeadlineExceeded):
            batcher.embed(["late"], deadline=time.monotonic() + 0.1)
        assert time.monotonic() - started < 2.0
        gate.set()
        first.result(5)
        batcher.embed(["next"])  # the worker moved past the cancelled request
        assert "late" not in [t for run in fake_model.runs for t in run]
    finally:
        batcher.close()


def test_queue_full_is_resource_exhausted(fake_model: FakeModel) -> None:
    batcher = Batcher(fake_model, max_batch=4, max_wait_s=0.0, max_queued_texts=5)
    try:
        gate, first = _gate_first_run(fake_model, batcher)
        queued = batcher.submit(["a", "b", "c", "d"])
        with pytest.raises(ResourceExhausted, match="max_queued_texts 5"):
            batcher.submit(["e", "f"])
        gate.set()
        first.result(5)
        queued.result(5)
        assert batcher.queued_texts == 0
        batcher.embed(["e", "f"])  # room again
    finally:
        batcher.close()


def test_model_errors_reach_every_caller_of_the_run(fake_model: FakeModel) -> None:
    batcher = Batcher(fake_model, max_batch=32, max_wait_s=0.0)
    try:
        fake_model.fail_with = RuntimeError("boom")
        with pytest.raises(RuntimeError, match="boom"):
            batcher.embed(["x"])
        fake_model.fail_with = None
        assert batcher.embed(["y"]).shape == (1, 4)  # the worker survived
    finally:
        batcher.close()


def test_close_fails_queued_requests_and_refuses_new_ones(fake_model: FakeModel) -> None:
    batcher = Batcher(fake_model, max_batch=1, max_wait_s=0.0)
    gate, first = _gate_first_run(fake_model, batcher)
    queued = batcher.submit(["queued"])
    closer = threading.Thread(target=batcher.close)
    closer.start()
    time.sleep(0.05)
    gate.set()
    closer.join(5)
    assert first.result(5).shape == (1, 4)
    with pytest.raises(Unavailable):
        queued.result(5)
    with pytest.raises(Unavailable):
        batcher.submit(["after"])

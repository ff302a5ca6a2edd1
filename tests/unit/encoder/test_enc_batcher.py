"""The encoder's part of batching: texts as units, de-duplication, batching off,
the queue bound in texts, model errors, close failing what is queued. Merging,
the collection wait and deadlines are the common batcher's
(tests/unit/common/test_batcher.py)."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from prometheus_client import REGISTRY

from services.common.batcher import Ticket
from services.common.errors import DeadlineExceeded, ResourceExhausted, Unavailable
from services.encoder.batcher import Batcher
from tests.unit.encoder.conftest import FakeModel


def _sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def _gate_first_run(model: FakeModel, batcher: Batcher) -> tuple[threading.Event, Ticket]:
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


def test_queued_requests_merge_into_one_run_up_to_max_batch_texts(
    fake_model: FakeModel,
) -> None:
    batcher = Batcher(fake_model, max_batch=4, max_wait_s=0.05)
    try:
        gate, first = _gate_first_run(fake_model, batcher)
        futures = [batcher.submit([f"t{i}", f"u{i}"]) for i in range(4)]
        gate.set()
        first.result(5)
        for i, future in enumerate(futures):
            vectors = future.result(5)
            np.testing.assert_allclose(vectors[0], FakeModel.vector(f"t{i}"))
            np.testing.assert_allclose(vectors[1], FakeModel.vector(f"u{i}"))
        # max_batch counts texts: two 2-text requests per run.
        assert [len(r) for r in fake_model.runs] == [1, 4, 4]
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


def test_embed_raises_deadline_exceeded_and_the_text_is_never_computed(
    fake_model: FakeModel,
) -> None:
    before = _sample("coldstart_encoder_dropped_requests_total", reason="cancelled")
    batcher = Batcher(fake_model, max_batch=32, max_wait_s=0.0)
    try:
        gate, first = _gate_first_run(fake_model, batcher)
        with pytest.raises(DeadlineExceeded):
            batcher.embed(["late"], deadline=time.monotonic() + 0.1)
        gate.set()
        first.result(5)
        batcher.embed(["next"])  # the worker moved past the abandoned request
        assert "late" not in [t for run in fake_model.runs for t in run]
    finally:
        batcher.close()
    assert _sample("coldstart_encoder_dropped_requests_total", reason="cancelled") == before + 1


def test_queue_full_is_resource_exhausted_counting_texts(fake_model: FakeModel) -> None:
    batcher = Batcher(fake_model, max_batch=4, max_wait_s=0.0, max_queued_texts=5)
    try:
        gate, first = _gate_first_run(fake_model, batcher)
        queued = batcher.submit(["a", "b", "c", "d"])
        assert batcher.queued_texts == 4
        assert _sample("coldstart_encoder_queued_texts") == 4
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
    with pytest.raises(Unavailable, match="encoder is shutting down"):
        queued.result(5)
    with pytest.raises(Unavailable):
        batcher.submit(["after"])
    assert "queued" not in [t for run in fake_model.runs for t in run]

from __future__ import annotations

import time
from collections.abc import Iterator

import numpy as np
import pytest

from services.common.errors import DeadlineExceeded, InvalidArgument
from services.encoder.core import EncoderCore
from services.encoder.settings import EncoderSettings
from tests.unit.encoder.conftest import FakeModel


@pytest.fixture
def core(fake_model: FakeModel) -> Iterator[EncoderCore]:
    settings = EncoderSettings(
        max_texts_per_request=4, max_text_bytes=16, max_wait_ms=0.0, cache_size=100
    )
    core = EncoderCore(fake_model, settings)
    try:
        yield core
    finally:
        core.close()


@pytest.mark.parametrize(
    ("texts", "field", "words"),
    [
        ([], "texts", "at least 1"),
        (["a"] * 5, "texts", "max_texts_per_request"),
        (["ok", "x" * 17], "texts[1]", "max_text_bytes"),
        (["é" * 9], "texts[0]", "18 bytes"),  # 9 characters, 18 UTF-8 bytes
        (["ok", ""], "texts[1]", "empty"),
        (["  \n\t"], "texts[0]", "whitespace"),
    ],
)
def test_bad_requests_are_invalid_argument_naming_field_and_limit(
    core: EncoderCore, texts: list[str], field: str, words: str
) -> None:
    with pytest.raises(InvalidArgument) as raised:
        core.embed(texts)
    assert raised.value.field == field
    assert words in raised.value.message


def test_limits_are_inclusive(core: EncoderCore) -> None:
    vectors = core.embed(["x" * 16, "é" * 8, "a", "b"])
    assert vectors.shape == (4, 4)


def test_vectors_in_request_order_and_repeats_hit_the_cache(
    core: EncoderCore, fake_model: FakeModel
) -> None:
    first = core.embed(["a", "b", "a"])
    np.testing.assert_allclose(first[0], FakeModel.vector("a"))
    np.testing.assert_allclose(first[1], FakeModel.vector("b"))
    np.testing.assert_allclose(first[2], FakeModel.vector("a"))
    assert fake_model.runs[-1] == ["a", "b"]  # the duplicate went once
    runs = len(fake_model.runs)
    again = core.embed(["b", "a", "c"])
    assert fake_model.runs[-1] == ["c"]  # only the new text reached the model
    assert len(fake_model.runs) == runs + 1
    np.testing.assert_allclose(again[:2], first[[1, 0]])
    core.embed(["a", "b"])
    assert len(fake_model.runs) == runs + 1  # all hits: no model run


def test_answers_are_not_views_of_the_cache(core: EncoderCore) -> None:
    out = core.embed(["a"])
    out[0, :] = 0
    np.testing.assert_allclose(core.embed(["a"])[0], FakeModel.vector("a"))


def test_a_deadline_already_past_is_refused_before_queueing(
    core: EncoderCore, fake_model: FakeModel
) -> None:
    with pytest.raises(DeadlineExceeded):
        core.embed(["late"], deadline=time.monotonic() - 0.001)
    assert all("late" not in run for run in fake_model.runs)


def test_warmup_runs_the_model(core: EncoderCore, fake_model: FakeModel) -> None:
    core.warmup()
    assert fake_model.runs
    assert core.model_id == "fake@00000000"
    assert core.dimension == 4

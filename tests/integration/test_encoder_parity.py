"""ONNX export vs the torch (transformers) model on 1,000 real texts
(MovieLens titles and genres when ../shared/data is present, a generated set
otherwise): fp32 must match each vector (cosine >= 0.9999), INT8 on average
(mean cosine >= 0.98)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from services.encoder.export import DEFAULT_INT8_SCHEME, cached_export, cosines
from services.encoder.hf_model import TorchTextModel
from services.encoder.runtime import OnnxTextModel
from services.encoder.texts import sample_texts

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="session")
def minilm_export() -> Path:
    """The default model exported once (fp32 + INT8), cached under .cache by its hash."""
    return cached_export(int8=True, int8_scheme=DEFAULT_INT8_SCHEME)


@pytest.fixture(scope="module")
def texts_and_reference() -> tuple[list[str], np.ndarray]:
    texts, _source = sample_texts(1000)
    assert len(texts) == 1000
    reference = TorchTextModel().encode(texts, batch_size=64)
    return texts, reference


def test_onnx_fp32_matches_torch_for_every_text(
    minilm_export: Path, texts_and_reference: tuple[list[str], np.ndarray]
) -> None:
    texts, reference = texts_and_reference
    model = OnnxTextModel(minilm_export, provider="cpu")
    assert model.dimension == reference.shape[1] == 384
    got = model.embed(texts, 32)
    cos = cosines(got, reference)
    worst = int(cos.argmin())
    assert cos.min() >= 0.9999, f"cosine {cos[worst]:.6f} on {texts[worst]!r}"
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


def test_onnx_int8_mean_cosine(
    minilm_export: Path, texts_and_reference: tuple[list[str], np.ndarray]
) -> None:
    texts, reference = texts_and_reference
    model = OnnxTextModel(minilm_export, int8=True, provider="cpu")
    cos = cosines(model.embed(texts, 32), reference)
    assert cos.mean() >= 0.98, f"mean cosine {cos.mean():.4f} (min {cos.min():.4f})"
    assert cos.min() >= 0.95


def test_batch_size_does_not_change_the_vectors(minilm_export: Path) -> None:
    texts, _ = sample_texts(1000)
    model = OnnxTextModel(minilm_export, provider="cpu")
    sample = texts[:40]
    one_by_one = np.concatenate([model.embed([t], 1) for t in sample])
    np.testing.assert_allclose(model.embed(sample, 32), one_by_one, atol=2e-5)

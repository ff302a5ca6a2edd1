from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from tests.unit.encoder.tiny_model import make_tiny_export


class FakeModel:
    """Deterministic 'vectors' (a hash of the text), recording every run."""

    def __init__(self, dimension: int = 4, delay_s: float = 0.0) -> None:
        self._dimension = dimension
        self.delay_s = delay_s
        self.runs: list[list[str]] = []
        self.gate: threading.Event | None = None
        self.started = threading.Event()
        self.fail_with: Exception | None = None
        self.model_id = "fake@00000000"

    @property
    def dimension(self) -> int:
        return self._dimension

    @staticmethod
    def vector(text: str, dimension: int = 4) -> np.ndarray:
        rng = np.random.default_rng(abs(hash(text)) % (2**32))
        v = rng.standard_normal(dimension).astype(np.float32)
        return v / np.linalg.norm(v)

    def embed(self, texts: Sequence[str], batch_size: int) -> np.ndarray:
        self.runs.append(list(texts))
        self.started.set()
        if self.gate is not None:
            self.gate.wait(10)
        if self.delay_s:
            time.sleep(self.delay_s)
        if self.fail_with is not None:
            raise self.fail_with
        return np.stack([self.vector(t, self._dimension) for t in texts])


@pytest.fixture
def fake_model() -> FakeModel:
    return FakeModel()


@pytest.fixture(scope="session")
def tiny_export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny BERT exported with fp32 + per-channel INT8 (a few seconds)."""
    return make_tiny_export(tmp_path_factory.mktemp("tiny-encoder"))

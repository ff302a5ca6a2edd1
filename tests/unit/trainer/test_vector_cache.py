"""The on-disk text-vector cache: a hit needs the same model, version and texts."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from services.trainer.data.vectors import EmbedderSpec, cached_vectors


def counting_spec(name: str, version: str | None, calls: list[str]) -> EmbedderSpec:
    def load() -> object:
        def encode(texts: list[str]) -> np.ndarray:
            calls.append(name)
            return np.full((len(texts), 4), float(len(calls)), dtype=np.float32)

        return encode

    return EmbedderSpec(name, load, (lambda: version) if version else None)  # type: ignore[arg-type]


def test_same_spec_and_texts_hit_the_cache(tmp_path: Path) -> None:
    calls: list[str] = []
    spec = counting_spec("m", "v1", calls)
    first = cached_vectors(["a", "b"], spec, tmp_path)
    again = cached_vectors(["a", "b"], spec, tmp_path)
    assert calls == ["m"]
    np.testing.assert_array_equal(first, again)


def test_a_new_export_version_misses_the_old_vectors(tmp_path: Path) -> None:
    # Re-exporting with another INT8 scheme changes the vectors: the key must change.
    calls: list[str] = []
    cached_vectors(["a"], counting_spec("m", "v1", calls), tmp_path)
    cached_vectors(["a"], counting_spec("m", "v2", calls), tmp_path)
    cached_vectors(["b"], counting_spec("m", "v2", calls), tmp_path)
    assert len(calls) == 3

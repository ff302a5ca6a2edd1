from __future__ import annotations

import numpy as np
import pytest

from services.encoder.cache import VectorCache, text_key


def _vectors(n: int) -> np.ndarray:
    return np.arange(n * 3, dtype=np.float32).reshape(n, 3)


def test_hits_misses_and_lru_eviction() -> None:
    cache = VectorCache(2)
    a, b, c = text_key("a"), text_key("b"), text_key("c")
    assert cache.get_many([a]) == [None]
    cache.put_many([a, b], _vectors(2))
    found = cache.get_many([a, b])
    assert all(v is not None for v in found)
    # "a" was used after "b"... then "b" again: "a" is now the least recent.
    cache.get_many([b])
    cache.put_many([c], _vectors(1))
    assert len(cache) == 2
    assert cache.get_many([a]) == [None]
    assert cache.get_many([b])[0] is not None
    assert cache.get_many([c])[0] is not None
    assert cache.hits == 5
    assert cache.misses == 2


def test_stored_vectors_are_copies_and_read_only() -> None:
    cache = VectorCache(4)
    source = _vectors(1)
    cache.put_many([text_key("x")], source)
    source[0, 0] = 99.0
    (stored,) = cache.get_many([text_key("x")])
    assert stored is not None
    assert stored[0] == 0.0
    with pytest.raises(ValueError):
        stored[0] = 1.0


def test_capacity_zero_disables_the_cache() -> None:
    cache = VectorCache(0)
    cache.put_many([text_key("x")], _vectors(1))
    assert cache.get_many([text_key("x")]) == [None]
    assert len(cache) == 0


def test_keys_are_fixed_size_hashes_of_the_text() -> None:
    assert len(text_key("a" * 10_000)) == 16
    assert text_key("café") != text_key("cafe")
    assert text_key("same") == text_key("same")

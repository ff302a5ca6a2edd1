"""An LRU cache of vectors keyed by a hash of the text.

The key is a 16-byte BLAKE2b digest of the UTF-8 text, so a long text costs
the same memory as a short one and the cache never holds user text. Stored
vectors are read-only arrays: a caller cannot change what the next one gets.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np


def text_key(text: str) -> bytes:
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()


class VectorCache:
    """Thread-safe LRU map text-hash -> vector; ``capacity`` 0 disables it."""

    def __init__(self, capacity: int) -> None:
        if capacity < 0:
            raise ValueError(f"capacity must be >= 0, got {capacity}")
        self.capacity = capacity
        self._entries: OrderedDict[bytes, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get_many(self, keys: Sequence[bytes]) -> list[np.ndarray | None]:
        """The cached vector for each key, or None; hits become most recent."""
        if self.capacity == 0:
            self.misses += len(keys)
            return [None] * len(keys)
        found: list[np.ndarray | None] = []
        with self._lock:
            for key in keys:
                vector = self._entries.get(key)
                if vector is not None:
                    self._entries.move_to_end(key)
                    self.hits += 1
                else:
                    self.misses += 1
                found.append(vector)
        return found

    def put_many(self, keys: Sequence[bytes], vectors: np.ndarray) -> None:
        if self.capacity == 0:
            return
        with self._lock:
            for key, row in zip(keys, vectors, strict=True):
                stored = np.array(row, dtype=np.float32, copy=True)
                stored.setflags(write=False)
                self._entries[key] = stored
                self._entries.move_to_end(key)
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)

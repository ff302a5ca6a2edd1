"""The encoder's domain logic, free of gRPC: validate a request, answer repeats
from the cache, send the rest through the batcher, assemble the answer."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Protocol

import numpy as np

from services.common.errors import DeadlineExceeded, InvalidArgument
from services.encoder import metrics
from services.encoder.batcher import Batcher, TextModel
from services.encoder.cache import VectorCache, text_key
from services.encoder.settings import EncoderSettings

log = logging.getLogger("coldstart.encoder.core")

WARMUP_TEXTS = (
    "warm-up",
    "Toy Story (1995) | Animation, Children's, Comedy",
    "a longer warm-up text, so that the first real request does not pay for "
    "the allocation of a wider batch " * 4,
)


class ServedModel(TextModel, Protocol):
    """The batcher's model plus what the answers name."""

    @property
    def model_id(self) -> str: ...


class EncoderCore:
    def __init__(self, model: ServedModel, settings: EncoderSettings) -> None:
        self.model = model
        self.settings = settings
        self.cache = VectorCache(settings.cache_size)
        self.batcher = Batcher(
            model,
            max_batch=settings.max_batch,
            max_wait_s=settings.max_wait_ms / 1000.0,
            max_queued_texts=settings.max_queued_texts,
            batching=settings.batching,
        )

    @property
    def dimension(self) -> int:
        return self.model.dimension

    @property
    def model_id(self) -> str:
        return self.model.model_id

    def validate(self, texts: Sequence[str]) -> None:
        """InvalidArgument naming the field and the limit, for requests we refuse.

        The empty string (and whitespace only) is refused: it carries no
        meaning, every such text would get the same vector, and it almost
        always means the caller sent a field it forgot to fill.
        """
        limit = self.settings.max_texts_per_request
        if not texts:
            raise InvalidArgument("texts", "must hold at least 1 text, got none")
        if len(texts) > limit:
            raise InvalidArgument(
                "texts",
                f"at most {limit} texts per request (max_texts_per_request), got {len(texts)}",
            )
        max_bytes = self.settings.max_text_bytes
        for i, text in enumerate(texts):
            # A character is at most 4 UTF-8 bytes: most texts skip the encode.
            if len(text) * 4 > max_bytes:
                size = len(text.encode("utf-8"))
                if size > max_bytes:
                    raise InvalidArgument(
                        f"texts[{i}]",
                        f"is {size} bytes; the limit is {max_bytes} bytes (max_text_bytes)",
                    )
            if not text.strip():
                raise InvalidArgument(f"texts[{i}]", "is empty or only whitespace")

    def embed(self, texts: Sequence[str], deadline: float | None = None) -> np.ndarray:
        """float32 (len(texts), dimension) unit vectors, in request order.

        ``deadline`` is absolute, on ``time.monotonic()``; a request still
        queued when it passes is dropped and DeadlineExceeded raised.
        """
        self.validate(texts)
        if deadline is not None and deadline <= time.monotonic():
            metrics.DROPPED.labels("deadline").inc()
            raise DeadlineExceeded("deadline exceeded before the request reached the encoder")
        keys = [text_key(t) for t in texts]
        found = self.cache.get_many(keys)
        missing: dict[bytes, int] = {}
        for i, (key, vector) in enumerate(zip(keys, found, strict=True)):
            if vector is None:
                missing.setdefault(key, i)
        hits = len(texts) - sum(1 for v in found if v is None)
        if hits:
            metrics.CACHE_HITS.inc(hits)
        if len(texts) - hits:
            metrics.CACHE_MISSES.inc(len(texts) - hits)
        out = np.empty((len(texts), self.dimension), dtype=np.float32)
        computed: dict[bytes, np.ndarray] = {}
        if missing:
            firsts = list(missing.values())
            vectors = self.batcher.embed([texts[i] for i in firsts], deadline)
            self.cache.put_many(list(missing), vectors)
            computed = dict(zip(missing, vectors, strict=True))
        for i, (key, vector) in enumerate(zip(keys, found, strict=True)):
            out[i] = vector if vector is not None else computed[key]
        return out

    def warmup(self) -> None:
        """One run per shape class, so the first callers do not pay for it."""
        started = time.perf_counter()
        for text in WARMUP_TEXTS:
            self.batcher.embed([text])
        self.batcher.embed(list(WARMUP_TEXTS) * max(1, self.settings.max_batch // 3))
        log.info("warm-up done", extra={"seconds": round(time.perf_counter() - started, 3)})

    def close(self) -> None:
        self.batcher.close()

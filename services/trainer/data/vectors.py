"""Item text vectors: an injectable embedder plus an on-disk cache.

The harness takes any ``Embedder`` (texts -> float32 array of unit rows), so
tests pass the cheap :class:`HashingEmbedder` and the ONNX encoder can be
swapped in for the torch one. Vectors are cached under
``cache_dir()/vectors`` keyed by a hash of (model name, texts): a repeated
evaluation run never re-encodes.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from services.common.paths import cache_dir

Embedder = Callable[[list[str]], np.ndarray]


class HashingEmbedder:
    """Bag of hashed words, L2-normalised: shared words give similar vectors."""

    def __init__(self, dimension: int = 64) -> None:
        self.dimension = dimension
        self.name = f"hashing-{dimension}"

    def __call__(self, texts: list[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.dimension), dtype=np.float32)
        for row, text in enumerate(texts):
            for word in re.findall(r"\w+", text.lower()):
                h = int.from_bytes(hashlib.blake2b(word.encode(), digest_size=8).digest(), "big")
                out[row, h % self.dimension] += 1.0 if (h >> 32) & 1 else -1.0
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        return out / np.maximum(norms, 1e-12)


@dataclass(frozen=True)
class EmbedderSpec:
    """A named embedder, loaded only on a cache miss (the torch model takes seconds)."""

    name: str
    load: Callable[[], Embedder]
    # What else the vectors depend on, read only when the cache is consulted (an
    # export's key: a re-export with another INT8 scheme must not hit old vectors).
    version: Callable[[], str] | None = None

    def cache_name(self) -> str:
        return f"{self.name}/{self.version()}" if self.version else self.name


def _load_torch_minilm() -> Embedder:
    # Imported by name: the encoder package is another team's, and mypy should not
    # have to type-check torch/transformers just because the harness can use it.
    hf_model = importlib.import_module("services.encoder.hf_model")
    model = hf_model.TorchTextModel(max_length=MAX_LENGTH)
    encode: Embedder = model.encode
    return encode


MAX_LENGTH = 128
# The reference protocol: all-MiniLM-L6-v2, max length 128, mean pooling, L2 normalisation.
MINILM = EmbedderSpec(f"all-MiniLM-L6-v2/torch/len{MAX_LENGTH}", _load_torch_minilm)


def _load_onnx_minilm(int8: bool) -> Embedder:
    """The encoder service's own ONNX export (cached under .cache), fp32 or INT8."""
    export = importlib.import_module("services.encoder.export")
    runtime = importlib.import_module("services.encoder.runtime")
    model = runtime.OnnxTextModel(export.cached_export(int8=True), int8=int8, provider="cpu")

    def encode(texts: list[str]) -> np.ndarray:
        return np.asarray(model.embed(texts, 32), dtype=np.float32)

    return encode


def _onnx_export_key() -> str:
    export = importlib.import_module("services.encoder.export")
    hf_model = importlib.import_module("services.encoder.hf_model")
    key: str = export.export_key(hf_model.default_model_dir(), int8=True)
    return key


# The served vectors: what the model sees in production (see docs/ENCODER.md for
# the INT8 scheme). Titles are far below either max length, so they match MINILM's.
ONNX_FP32 = EmbedderSpec(
    "all-MiniLM-L6-v2/onnx-fp32", lambda: _load_onnx_minilm(False), _onnx_export_key
)
ONNX_INT8 = EmbedderSpec(
    "all-MiniLM-L6-v2/onnx-int8", lambda: _load_onnx_minilm(True), _onnx_export_key
)


def hashing_spec(dimension: int = 64) -> EmbedderSpec:
    return EmbedderSpec(f"hashing-{dimension}", lambda: HashingEmbedder(dimension))


def cache_key(model_name: str, texts: list[str]) -> str:
    digest = hashlib.sha256(model_name.encode())
    for text in texts:
        digest.update(b"\x00")
        digest.update(text.encode("utf-8"))
    return digest.hexdigest()[:32]


def cached_vectors(
    texts: list[str], spec: EmbedderSpec, directory: Path | None = None
) -> np.ndarray:
    """Vectors for ``texts``, from the cache when the same model saw the same texts."""
    folder = (directory or cache_dir()) / "vectors"
    path = folder / f"{cache_key(spec.cache_name(), texts)}.npy"
    if path.is_file():
        vectors = np.load(path)
        if vectors.shape[0] == len(texts):
            return vectors
    vectors = np.asarray(spec.load()(texts), dtype=np.float32)
    if vectors.shape[0] != len(texts):
        raise ValueError(f"embedder returned {vectors.shape[0]} vectors for {len(texts)} texts")
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f"{path.stem}.{os.getpid()}.tmp.npy"
    np.save(tmp, vectors)
    os.replace(tmp, path)  # atomic: a concurrent run never reads half a file
    return vectors

"""The exported encoder on ONNX Runtime: tokenizer + session, no torch.

A version folder (written by ``coldstart export encoder``) holds::

    manifest.json        model name, dimension, max length, files and hashes
    model.onnx           fp32 graph: ids, mask (, token types) -> unit vectors
    model.int8.onnx      optional INT8 variant (``--int8``)
    tokenizer/           tokenizer.json (+ the Hugging Face tokenizer files)

The execution provider is chosen once at load time: CUDA where a GPU is
present and onnxruntime-gpu can use it, else CPU (``provider`` setting).
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from services.common.errors import StartupError

log = logging.getLogger("coldstart.encoder.runtime")

MANIFEST = "manifest.json"
FP32_FILE = "model.onnx"
INT8_FILE = "model.int8.onnx"
TOKENIZER_DIR = "tokenizer"
# Fixed cost of one ONNX Runtime run in padded-token equivalents, measured
# for MiniLM on CPU (fp32 and INT8 alike: ~25 tokens of work per run).
RUN_OVERHEAD_TOKENS = 24
MANIFEST_KIND = "coldstart-encoder"
FORMAT_VERSION = 1


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class EncoderManifest:
    model_name: str
    dimension: int
    max_length: int
    pad_token_id: int
    input_names: tuple[str, ...]
    content_hash: str
    files: dict[str, str]
    raw: dict[str, Any]

    @classmethod
    def read(cls, folder: Path) -> EncoderManifest:
        path = folder / MANIFEST
        try:
            document = json.loads(path.read_text())
        except FileNotFoundError:
            raise StartupError(f"encoder model {folder}: no {MANIFEST} (not an export)") from None
        except (OSError, ValueError) as exc:
            raise StartupError(f"encoder model {path}: unreadable ({exc})") from None
        try:
            if document.get("kind") != MANIFEST_KIND:
                raise ValueError(f"kind is {document.get('kind')!r}, not {MANIFEST_KIND!r}")
            return cls(
                model_name=str(document["model_name"]),
                dimension=int(document["dimension"]),
                max_length=int(document["max_length"]),
                pad_token_id=int(document["pad_token_id"]),
                input_names=tuple(str(n) for n in document["input_names"]),
                content_hash=str(document["content_hash"]),
                files={str(k): str(v) for k, v in document["files"].items()},
                raw=document,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise StartupError(f"encoder model {path}: bad manifest ({exc})") from None


def gpu_present() -> bool:
    """A cheap look for an NVIDIA device node, so CPU hosts skip the CUDA attempt."""
    return bool(glob.glob("/dev/nvidia[0-9]*")) or os.path.isdir("/proc/driver/nvidia/gpus")


def _session_providers(requested: str) -> list[str]:
    import onnxruntime as ort

    available = ort.get_available_providers()
    if requested == "cpu":
        return ["CPUExecutionProvider"]
    cuda_possible = "CUDAExecutionProvider" in available and gpu_present()
    if requested == "cuda" and not cuda_possible:
        why = (
            "onnxruntime has no CUDA provider"
            if "CUDAExecutionProvider" not in available
            else "no GPU device found"
        )
        raise StartupError(f"provider cuda: not available here ({why})")
    if not cuda_possible:
        return ["CPUExecutionProvider"]
    # onnxruntime-gpu finds the CUDA/cuDNN libraries of the nvidia-* wheels this way.
    preload = getattr(ort, "preload_dlls", None)
    if callable(preload):
        try:
            preload()
        except Exception as exc:  # pragma: no cover - depends on the GPU host
            log.warning("onnxruntime.preload_dlls failed", extra={"error": str(exc)})
    return ["CUDAExecutionProvider", "CPUExecutionProvider"]


class OnnxTextModel:
    """Texts -> float32 unit vectors with the exported graph."""

    def __init__(
        self,
        folder: Path,
        *,
        int8: bool = False,
        provider: str = "auto",
        intra_op_threads: int = 0,
        verify_hashes: bool = True,
        allow_spinning: bool = True,
        max_tokens_per_run: int = 512,
    ) -> None:
        import onnxruntime as ort
        from tokenizers import Tokenizer

        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise StartupError(f"encoder model {self.folder}: folder not found")
        self.manifest = EncoderManifest.read(self.folder)
        providers = _session_providers(provider)
        use_int8 = int8
        if int8 and providers[0] == "CUDAExecutionProvider":
            log.warning("int8 runs its quantised kernels on the CPU only: serving fp32 on CUDA")
            use_int8 = False
        model_file = INT8_FILE if use_int8 else FP32_FILE
        model_path = self.folder / model_file
        if not model_path.is_file():
            hint = " (export with --int8)" if use_int8 else ""
            raise StartupError(f"encoder model {model_path}: file not found{hint}")
        expected = self.manifest.files.get(model_file)
        self.model_hash = expected or file_sha256(model_path)
        if verify_hashes and expected and file_sha256(model_path) != expected:
            raise StartupError(
                f"encoder model {model_path}: content hash differs from the manifest (corrupt?)"
            )
        tokenizer_path = self.folder / TOKENIZER_DIR / "tokenizer.json"
        try:
            self.tokenizer = Tokenizer.from_file(str(tokenizer_path))
        except Exception as exc:
            raise StartupError(f"encoder tokenizer {tokenizer_path}: cannot load ({exc})") from None
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(max_length=self.manifest.max_length)

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if intra_op_threads > 0:
            options.intra_op_num_threads = intra_op_threads
        options.inter_op_num_threads = 1
        if not allow_spinning:
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self.session = ort.InferenceSession(str(model_path), options, providers=providers)
        except Exception as exc:
            first_line = (
                str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            )
            raise StartupError(f"encoder model {model_path}: cannot load ({first_line})") from None
        self.provider = self.session.get_providers()[0]
        if provider == "cuda" and self.provider != "CUDAExecutionProvider":
            raise StartupError("provider cuda: onnxruntime could not start the CUDA provider")
        if providers[0] != self.provider:
            log.warning("CUDA provider failed to start; running on CPU")
        self.input_names = [i.name for i in self.session.get_inputs()]
        missing = {"input_ids", "attention_mask"} - set(self.input_names)
        outputs = self.session.get_outputs()
        if missing or len(outputs) != 1:
            raise StartupError(
                f"encoder model {model_path}: unexpected graph (inputs {self.input_names})"
            )
        self.output_name = outputs[0].name
        self.variant = "int8" if use_int8 else "fp32"
        self.name = self.manifest.model_name
        # e.g. "all-MiniLM-L6-v2@3f2a9c1d" (+ "-int8"): what callers see in replies.
        suffix = "-int8" if use_int8 else ""
        self.model_id = f"{self.name}@{self.model_hash[:8]}{suffix}"
        self.intra_op_threads = intra_op_threads
        self.max_tokens_per_run = max_tokens_per_run
        log.info(
            "encoder model loaded",
            extra={
                "model": self.model_id,
                "folder": str(self.folder),
                "provider": self.provider,
                "variant": self.variant,
                "dimension": self.dimension,
                "max_length": self.max_length,
                "intra_op_threads": intra_op_threads or "default",
            },
        )

    @property
    def dimension(self) -> int:
        return self.manifest.dimension

    @property
    def max_length(self) -> int:
        return self.manifest.max_length

    def token_lengths(self, texts: Sequence[str]) -> list[int]:
        return [len(e.ids) for e in self.tokenizer.encode_batch(list(texts))]

    def embed(self, texts: Sequence[str], batch_size: int = 32) -> np.ndarray:
        """float32 (len(texts), dimension), unit rows, in the order of ``texts``.

        Texts are tokenised once, ordered by token count and run in chunks of
        at most ``batch_size`` texts and ``max_tokens_per_run`` padded tokens,
        so each chunk pads to a similar length and its activations stay small
        enough for the CPU caches.
        """
        out = np.empty((len(texts), self.dimension), dtype=np.float32)
        if not texts:
            return out
        encodings = self.tokenizer.encode_batch(list(texts))
        lengths = np.fromiter((len(e.ids) for e in encodings), dtype=np.int64, count=len(texts))
        order = np.argsort(lengths, kind="stable")
        for rows in self._chunks(order, lengths, batch_size):
            out[rows] = self._run([encodings[row] for row in rows], int(lengths[rows].max()))
        return out

    def _chunks(self, order: np.ndarray, lengths: np.ndarray, batch_size: int) -> list[np.ndarray]:
        """Cut the length-sorted texts into runs with the least padded work.

        A run costs its padded tokens (texts x longest) plus a fixed overhead
        worth ``RUN_OVERHEAD_TOKENS``; a dynamic programme over the sorted
        lengths picks contiguous runs of at most ``batch_size`` texts and
        ``max_tokens_per_run`` padded tokens that minimise the total. A merged
        batch of random short texts (5 to 30 tokens) then runs as two or three
        runs of similar lengths instead of one padded to the longest.
        """
        sorted_lengths = lengths[order].astype(np.int64)
        count = len(order)
        budget = self.max_tokens_per_run
        best = np.zeros(count + 1, dtype=np.float64)
        cut = np.zeros(count + 1, dtype=np.int64)
        for end in range(1, count + 1):
            low = max(0, end - batch_size)
            if budget > 0:
                # Runs of 2+ texts stay within the budget; one text always may run.
                low = max(low, min(end - 1, end - budget // int(sorted_lengths[end - 1])))
            starts = np.arange(low, end)
            costs = best[low:end] + (end - starts) * sorted_lengths[end - 1] + RUN_OVERHEAD_TOKENS
            pick = int(np.argmin(costs))
            best[end] = costs[pick]
            cut[end] = low + pick
        chunks: list[np.ndarray] = []
        end = count
        while end > 0:
            chunks.append(order[cut[end] : end])
            end = int(cut[end])
        chunks.reverse()
        return chunks

    def _run(self, encodings: list[Any], width: int) -> np.ndarray:
        pad = self.manifest.pad_token_id
        count = len(encodings)
        ids = np.full((count, width), pad, dtype=np.int64)
        mask = np.zeros((count, width), dtype=np.int64)
        wants_types = "token_type_ids" in self.input_names
        types = np.zeros((count, width), dtype=np.int64) if wants_types else None
        for slot, encoding in enumerate(encodings):
            n = len(encoding.ids)
            ids[slot, :n] = encoding.ids
            mask[slot, :n] = 1
            if types is not None:
                types[slot, :n] = encoding.type_ids
        feeds: dict[str, np.ndarray] = {"input_ids": ids, "attention_mask": mask}
        if types is not None:
            feeds["token_type_ids"] = types
        (vectors,) = self.session.run([self.output_name], feeds)
        result: np.ndarray = vectors
        return result

"""Settings of the encoder service (section ``[encoder]``, env ``COLDSTART_ENCODER_*``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from services.common.paths import run_dir
from services.common.ports import DEFAULT_PORTS
from services.common.settings import ServerSettings, SettingsError, check_positive

PROVIDERS = ("auto", "cpu", "cuda")


def default_registry_dir() -> Path:
    return run_dir() / "registry" / "encoder"


@dataclass(frozen=True)
class EncoderSettings(ServerSettings):
    port: int = DEFAULT_PORTS["encoder"].grpc

    # -- which model -------------------------------------------------------
    # An exported version folder (manifest.json, model.onnx, tokenizer/);
    # when empty, the registry's version below is served.
    model_path: str = ""
    # The encoder registry (``coldstart export encoder`` publishes there);
    # empty = <run_dir>/registry/encoder.
    registry_dir: str = ""
    # A registry version name; empty = the registry's CURRENT version.
    version: str = ""
    # Serve the INT8 variant (model.int8.onnx; export with --int8). CPU only:
    # on the CUDA provider the fp32 model is served and a warning logged.
    int8: bool = False

    # -- ONNX Runtime ------------------------------------------------------
    # "auto": CUDA where onnxruntime-gpu finds a GPU, else CPU.
    provider: str = "auto"
    # Threads of one inference; 0 = one per CPU core.
    intra_op_threads: int = 0
    # Let ONNX Runtime's idle threads spin-wait for work. Off by default: the
    # spinning burns the CPU that the gRPC threads and the tokenizer need on a
    # small machine (measured: ~2x server throughput with 32 clients on 2 cores).
    allow_spinning: bool = False

    # -- batching ----------------------------------------------------------
    # Requests that arrive together are merged into one model run of at
    # most max_batch texts (longer runs are cut into max_batch chunks).
    batching: bool = True
    max_batch: int = 32
    # How long the first request of a batch waits for company.
    max_wait_ms: float = 2.0
    # A chunk also stops at this many padded tokens (0 = no cap): big runs
    # of short texts then keep their activations in the CPU caches
    # (measured: batch 128 runs 1.4x faster with 512 than uncapped).
    max_tokens_per_run: int = 512
    # Texts waiting for the model beyond this are refused (RESOURCE_EXHAUSTED).
    max_queued_texts: int = 4096

    # -- request limits ----------------------------------------------------
    max_texts_per_request: int = 256
    max_text_bytes: int = 8192

    # -- cache -------------------------------------------------------------
    # LRU entries (one vector per distinct text); 0 disables the cache.
    cache_size: int = 50_000

    def validate(self) -> None:
        super().validate()
        if self.provider not in PROVIDERS:
            raise SettingsError(
                f"provider: must be one of {', '.join(PROVIDERS)}, got {self.provider!r}"
            )
        if self.intra_op_threads < 0:
            raise SettingsError(f"intra_op_threads: must be >= 0, got {self.intra_op_threads}")
        check_positive("max_batch", self.max_batch)
        if self.max_wait_ms < 0:
            raise SettingsError(f"max_wait_ms: must be >= 0, got {self.max_wait_ms}")
        check_positive("max_queued_texts", self.max_queued_texts)
        if self.max_tokens_per_run < 0:
            raise SettingsError(f"max_tokens_per_run: must be >= 0, got {self.max_tokens_per_run}")
        check_positive("max_texts_per_request", self.max_texts_per_request)
        check_positive("max_text_bytes", self.max_text_bytes)
        if self.max_queued_texts < self.max_texts_per_request:
            raise SettingsError(
                f"max_queued_texts: must be >= max_texts_per_request "
                f"({self.max_texts_per_request}), got {self.max_queued_texts}"
            )
        if self.cache_size < 0:
            raise SettingsError(f"cache_size: must be >= 0, got {self.cache_size}")
        if self.model_path and self.version:
            raise SettingsError("model_path and version: set one or neither")

    def resolved_registry_dir(self) -> Path:
        return Path(self.registry_dir) if self.registry_dir else default_registry_dir()

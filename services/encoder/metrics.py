"""The encoder's own Prometheus metrics (the runtime adds the per-RPC ones)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, Info

MODEL_INFO = Info(
    "coldstart_encoder_model",
    "The served encoder model: name, content hash, variant, execution provider.",
)
PROVIDER = Gauge(
    "coldstart_encoder_execution_provider",
    "1 for the ONNX Runtime execution provider the encoder runs on.",
    ["provider"],
)
BATCH_TEXTS = Histogram(
    "coldstart_encoder_batch_size",
    "Texts per model run (after merging requests and removing cache hits).",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
)
BATCH_REQUESTS = Histogram(
    "coldstart_encoder_batch_requests",
    "Requests merged into one model run.",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128),
)
QUEUE_WAIT = Histogram(
    "coldstart_encoder_queue_wait_seconds",
    "Time a request waited in the queue before its model run started.",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
)
INFERENCE = Histogram(
    "coldstart_encoder_inference_seconds",
    "Wall time of one model run (tokenisation and ONNX Runtime).",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
)
QUEUED_TEXTS = Gauge(
    "coldstart_encoder_queued_texts",
    "Texts waiting for the model right now.",
)
DROPPED = Counter(
    "coldstart_encoder_dropped_requests",
    "Requests not computed: deadline passed while queued, caller gone, queue full.",
    ["reason"],
)
CACHE_HITS = Counter("coldstart_encoder_cache_hits", "Texts answered from the vector cache.")
CACHE_MISSES = Counter("coldstart_encoder_cache_misses", "Texts the cache did not hold.")
TEXTS = Counter("coldstart_encoder_texts", "Texts embedded by the model (cache misses).")

"""Settings of the fusion service (section ``[fusion]``)."""

from __future__ import annotations

from dataclasses import dataclass

from services.common.ports import DEFAULT_PORTS, REDIS_PORT
from services.common.settings import ServerSettings, SettingsError, check_positive

STATE_BACKENDS = ("memory", "redis")
# The packed Redis value counts items in 16 bits (services/fusion/redis_state.py).
MAX_REDIS_HISTORY = 65_535


@dataclass(frozen=True)
class FusionSettings(ServerSettings):
    port: int = DEFAULT_PORTS["fusion"].grpc
    # Model registry root; empty = ``run_dir()/registry/recommender``.
    registry_dir: str = ""
    # Seconds between looks at the registry's CURRENT pointer.
    swap_poll_s: float = 1.0
    # Kafka: empty bootstrap = no online state from events (requests still work).
    kafka_bootstrap: str = ""
    events_topic: str = "coldstart.events"
    # Snapshot of the online state + the offsets it reflects; empty = ``run_dir()/fusion/<port>``.
    snapshot_dir: str = ""
    snapshot_interval_s: float = 5.0
    # Consumer poll timeout: the upper bound on how long an event waits once fetched.
    poll_timeout_ms: int = 50
    # Items of a user's recent history kept online (liked and rated-low together). 200:
    # the new-item blend's knn terms over the last 50 cost .007 / .005 item-cold Recall@20
    # against the whole history, over the last 200 .001 (docs/experiments/model-runs.md, run 9). The user
    # tower pools only its own max_history of them.
    history_length: int = 200
    # Encoder for interest text that arrives without a vector; empty = leave it unset.
    encoder_address: str = ""
    encoder_timeout_s: float = 2.0
    # Retrieval: candidates handed to the ranker, and the ANN search breadth.
    # candidates 0: as many as the version's ranker was trained to order (its
    # manifest's ranker.candidates; DEFAULT_CANDIDATES where it does not say).
    # Handing the ranker more puts items in front of it unlike any it learned on,
    # and costs search and ranking time per call.
    candidates: int = 0
    # ANN search breadth: HNSW efSearch / IVF nprobe. 0: the version's own, which
    # its builder tuned on its users' vectors to a recall target and stored in the
    # index file (services/common/ann.py); a value overrides it for every version.
    ef_search: int = 0
    nprobe: int = 0
    # Upserted items stay in an exact side buffer until this many, then fold into the ANN index.
    fold_threshold: int = 5_000
    # ONNX Runtime threads per call; 1 suits many concurrent calls on few cores.
    intra_op_threads: int = 1
    max_k: int = 1_000
    # Micro-batching of concurrent Recommend calls (services/common/batcher.py): a batch
    # is topped up until its oldest call waited batch_wait_ms (only when the previous
    # batch held more than one call), at most max_batch calls; max_batch 1 = no batching.
    # 10 ms: under load the handler threads feed the queue slowly (they share the GIL),
    # and a batch's cost per call falls steeply with its size (docs/FUSION.md).
    batch_wait_ms: float = 10.0
    max_batch: int = 32
    # Threads serving batches. One: a second worker took half-empty batches and
    # contended for the GIL; measured ~20 % fewer calls per second with two.
    batch_workers: int = 1
    # Online user state: "memory" (in process, from every event, snapshotted to
    # snapshot_dir) or "redis" (read from redis_url per micro-batch; written by the
    # replicas with state_writer = true, one Kafka consumer group that splits the
    # partitions: docs/FUSION.md, "Online state").
    state_backend: str = "memory"
    redis_url: str = f"redis://127.0.0.1:{REDIS_PORT}/0"
    # Key prefix, so several deployments (or tests) can share one Redis.
    redis_key_prefix: str = "coldstart:"
    # Socket timeouts of every Redis call: a read slower than this serves the batch
    # as new users (degraded) rather than hold it.
    redis_timeout_ms: int = 100
    # After a failed read, reads fail fast this long (no connect timeout per batch).
    redis_retry_after_s: float = 1.0
    # Whether this replica writes user state to Redis (a member of state_group).
    state_writer: bool = False
    state_group: str = "coldstart-fusion-state"
    # Static group membership (KIP-345) of a writer: restarted with the same id it
    # takes its partitions back at once instead of after the killed member's session
    # timeout (the k8s writers use their pod name). "" = dynamic membership.
    state_writer_instance: str = ""
    # How long an applied event id is remembered for deduplication across writers.
    state_event_ttl_s: int = 86_400

    def validate(self) -> None:
        super().validate()
        check_positive("swap_poll_s", self.swap_poll_s)
        check_positive("snapshot_interval_s", self.snapshot_interval_s)
        check_positive("poll_timeout_ms", self.poll_timeout_ms)
        check_positive("history_length", self.history_length)
        check_positive("encoder_timeout_s", self.encoder_timeout_s)
        if self.candidates < 0:
            raise SettingsError(f"candidates: must be >= 0 (0: the model's), got {self.candidates}")
        for name in ("ef_search", "nprobe"):
            if getattr(self, name) < 0:
                raise SettingsError(
                    f"{name}: must be >= 0 (0: the version's own), got {getattr(self, name)}"
                )
        check_positive("fold_threshold", self.fold_threshold)
        check_positive("intra_op_threads", self.intra_op_threads)
        check_positive("max_k", self.max_k)
        check_positive("max_batch", self.max_batch)
        check_positive("batch_workers", self.batch_workers)
        if self.batch_wait_ms < 0:
            raise SettingsError(f"batch_wait_ms: must be >= 0, got {self.batch_wait_ms}")
        if not self.events_topic:
            raise SettingsError("events_topic: must not be empty")
        if self.state_backend not in STATE_BACKENDS:
            raise SettingsError(
                f"state_backend: must be one of {', '.join(STATE_BACKENDS)}, "
                f"got {self.state_backend!r}"
            )
        if self.state_backend == "redis":
            if not self.redis_url.startswith(("redis://", "rediss://", "unix://")):
                raise SettingsError(
                    f"redis_url: must start with redis://, rediss:// or unix://, "
                    f"got {self.redis_url!r}"
                )
            check_positive("redis_timeout_ms", self.redis_timeout_ms)
            check_positive("redis_retry_after_s", self.redis_retry_after_s)
            check_positive("state_event_ttl_s", self.state_event_ttl_s)
            if self.history_length > MAX_REDIS_HISTORY:
                raise SettingsError(
                    f"history_length: at most {MAX_REDIS_HISTORY} with state_backend redis, "
                    f"got {self.history_length}"
                )
            if self.state_writer and not self.kafka_bootstrap:
                raise SettingsError("state_writer: needs kafka_bootstrap (it consumes events)")
            if self.state_writer and not self.state_group:
                raise SettingsError("state_group: must not be empty when state_writer is on")
        elif self.state_writer:
            raise SettingsError(
                'state_writer: only with state_backend = "redis" (the memory backend '
                "applies every event in every replica)"
            )

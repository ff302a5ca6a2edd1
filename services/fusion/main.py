"""`coldstart serve fusion`: wire settings, registry, online state and servicer."""

from __future__ import annotations

import logging
from pathlib import Path

import faiss
import numpy as np
from coldstart.v1 import fusion_pb2_grpc

from services.common.errors import StartupError
from services.common.paths import run_dir
from services.common.registry import ModelRegistry
from services.common.server import ServiceApp, ServiceParts
from services.fusion.core import ModelHolder, Recommender
from services.fusion.model_version import ModelLoadError, ModelVersion
from services.fusion.online_state import SNAPSHOT_FILE, Encoder, EventConsumer, UserStore
from services.fusion.redis_state import RedisUserStore, StateWriter, redis_client
from services.fusion.servicer import FusionServicer
from services.fusion.settings import FusionSettings

log = logging.getLogger("coldstart.fusion")


def registry_root(settings: FusionSettings) -> Path:
    return (
        Path(settings.registry_dir)
        if settings.registry_dir
        else run_dir() / "registry" / "recommender"
    )


def encoder_client(address: str, timeout_s: float) -> Encoder:
    """Text -> vector through the encoder service; None when it cannot answer."""
    import grpc
    from coldstart.v1 import encoder_pb2, encoder_pb2_grpc

    channel = grpc.insecure_channel(address)
    stub = encoder_pb2_grpc.EncoderServiceStub(channel)

    def encode(text: str) -> np.ndarray | None:
        try:
            reply = stub.Embed(encoder_pb2.EmbedRequest(texts=[text]), timeout=timeout_s)
        except grpc.RpcError as exc:
            log.warning("encoder call failed; vector left unset", extra={"code": str(exc.code())})
            return None
        return np.asarray(reply.vectors[0].values, dtype=np.float32)

    return encode


def build(settings: FusionSettings) -> ServiceParts:
    # Many concurrent calls, each a single query: OpenMP threads per search only
    # oversubscribe the cores the gRPC threads already use.
    faiss.omp_set_num_threads(1)
    registry = ModelRegistry(registry_root(settings))

    def load(path: Path) -> ModelVersion:
        return ModelVersion.load(
            path,
            intra_op_threads=settings.intra_op_threads,
            ef_search=settings.ef_search,
            nprobe=settings.nprobe,
            fold_threshold=settings.fold_threshold,
        )

    holder = ModelHolder(registry, load)
    encoder = (
        encoder_client(settings.encoder_address, settings.encoder_timeout_s)
        if settings.encoder_address
        else None
    )
    redis_store: RedisUserStore | None = None
    if settings.state_backend == "redis":
        redis_store = RedisUserStore(
            redis_client(settings.redis_url, settings.redis_timeout_ms / 1000),
            prefix=settings.redis_key_prefix,
            history_length=settings.history_length,
            event_ttl_s=settings.state_event_ttl_s,
            retry_after_s=settings.redis_retry_after_s,
            encoder=encoder,
        )
    # With Redis the users live there, but every replica still applies every item
    # upsert to its own live index (and snapshots those with their offsets).
    store = UserStore(
        settings.history_length,
        encoder=encoder,
        on_item=holder.upsert_event,
        user_events=redis_store is None,
    )
    core = Recommender(
        holder,
        store if redis_store is None else redis_store,
        candidates=settings.candidates,
        max_k=settings.max_k,
        batch_wait_ms=settings.batch_wait_ms,
        max_batch=settings.max_batch,
        batch_workers=settings.batch_workers,
    )
    holder.warm = core.warm
    try:
        holder.load_initial()
    except ModelLoadError as exc:
        core.close()
        raise StartupError(str(exc)) from None

    consumer: EventConsumer | None = None
    if settings.kafka_bootstrap:
        snapshot_dir = (
            Path(settings.snapshot_dir)
            if settings.snapshot_dir
            else run_dir() / "fusion" / str(settings.port)
        )
        try:
            consumer = EventConsumer(
                store,
                settings.kafka_bootstrap,
                settings.events_topic,
                snapshot_dir / SNAPSHOT_FILE,
                snapshot_interval_s=settings.snapshot_interval_s,
                poll_timeout_ms=settings.poll_timeout_ms,
                export_items=holder.export_items,
                restore_items=holder.restore_items,
            )
        except ConnectionError as exc:
            raise StartupError(str(exc)) from None
    else:
        log.warning("no kafka_bootstrap: online user state comes from requests only")

    writer: StateWriter | None = None
    if redis_store is not None and settings.state_writer:
        from kafka.errors import KafkaError

        try:
            writer = StateWriter(
                redis_store,
                settings.kafka_bootstrap,
                settings.events_topic,
                group_id=settings.state_group,
                group_instance_id=settings.state_writer_instance,
                poll_timeout_ms=settings.poll_timeout_ms,
            )
        except KafkaError as exc:
            if consumer is not None:
                consumer.stop()
            raise StartupError(
                f"kafka_bootstrap {settings.kafka_bootstrap}: {type(exc).__name__}"
            ) from None

    def warmup() -> None:
        if consumer is not None:
            consumer.start()
        if writer is not None:
            writer.start()
        holder.start_watcher(settings.swap_poll_s)

    def close() -> None:
        core.close()
        holder.stop()
        if consumer is not None:
            consumer.stop()
        if writer is not None:
            writer.stop()

    return ServiceParts(
        servicers=[(fusion_pb2_grpc.add_FusionServiceServicer_to_server, FusionServicer(core))],
        service_names=["coldstart.v1.FusionService"],
        warmup=warmup,
        close=close,
    )


APP = ServiceApp(name="fusion", settings_type=FusionSettings, build=build)

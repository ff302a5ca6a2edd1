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
    store = UserStore(settings.history_length, encoder=encoder, on_item=holder.upsert_event)
    core = Recommender(
        holder,
        store,
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

    def warmup() -> None:
        if consumer is not None:
            consumer.start()
        holder.start_watcher(settings.swap_poll_s)

    def close() -> None:
        core.close()
        holder.stop()
        if consumer is not None:
            consumer.stop()

    return ServiceParts(
        servicers=[(fusion_pb2_grpc.add_FusionServiceServicer_to_server, FusionServicer(core))],
        service_names=["coldstart.v1.FusionService"],
        warmup=warmup,
        close=close,
    )


APP = ServiceApp(name="fusion", settings_type=FusionSettings, build=build)

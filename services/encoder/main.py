"""``coldstart serve encoder``: the exported text model behind gRPC."""

from __future__ import annotations

import logging
from pathlib import Path

from coldstart.v1 import encoder_pb2_grpc

from services.common.errors import StartupError
from services.common.registry import ModelRegistry
from services.common.server import ServiceApp, ServiceParts
from services.encoder import metrics
from services.encoder.settings import EncoderSettings

log = logging.getLogger("coldstart.encoder")


def resolve_model_folder(settings: EncoderSettings) -> Path:
    """The version folder to serve: ``model_path``, else the registry's version."""
    if settings.model_path:
        return Path(settings.model_path)
    root = settings.resolved_registry_dir()
    registry = ModelRegistry(root)
    try:
        version = settings.version or registry.current()
    except OSError as exc:
        raise StartupError(f"encoder registry {root}: unreadable ({exc})") from None
    if not version:
        raise StartupError(
            f"no encoder model in registry {root}: run `coldstart export encoder` "
            "(or set model_path)"
        )
    folder = registry.path(version)
    if not folder.is_dir():
        raise StartupError(f"encoder registry {root}: version {version!r} not found")
    return folder


def build_encoder(settings: EncoderSettings) -> ServiceParts:
    from services.encoder.core import EncoderCore
    from services.encoder.runtime import OnnxTextModel
    from services.encoder.servicer import EncoderServicer

    folder = resolve_model_folder(settings)
    model = OnnxTextModel(
        folder,
        int8=settings.int8,
        provider=settings.provider,
        intra_op_threads=settings.intra_op_threads,
        allow_spinning=settings.allow_spinning,
        max_tokens_per_run=settings.max_tokens_per_run,
    )
    metrics.MODEL_INFO.info(
        {
            "model": model.model_id,
            "version": folder.name,
            "variant": model.variant,
            "provider": model.provider,
            "dimension": str(model.dimension),
            "max_length": str(model.max_length),
            "intra_op_threads": str(settings.intra_op_threads or "default"),
        }
    )
    metrics.PROVIDER.labels(model.provider).set(1)
    core = EncoderCore(model, settings)
    log.info(
        "encoder ready",
        extra={
            "model": model.model_id,
            "provider": model.provider,
            "batching": settings.batching,
            "max_batch": settings.max_batch,
            "max_wait_ms": settings.max_wait_ms,
            "cache_size": settings.cache_size,
        },
    )
    return ServiceParts(
        servicers=[(encoder_pb2_grpc.add_EncoderServiceServicer_to_server, EncoderServicer(core))],
        service_names=["coldstart.v1.EncoderService"],
        warmup=core.warmup,
        close=core.close,
    )


APP = ServiceApp(name="encoder", settings_type=EncoderSettings, build=build_encoder)

"""The trainer's gRPC API: thin validation and conversion around the core."""

from __future__ import annotations

import math
from typing import Any

import grpc
from coldstart.v1 import common_pb2, trainer_pb2, trainer_pb2_grpc

from services.common.errors import InvalidArgument
from services.common.registry import ModelRegistry, RegistryError
from services.trainer.event_log import EventLog
from services.trainer.ingest import IngestStatus
from services.trainer.retrain import Retrainer, RunRecord

MAX_REASON_CHARS = 200


def run_message(record: RunRecord | None) -> trainer_pb2.TrainingRun:
    if record is None:
        return trainer_pb2.TrainingRun()
    return trainer_pb2.TrainingRun(
        run_id=record.run_id,
        state=record.state,
        started_at_ms=record.started_at_ms,
        finished_at_ms=record.finished_at_ms,
        candidate_version=record.candidate_version,
        candidate_metrics=_numbers(record.candidate_metrics),
        current_metrics=_numbers(record.current_metrics),
        message=record.message,
        reason=record.reason,
        published_version=record.published_version,
    )


def _numbers(values: dict[str, Any]) -> dict[str, float]:
    out: dict[str, float] = {}
    for key, value in values.items():
        numeric = isinstance(value, int | float) and not isinstance(value, bool)
        if numeric and math.isfinite(float(value)):
            out[str(key)] = float(value)
    return out


def model_info(registry: ModelRegistry) -> common_pb2.ModelInfo:
    try:
        info = registry.current_info()
    except RegistryError:
        return common_pb2.ModelInfo()
    if info is None:
        return common_pb2.ModelInfo()
    manifest = info.manifest
    metrics = manifest.get("metrics")
    return common_pb2.ModelInfo(
        version=info.version,
        created_at=str(manifest.get("created_at", "")),
        parent_version=str(manifest.get("parent_version") or ""),
        dimension=int(manifest.get("dimension", 0) or 0),
        item_count=int(manifest.get("item_count", 0) or 0),
        metrics=_numbers(metrics) if isinstance(metrics, dict) else {},
        encoder_model=str(manifest.get("encoder_model", "") or ""),
    )


class TrainerServicer(trainer_pb2_grpc.TrainerServiceServicer):
    def __init__(
        self,
        event_log: EventLog,
        retrainer: Retrainer,
        registry: ModelRegistry,
        ingest_status: IngestStatus | None,
    ) -> None:
        self.event_log = event_log
        self.retrainer = retrainer
        self.registry = registry
        self.ingest_status = ingest_status

    def GetStatus(
        self, request: trainer_pb2.GetStatusRequest, context: grpc.ServicerContext
    ) -> trainer_pb2.TrainerStatus:
        counters = self.event_log.counters()
        lag = self.ingest_status.consumer_lag if self.ingest_status is not None else -1
        return trainer_pb2.TrainerStatus(
            consumer_lag=lag,
            events_applied=counters["applied"],
            events_dead_lettered=counters["dead_lettered"],
            last_run=run_message(self.retrainer.last_run()),
            current_model=model_info(self.registry),
            kept_versions=self.registry.versions(),
        )

    def TriggerRetrain(
        self, request: trainer_pb2.TriggerRetrainRequest, context: grpc.ServicerContext
    ) -> trainer_pb2.TriggerRetrainResponse:
        if len(request.reason) > MAX_REASON_CHARS:
            raise InvalidArgument("reason", f"must be at most {MAX_REASON_CHARS} characters")
        if any(ord(c) < 32 for c in request.reason):
            raise InvalidArgument("reason", "must not contain control characters")
        run_id, started = self.retrainer.trigger(request.reason or "rpc")
        return trainer_pb2.TriggerRetrainResponse(run_id=run_id, started=started)

    def Rollback(
        self, request: trainer_pb2.RollbackRequest, context: grpc.ServicerContext
    ) -> trainer_pb2.RollbackResponse:
        current, previous = self.retrainer.rollback(request.version)
        return trainer_pb2.RollbackResponse(
            current_version=current, previous_version=previous or ""
        )

"""`coldstart serve trainer`: event log consumer, retraining, registry publishing."""

from __future__ import annotations

import logging

from coldstart.v1 import trainer_pb2_grpc

from services.common.errors import StartupError
from services.common.registry import ModelRegistry
from services.common.server import ServiceApp, ServiceParts
from services.trainer.event_log import EventLog, EventLogError
from services.trainer.ingest import Ingestor, KafkaDeadLetterSink
from services.trainer.retrain import Retrainer, RetrainScheduler
from services.trainer.servicer import TrainerServicer
from services.trainer.settings import TrainerSettings

log = logging.getLogger("coldstart.trainer")


def build(settings: TrainerSettings) -> ServiceParts:
    log_dir = settings.log_path()
    try:
        log_dir.mkdir(parents=True, exist_ok=True)
        event_log = EventLog(log_dir / "events.sqlite", synchronous=settings.sqlite_synchronous)
    except (OSError, EventLogError) as exc:
        raise StartupError(f"log_dir {log_dir}: {exc}") from None
    registry = ModelRegistry(settings.registry_path())
    retrainer = Retrainer(settings, event_log, registry)
    try:
        registry.root.mkdir(parents=True, exist_ok=True)
        retrainer.recover()
    except OSError as exc:
        raise StartupError(f"registry_dir {registry.root}: {exc}") from None
    if settings.initial_data:
        from services.trainer.data.errors import DataError

        try:
            retrainer.initial_data()  # fail at start-up, not at the first run
        except DataError as exc:
            raise StartupError(f"initial_data {settings.initial_data}: {exc}") from None

    scheduler = RetrainScheduler(
        retrainer, settings.retrain_every_events, settings.retrain_every_seconds
    )
    dead_letters = KafkaDeadLetterSink(settings.kafka_bootstrap, settings.dead_letter_topic)
    ingestor = Ingestor(
        event_log,
        bootstrap=settings.kafka_bootstrap,
        topic=settings.events_topic,
        group_id=settings.group_id,
        group_instance_id=settings.group_instance_id,
        check_crcs=settings.check_crcs,
        dead_letters=dead_letters,
        max_poll_records=settings.max_poll_records,
        processes=settings.ingest_processes,
        on_applied=lambda result: scheduler.on_applied(result.applied),
    )

    def warmup() -> None:
        if settings.consume:
            ingestor.start()
        scheduler.start()

    def close() -> None:
        scheduler.stop()
        ingestor.stop()
        retrainer.shutdown()
        dead_letters.close()
        event_log.close()

    servicer = TrainerServicer(event_log, retrainer, registry, ingestor.status)
    return ServiceParts(
        servicers=[(trainer_pb2_grpc.add_TrainerServiceServicer_to_server, servicer)],
        service_names=["coldstart.v1.TrainerService"],
        warmup=warmup,
        close=close,
    )


APP = ServiceApp(name="trainer", settings_type=TrainerSettings, build=build)

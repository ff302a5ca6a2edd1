"""Settings of the trainer service (`coldstart serve trainer`, section ``[trainer]``)."""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

from services.common.paths import run_dir
from services.common.ports import DEFAULT_PORTS
from services.common.settings import ServerSettings, SettingsError, check_positive

# The training command the retrainer runs when ``train_command`` is empty. The
# placeholders are filled per run; ``{registry}`` is a per-run *candidate*
# registry (never the published one), so a training step can only ever write
# candidates.
DEFAULT_TRAIN_COMMAND = (
    "{python} -m services.cli train --workers {workers} --data {data} "
    "--registry {registry} --tag {run_id} --out {workdir} --quiet"
)
TRAIN_PLACEHOLDERS = frozenset(
    {"python", "workers", "data", "registry", "run_id", "device", "workdir"}
)
PAUSE_POINTS = frozenset({"", "publish_staging", "publish_renamed"})
_SCORER = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


@dataclass(frozen=True)
class TrainerSettings(ServerSettings):
    port: int = DEFAULT_PORTS["trainer"].grpc

    # -- consumption ------------------------------------------------------
    kafka_bootstrap: str = "127.0.0.1:9092"
    events_topic: str = "coldstart.events"
    dead_letter_topic: str = "coldstart.events.dlq"
    group_id: str = "coldstart-trainer"
    # Static group membership (KIP-345): a restarted trainer takes its partitions
    # back at once instead of waiting for the killed member's session to expire,
    # and a second trainer with the same id is fenced. "" = dynamic membership.
    group_instance_id: str = "trainer-0"
    # Consumer processes (group members; the group spreads the partitions
    # over them) that poll and hand their raw batches to the one log writer in
    # the service process. (An in-process loop, 0, ran at ~40% of the bare
    # kafka-python rate against ~70% for 1 on 2 cores, and was removed.)
    ingest_processes: int = 1
    # Records per poll and per SQLite transaction: big batches amortise the
    # commit and the Kafka round trips (the >= 20k events/s target needs them).
    max_poll_records: int = 5000
    # kafka-python's record CRC check; cheap with the pinned `crc32c` C
    # extension (pure Python without it: about two thirds of the consume rate).
    check_crcs: bool = True
    # Start consuming at start-up (off: RPC-only, e.g. to inspect a log).
    consume: bool = True
    # "NORMAL" or "FULL" (see docs/TRAINER.md: NORMAL survives SIGKILL, and
    # after a power loss the stored offsets roll back with the data).
    sqlite_synchronous: str = "NORMAL"

    # -- state ------------------------------------------------------------
    # Empty: <run dir>/trainer and <run dir>/registry.
    log_dir: str = ""
    registry_dir: str = ""
    # Dataset the log is added to: "ml-100k", "synthetic", a folder, or "" (log only).
    initial_data: str = ""

    # -- retraining -------------------------------------------------------
    # 0 disables a trigger; an RPC can always start a run.
    retrain_every_events: int = 0
    retrain_every_seconds: float = 0.0
    workers: int = 1
    # "cpu" (gloo) or "cuda" (NCCL); passed to the training command as {device}.
    device: str = "cpu"
    train_command: str = ""
    train_timeout_seconds: float = 3600.0
    # "module:function" returning a Scorer for a version folder, used when a
    # version's manifest names no "scorer" of its own.
    scorer: str = "services.trainer.version_scorer:load_scorer"
    # A candidate is published when recall@20 >= current * (1 - gate_threshold).
    gate_threshold: float = 0.02
    keep_versions: int = 5
    # Newest interactions held out of training and used to compare versions.
    holdout_fraction: float = 0.1
    holdout_max_events: int = 5000

    # -- tests only ---------------------------------------------------------
    # Sleep this long at a named point of a run so a test can SIGKILL there.
    debug_pause_point: str = ""
    debug_pause_seconds: float = 0.0

    def validate(self) -> None:
        super().validate()
        for name in ("kafka_bootstrap", "events_topic", "dead_letter_topic", "group_id"):
            if not getattr(self, name).strip():
                raise SettingsError(f"{name}: must not be empty")
        if self.events_topic == self.dead_letter_topic:
            raise SettingsError("dead_letter_topic: must differ from events_topic")
        check_positive("max_poll_records", self.max_poll_records)
        if not 1 <= self.ingest_processes <= 64:
            raise SettingsError(
                f"ingest_processes: must be in [1, 64], got {self.ingest_processes}"
            )
        if self.sqlite_synchronous.upper() not in {"NORMAL", "FULL"}:
            raise SettingsError(
                f"sqlite_synchronous: must be NORMAL or FULL, got {self.sqlite_synchronous!r}"
            )
        if self.retrain_every_events < 0:
            raise SettingsError(
                f"retrain_every_events: must be >= 0, got {self.retrain_every_events}"
            )
        if self.retrain_every_seconds < 0:
            raise SettingsError(
                f"retrain_every_seconds: must be >= 0, got {self.retrain_every_seconds}"
            )
        check_positive("workers", self.workers)
        if self.device not in {"cpu", "cuda"}:
            raise SettingsError(f"device: must be cpu or cuda, got {self.device!r}")
        check_positive("train_timeout_seconds", self.train_timeout_seconds)
        if not 0 <= self.gate_threshold < 1:
            raise SettingsError(f"gate_threshold: must be in [0, 1), got {self.gate_threshold}")
        check_positive("keep_versions", self.keep_versions)
        if not 0 < self.holdout_fraction < 1:
            raise SettingsError(f"holdout_fraction: must be in (0, 1), got {self.holdout_fraction}")
        check_positive("holdout_max_events", self.holdout_max_events)
        if self.scorer and not _SCORER.match(self.scorer):
            raise SettingsError(f"scorer: expected module:function, got {self.scorer!r}")
        try:
            words = shlex.split(self.train_command_template())
        except ValueError as exc:
            raise SettingsError(f"train_command: cannot be split into words ({exc})") from None
        if not words:
            raise SettingsError("train_command: is empty")
        for name in re.findall(r"{(\w*)}", self.train_command_template()):
            if name not in TRAIN_PLACEHOLDERS:
                raise SettingsError(
                    f"train_command: unknown placeholder {{{name}}} "
                    f"(known: {', '.join(sorted(TRAIN_PLACEHOLDERS))})"
                )
        if self.debug_pause_point not in PAUSE_POINTS:
            raise SettingsError(
                f"debug_pause_point: must be one of {sorted(PAUSE_POINTS)}, "
                f"got {self.debug_pause_point!r}"
            )
        if self.debug_pause_seconds < 0:
            raise SettingsError(
                f"debug_pause_seconds: must be >= 0, got {self.debug_pause_seconds}"
            )

    def train_command_template(self) -> str:
        return self.train_command or DEFAULT_TRAIN_COMMAND

    def log_path(self) -> Path:
        return Path(self.log_dir) if self.log_dir else run_dir() / "trainer"

    def registry_path(self) -> Path:
        return Path(self.registry_dir) if self.registry_dir else run_dir() / "registry"

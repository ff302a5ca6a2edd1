"""Prometheus metrics of the trainer service (``coldstart_trainer_*``)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

CONSUMER_LAG = Gauge(
    "coldstart_trainer_consumer_lag",
    "Messages behind the end of the events topic, summed over assigned partitions.",
)
EVENTS_APPLIED = Counter(
    "coldstart_trainer_events_applied_total",
    "Events newly written to the event log (duplicates and dropped events excluded).",
)
EVENTS_DUPLICATE = Counter(
    "coldstart_trainer_events_duplicate_total",
    "Events whose id was already in the log (replays, producer retries).",
)
EVENTS_DROPPED_FORGOTTEN = Counter(
    "coldstart_trainer_events_dropped_forgotten_total",
    "Events of forgotten users that were not written.",
)
USERS_FORGOTTEN = Counter(
    "coldstart_trainer_users_forgotten_total",
    "Users erased from the event log.",
)
EVENTS_DEAD_LETTERED = Counter(
    "coldstart_trainer_events_dead_lettered_total",
    "Messages sent to the dead-letter topic, by reason.",
    ["reason"],
)
APPLY_BATCH_SECONDS = Histogram(
    "coldstart_trainer_apply_batch_seconds",
    "Time to write one poll batch to the event log (one transaction).",
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
)
CONSUMER_RESTARTS = Counter(
    "coldstart_trainer_consumer_restarts_total",
    "Consumers replaced: exited (process crash, kill), stalled (process silent, killed) "
    "or not_fetching (empty polls with a backlog: consumer recreated in its process).",
    ["reason"],
)
LOG_WRITE_FAILURES = Counter(
    "coldstart_trainer_log_write_failures_total",
    "Batches that could not be written (disk full, read-only); re-read after a back-off.",
)
TRAINING_DURATION = Histogram(
    "coldstart_trainer_training_duration_seconds",
    "Duration of the training step of a retraining run.",
    buckets=(1, 5, 10, 30, 60, 120, 300, 600, 1200, 3600),
)
RUN_DURATION = Histogram(
    "coldstart_trainer_run_duration_seconds",
    "Duration of a whole retraining run (export, training, evaluation, publishing).",
    buckets=(1, 5, 10, 30, 60, 120, 300, 600, 1200, 3600),
)
EVALUATION_RECALL = Gauge(
    "coldstart_trainer_evaluation_recall_at_20",
    "Recall@20 on the held-out newest events in the last run, by model.",
    ["model"],
)
RUNS = Counter(
    "coldstart_trainer_runs_total",
    "Finished retraining runs, by outcome.",
    ["outcome"],
)

# Make every labelled series exist from the start (a dashboard sees 0, not nothing).
for _outcome in ("published", "gated", "failed"):
    RUNS.labels(_outcome)
for _model in ("current", "candidate"):
    EVALUATION_RECALL.labels(_model)

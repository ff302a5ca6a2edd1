"""`coldstart bench scale`: how each part's cost grows with the work (issue 22).

    coldstart bench scale [--sizes small,medium,large] [--only ingest,store,...]

Seeded synthetic catalogs (``SIZES``: users / items / events, the events being one
upsert per item, one registration per user with a 384-d interest vector, the rest
interactions, a fifth of them ratings, items skewed towards low ids). Per size:

- ``ingest``: events/s of the trainer's own ingest (``bench.ingest.trainer_rate``:
  Kafka topic -> the SQLite event log), after the events were produced to a
  6-partition topic of a local broker;
- ``store``: events/s applied to the online store, both backends, on the same
  chunks: ``UserStore.apply_events`` (memory) and ``RedisUserStore.apply_events``
  (Redis, a writer's path: read, compare-and-set script, event-id keys) in batches of
  a poll (2,000) against a real ``redis-server`` the bench starts on a free port;
- ``export``: ``build_training_set`` of that log to a training folder, alone in a
  fresh process (``bench.training.measured``: the peak RSS is the export's);
- ``training``: ``coldstart train`` on the exported folder with 1 and 2 gloo workers,
  one tower epoch (hashing embedder, no ranker, no validation, 1 thread per worker),
  under ``bench.training.measured``: seconds per epoch (the towers stage) and the peak
  RSS of the largest worker (``RUSAGE_CHILDREN`` of a fresh measuring parent);
- ``snapshot``: write and restore seconds of the memory store's columnar snapshot
  (``bench.snapshot._measure_once``);
- ``fusion``: RSS of a fusion server (100k-item synthetic version) with the memory
  backend restoring that snapshot, and with the Redis backend over the store holding
  the size's users (after 2,000 Recommends over random users of the whole store and
  the load phase below);
- ``recommend``: Recommend vs Echo at 64 clients (``bench.fusion.drive``) and
  freshness p99 (``bench.fusion.freshness``: event -> the next Recommend sees it)
  with the Redis backend (the server is also the state writer, on its own topic).

Results: bench/results/scale.json (every point), a printed table with the fitted
exponent of each cost against events (least squares on log-log), the issue's targets
as PASS/FAIL lines, and bench/results/scale.png. Everything on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench.runner import RESULTS_DIR, write_results

REPO = Path(__file__).resolve().parents[1]
CHUNK = 50_000  # events generated, produced and applied at a time
REDIS_BATCH = 2_000  # a writer's poll (services.common.kafka_consumer.MAX_POLL_RECORDS)
DIMENSION = 384
RATING_SHARE = 0.2
CLIENTS = 64
TOUCH_CALLS = 2_000
KEY_PREFIX = "scale:"


@dataclass(frozen=True)
class Size:
    name: str
    users: int
    items: int
    events: int


SIZES: dict[str, Size] = {
    "small": Size("small", 10_000, 1_000, 200_000),
    "medium": Size("medium", 100_000, 10_000, 2_000_000),
    "large": Size("large", 1_000_000, 100_000, 20_000_000),
}
PARTS = ("ingest", "store", "export", "training", "snapshot", "fusion", "recommend")
# What a part needs measured before it (the log to export, the store to snapshot...).
NEEDS: dict[str, tuple[str, ...]] = {
    "export": ("ingest",),
    "training": ("export",),
    "snapshot": ("store",),
    "fusion": ("snapshot",),
    "recommend": ("store",),
}


@dataclass(frozen=True)
class Measure:
    key: str
    label: str
    unit: str
    cost: bool  # a cost fitted against events (and plotted); rates are shown only


MEASURES = (
    Measure("produce_events_per_s", "produce to Kafka", "events/s", False),
    Measure("trainer_events_per_s", "trainer ingest (log)", "events/s", False),
    Measure("trainer_s", "trainer ingest time", "s", True),
    Measure("memory_store_events_per_s", "memory store apply", "events/s", False),
    Measure("memory_store_s", "memory store apply time", "s", True),
    Measure("redis_store_events_per_s", "Redis writer apply", "events/s", False),
    Measure("redis_store_s", "Redis writer apply time", "s", True),
    Measure("redis_used_mb", "Redis used_memory", "MB", True),
    Measure("export_s", "export time", "s", True),
    Measure("export_rss_mb", "export peak RSS", "MB", True),
    Measure("train_w1_s_per_epoch", "training, 1 worker", "s/epoch", True),
    Measure("train_w2_s_per_epoch", "training, 2 workers", "s/epoch", True),
    Measure("train_w1_rss_mb", "train RSS, 1 worker", "MB", True),
    Measure("train_w2_rss_mb", "train RSS per worker, 2", "MB", True),
    Measure("snapshot_write_s", "snapshot write", "s", True),
    Measure("snapshot_read_s", "snapshot restore", "s", True),
    Measure("snapshot_mb", "snapshot size", "MB", True),
    Measure("fusion_memory_rss_mb", "fusion RSS, memory", "MB", True),
    Measure("fusion_redis_rss_mb", "fusion RSS, Redis", "MB", True),
    Measure("echo_qps", "echo QPS, 64 clients", "calls/s", False),
    Measure("recommend_qps", "Recommend QPS (Redis)", "calls/s", False),
    Measure("recommend_vs_echo", "Recommend / echo", "ratio", False),
    Measure("recommend_p50_ms", "Recommend p50", "ms", False),
    Measure("recommend_p99_ms", "Recommend p99", "ms", False),
    Measure("freshness_p99_ms", "freshness p99 (Redis)", "ms", False),
)
# Costs the issue wants at most linear in events.
LINEAR = ("trainer_s", "memory_store_s", "redis_store_s", "export_s", "train_w1_s_per_epoch",
          "train_w2_s_per_epoch")  # fmt: skip


# -- pure parts (tests/unit/bench/test_bench_scale.py) --------------------------------
def parse_sizes(text: str) -> list[Size]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in SIZES]
    if unknown or not names:
        raise ValueError(f"--sizes: want some of {','.join(SIZES)}, got {text!r}")
    # Smallest first: a failure shows up before the long runs.
    return sorted({SIZES[n] for n in names}, key=lambda s: s.events)


def parse_parts(text: str) -> tuple[str, ...]:
    """``--only``: the parts asked for plus what they need, in run order."""
    names = {n.strip() for n in text.split(",") if n.strip()}
    unknown = sorted(names - set(PARTS))
    if unknown or not names:
        raise ValueError(f"--only: want some of {','.join(PARTS)}, got {text!r}")
    todo = list(names)
    while todo:
        for need in NEEDS.get(todo.pop(), ()):
            if need not in names:
                names.add(need)
                todo.append(need)
    return tuple(p for p in PARTS if p in names)


def fit_exponent(xs: Sequence[float | None], ys: Sequence[float | None]) -> float | None:
    """Slope of log(y) against log(x) (least squares); None without two usable points."""
    pairs = [
        (math.log(x), math.log(y))
        for x, y in zip(xs, ys, strict=True)
        if x is not None and y is not None and x > 0 and y > 0
    ]
    if len({x for x, _ in pairs}) < 2:
        return None
    lx = np.array([p[0] for p in pairs])
    ly = np.array([p[1] for p in pairs])
    slope, _ = np.polyfit(lx, ly, 1)
    return float(slope)


def exponents(points: Sequence[Mapping[str, Any]]) -> dict[str, float | None]:
    events = [float(p["events"]) for p in points]
    return {m.key: fit_exponent(events, [p.get(m.key) for p in points]) for m in MEASURES if m.cost}


def table_rows(points: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One row per measure, one column per size, and the fitted exponent."""
    fitted = exponents(points)
    rows = []
    for m in MEASURES:
        values = {str(p["size"]): p.get(m.key) for p in points}
        if all(v is None for v in values.values()):
            continue
        exponent = fitted.get(m.key)
        rows.append(
            {
                "measure": m.label,
                "unit": m.unit,
                **values,
                "exponent": None if exponent is None else round(exponent, 2),
            }
        )
    return rows


@dataclass(frozen=True)
class Target:
    name: str
    passed: bool | None  # None: not measured in this run
    detail: str

    def line(self) -> str:
        verdict = {True: "PASS", False: "FAIL", None: "n/a "}[self.passed]
        return f"{verdict} {self.name}: {self.detail}"


def evaluate_targets(points: Sequence[Mapping[str, Any]]) -> list[Target]:
    """The issue's targets over what was measured (smallest and largest size measured)."""
    points = sorted(points, key=lambda p: p["events"])
    out: list[Target] = []

    rss = [p for p in points if p.get("fusion_redis_rss_mb")]
    name = "fusion RSS with Redis flat in users (within 10%; issue: 10k -> 1M users)"
    if len(rss) >= 2:
        first, last = rss[0], rss[-1]
        growth = last["fusion_redis_rss_mb"] / first["fusion_redis_rss_mb"] - 1
        detail = (
            f"{first['fusion_redis_rss_mb']:.0f} MB at {first['users']:,} users -> "
            f"{last['fusion_redis_rss_mb']:.0f} MB at {last['users']:,} ({growth:+.1%})"
        )
        out.append(Target(name, abs(growth) <= 0.10, detail))
    else:
        out.append(Target(name, None, "needs two sizes with the fusion part"))

    fitted = exponents(points)
    labels = {m.key: m.label for m in MEASURES}
    for key in LINEAR:
        exponent = fitted.get(key)
        name = f"{labels[key]} grows at most linearly in events (exponent <= 1.1)"
        if exponent is None:
            out.append(Target(name, None, "needs two sizes"))
        else:
            out.append(Target(name, exponent <= 1.1, f"exponent {exponent:.2f}"))

    ratios = [p for p in points if p.get("recommend_vs_echo") is not None]
    name = f"Recommend with Redis >= 0.35 of echo at {CLIENTS} clients"
    if ratios:
        worst = min(ratios, key=lambda p: p["recommend_vs_echo"])
        detail = ", ".join(f"{p['size']} {p['recommend_vs_echo']:.2f}" for p in ratios)
        out.append(Target(name, worst["recommend_vs_echo"] >= 0.35, detail))
    else:
        out.append(Target(name, None, "recommend part not run"))

    fresh = [p for p in points if p.get("freshness_p99_ms") is not None]
    name = "freshness p99 <= 1 s (Redis)"
    if fresh:
        worst_ms = max(p["freshness_p99_ms"] for p in fresh)
        detail = ", ".join(f"{p['size']} {p['freshness_p99_ms']:.0f} ms" for p in fresh)
        out.append(Target(name, worst_ms <= 1000, detail))
    else:
        out.append(Target(name, None, "recommend part not run"))

    trained = [p for p in points if p.get("train_w1_rss_mb") and p.get("train_w2_rss_mb")]
    name = "per-worker RSS with 2 workers <= 0.65x 1 worker at the largest size"
    if trained:
        last = trained[-1]
        ratio = last["train_w2_rss_mb"] / last["train_w1_rss_mb"]
        detail = (
            f"{last['size']}: {last['train_w2_rss_mb']:.0f} / {last['train_w1_rss_mb']:.0f} MB"
            f" = {ratio:.2f}x"
        )
        out.append(Target(name, ratio <= 0.65, detail))
    else:
        out.append(Target(name, None, "training part not run"))
    return out


# -- the synthetic stream ---------------------------------------------------------
def user_id(n: int) -> str:
    # bench.fusion's clients ask for bench-user-0..999: they are users of every size.
    return f"bench-user-{n}"


def synthetic_events(size: Size, seed: int, start: int, stop: int) -> list[Any]:
    """Events ``start``..``stop`` of the size's stream; the same for the same arguments
    (event ids too, so every sink sees the very same events)."""
    from coldstart.v1 import events_pb2

    from services.common.events import new_event

    rng = np.random.default_rng([seed, size.events, start])
    base_ms = 1_700_000_000_000
    out: list[Any] = []
    items_end, users_end = size.items, size.items + size.users
    # Interactions of the chunk drawn at once (the chunk's share of them).
    first_interaction = max(start, users_end)
    count = max(0, stop - first_interaction)
    users = rng.integers(0, size.users, count)
    items = (rng.random(count) ** 2 * size.items).astype(np.int64)  # popular low ids
    rated = rng.random(count) < RATING_SHARE
    values = rng.integers(1, 6, count)
    for index in range(start, stop):
        event_id = str(uuid.UUID(int=(seed << 64) | index))
        ts = base_ms + index * 10
        if index < items_end:
            event = new_event(
                "bench",
                event_id=event_id,
                timestamp_ms=ts,
                item_upserted=events_pb2.ItemUpserted(
                    item_id=f"item-{index}",
                    text=f"item {index} of genre {index % 20}",
                    attributes={"genre": f"g{index % 20}"},
                ),
            )
        elif index < users_end:
            u = index - items_end
            event = new_event(
                "bench",
                event_id=event_id,
                timestamp_ms=ts,
                user_registered=events_pb2.UserRegistered(
                    user_id=user_id(u),
                    attributes={"age_band": f"band-{u % 6}", "region": f"region-{u % 8}"},
                    interest_vector=rng.standard_normal(DIMENSION, dtype=np.float32).tolist(),
                ),
            )
        else:
            k = index - first_interaction
            rating = bool(rated[k])
            event = new_event(
                "bench",
                event_id=event_id,
                timestamp_ms=ts,
                interaction=events_pb2.Interaction(
                    user_id=user_id(int(users[k])),
                    item_id=f"item-{int(items[k])}",
                    kind="rating" if rating else "view",
                    value=float(values[k]) if rating else 1.0,
                ),
            )
        out.append(event)
    return out


# -- measurements -----------------------------------------------------------------
class Clock:
    """Seconds spent in the timed blocks, summed."""

    def __init__(self) -> None:
        self.seconds = 0.0

    @contextlib.contextmanager
    def timed(self) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds += time.perf_counter() - started


def fill(
    size: Size, seed: int, bootstrap: str, topic: str, stores: bool, redis_url: str
) -> tuple[dict[str, Any], Any]:
    """Produce the stream to ``topic`` and (``stores``) apply it to both online stores,
    chunk by chunk. Returns (figures, the memory store or None)."""
    from services.common.events import make_producer, produce_and_wait
    from services.fusion.online_state import UserStore
    from services.fusion.redis_state import RedisUserStore, redis_client

    producer = make_producer(bootstrap, client_id="bench-scale", linger_ms=50, batch_size=1 << 20)
    memory = UserStore() if stores else None
    redis_store = (
        RedisUserStore(redis_client(redis_url, 30.0), prefix=KEY_PREFIX) if stores else None
    )
    produce, apply_memory, apply_redis, generate = Clock(), Clock(), Clock(), Clock()
    applied_memory = applied_redis = 0
    try:
        for start in range(0, size.events, CHUNK):
            with generate.timed():
                events = synthetic_events(size, seed, start, min(start + CHUNK, size.events))
            with produce.timed():
                produce_and_wait(producer, topic, events, timeout_s=300)
            if memory is not None and redis_store is not None:
                with apply_memory.timed():
                    applied_memory += memory.apply_events(events)
                with apply_redis.timed():
                    for first in range(0, len(events), REDIS_BATCH):
                        applied_redis += redis_store.apply_events(
                            events[first : first + REDIS_BATCH]
                        )
            del events
            if start // CHUNK % 20 == 19:
                print(f"  {start + CHUNK:,} of {size.events:,} events", flush=True)
    finally:
        producer.close()
    figures: dict[str, Any] = {
        "generate_s": round(generate.seconds, 1),
        "produce_events_per_s": round(size.events / produce.seconds),
    }
    if memory is not None and redis_store is not None:
        figures.update(
            memory_store_s=round(apply_memory.seconds, 2),
            memory_store_events_per_s=round(size.events / apply_memory.seconds),
            redis_store_s=round(apply_redis.seconds, 2),
            redis_store_events_per_s=round(size.events / apply_redis.seconds),
            memory_store_applied=applied_memory,
            redis_store_applied=applied_redis,
            memory_store_users=len(memory),
            redis_used_mb=round(redis_store.client.info("memory")["used_memory"] / 2**20, 1),
        )
        redis_store.client.close()
    return figures, memory


def end_offsets(bootstrap: str, topic: str) -> dict[str, int]:
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=bootstrap, client_id="bench-scale-offsets")
    try:
        partitions = [
            TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic))
        ]
        return {str(tp.partition): int(o) for tp, o in consumer.end_offsets(partitions).items()}
    finally:
        consumer.close()


def ingest(size: Size, bootstrap: str, topic: str, work: Path) -> dict[str, Any]:
    from bench.ingest import trainer_rate
    from services.trainer.settings import TrainerSettings

    settings = TrainerSettings()
    rate = trainer_rate(
        bootstrap,
        topic,
        size.events,
        work,
        5000,
        settings.check_crcs,
        settings.ingest_processes,
        # Generous: at the slowest rate (20,000/s) plus the start.
        timeout_s=60 + size.events / 5_000,
        log_path=work / "events.sqlite",
    )
    return {"trainer_events_per_s": round(rate), "trainer_s": round(size.events / rate, 2)}


def snapshot(
    memory: Any, work: Path, seed: int, topic: str, offsets: Mapping[str, int]
) -> tuple[dict[str, Any], Path]:
    """Write/restore seconds (bench.snapshot), then the snapshot a fusion server restores."""
    from bench.snapshot import _measure_once
    from services.fusion.online_state import (
        SNAPSHOT_FILE,
        SNAPSHOT_FORMAT,
        UserStore,
        write_snapshot,
    )

    row = _measure_once(memory, work, seed, "columnar")
    folder = work / "fusion-memory"
    folder.mkdir(parents=True, exist_ok=True)
    document: dict[str, Any] = {
        "format": SNAPSHOT_FORMAT,
        "topic": topic,
        "offsets": dict(offsets),  # the end of the topic: the server replays nothing
        "taken_at_ms": int(time.time() * 1000),
        "items": [],
    }
    document.update(UserStore.encode(memory.capture()))
    write_snapshot(folder / SNAPSHOT_FILE, document)
    del document
    return {
        "snapshot_write_s": row["write_s"],
        "snapshot_read_s": row["read_s"],
        "snapshot_mb": round(row["bytes"] / 2**20, 1),
        "snapshot_exact": row["exact"],
    }, folder


def export_worker(log_path: Path, folder: Path, topic: str) -> int:
    """In its own process (``--export-worker``): the export, its rows as JSON."""
    from services.trainer.event_log import EventLog
    from services.trainer.settings import TrainerSettings
    from services.trainer.training_set import build_training_set, empty_initial

    settings = TrainerSettings()
    log = EventLog(log_path)
    initial = empty_initial()
    started = time.perf_counter()
    with log.reader() as conn:
        exported = build_training_set(
            conn,
            initial,
            folder,
            topic=topic,
            holdout_fraction=settings.holdout_fraction,
            holdout_max_events=settings.holdout_max_events,
        )
    seconds = time.perf_counter() - started
    log.close()
    print(
        EXPORTED
        + json.dumps(
            {
                "export_s": round(seconds, 2),
                "training_rows": exported.training_rows,
                "skipped_unknown_items": exported.skipped_unknown_items,
            }
        )
    )
    return 0


EXPORTED = "EXPORTED "


def export(work: Path, topic: str, timeout_s: float) -> tuple[dict[str, Any], Path]:
    """The export of the log the ingest wrote, alone in a fresh process
    (``bench.training.measured``: peak RSS of that process and nothing else)."""
    from bench.training import measured

    folder = work / "training-set"
    command = ["-m", "bench.scale", "--export-worker", str(work / "events.sqlite"), str(folder),
               topic]  # fmt: skip
    run = measured(command, timeout_s=timeout_s)
    line = next(x for x in run["output"].splitlines() if x.startswith(EXPORTED))
    figures: dict[str, Any] = json.loads(line.removeprefix(EXPORTED))
    figures["export_rss_mb"] = round(run["peak_rss_mb"])
    return figures, folder


def train(folder: Path, workers: int, work: Path, timeout_s: float) -> dict[str, Any]:
    """One tower epoch of ``coldstart train`` on the exported folder, under
    ``bench.training.measured``: seconds per epoch (the towers stage) and the peak RSS
    of the largest process, i.e. of the largest worker."""
    from bench.training import measured

    out = work / f"train-{workers}"
    shutil.rmtree(out, ignore_errors=True)
    command = ["-m", "services.cli", "train", "--data", str(folder), "--workers", str(workers),
               "--epochs", "1", "--no-ranker", "--embedder", "hashing", "--validation", "none",
               "--threads", "1", "--cpu", "--quiet", "--out", str(out)]  # fmt: skip
    run = measured(command, timeout_s=timeout_s)
    meta = json.loads((out / "model" / "meta.json").read_text())
    seconds = meta["training"]["stage_seconds"]["towers"]
    shutil.rmtree(out, ignore_errors=True)
    return {
        f"train_w{workers}_s_per_epoch": round(float(seconds), 2),
        f"train_w{workers}_rss_mb": round(run["peak_rss_mb"]),
        f"train_w{workers}_wall_s": round(run["seconds"], 1),
    }


def touch_users(address: str, users: int, calls: int, seed: int) -> None:
    """Recommend for random users of the whole store (the load phase asks for 1,000)."""
    import grpc
    from coldstart.v1 import common_pb2, fusion_pb2, fusion_pb2_grpc

    rng = np.random.default_rng(seed)
    with grpc.insecure_channel(address) as channel:
        stub = fusion_pb2_grpc.FusionServiceStub(channel)
        for n in rng.integers(0, users, calls):
            user = common_pb2.UserContext(user_id=user_id(int(n)))
            stub.Recommend(fusion_pb2.RecommendRequest(user=user, k=10), timeout=10)


def fusion_memory(
    work: Path, registry: Path, bootstrap: str, topic: str, snapshot_dir: Path
) -> dict[str, Any]:
    from bench.fusion import rss_mb, server

    settings = {
        "registry_dir": registry,
        "kafka_bootstrap": bootstrap,
        "events_topic": topic,
        "snapshot_dir": snapshot_dir,
        "snapshot_interval_s": 3600,
        "log_level": "WARNING",
    }
    started = time.perf_counter()
    with server("fusion", work, settings) as (_address, pid):
        serving_s = time.perf_counter() - started
        time.sleep(2.0)
        rss = rss_mb(pid)
    return {"fusion_memory_rss_mb": round(rss), "fusion_memory_start_s": round(serving_s, 1)}


def fusion_redis(
    size: Size,
    work: Path,
    registry: Path,
    bootstrap: str,
    redis_url: str,
    parts: Sequence[str],
    duration_s: float,
    freshness_samples: int,
) -> dict[str, Any]:
    from bench.fusion import drive, freshness, rss_mb, server
    from bench.ingest import make_topic

    topic = make_topic(bootstrap, "scale-fresh")
    common = {"max_workers": CLIENTS, "log_level": "WARNING"}
    settings = {
        **common,
        "registry_dir": registry,
        "kafka_bootstrap": bootstrap,
        "events_topic": topic,
        "snapshot_dir": work / "fusion-redis",
        "state_backend": "redis",
        "redis_url": redis_url,
        "redis_key_prefix": KEY_PREFIX,
        "state_writer": "true",
        "state_group": f"bench-scale-{uuid.uuid4().hex[:6]}",
    }
    out: dict[str, Any] = {}
    with (
        server("echo", work, common) as (echo_address, echo_pid),
        server("fusion", work, settings) as (address, pid),
    ):
        touch_users(address, size.users, TOUCH_CALLS, size.events)
        if "recommend" in parts:
            echo = drive(echo_address, "echo", CLIENTS, duration_s, 2, echo_pid)
            rec = drive(address, "recommend", CLIENTS, duration_s, 2, pid)
            out.update(
                echo_qps=echo["qps"],
                recommend_qps=rec["qps"],
                recommend_vs_echo=round(rec["qps"] / max(echo["qps"], 1e-9), 3),
                recommend_p50_ms=rec["p50_ms"],
                recommend_p99_ms=rec["p99_ms"],
                echo_p99_ms=echo["p99_ms"],
                recommend_errors=rec["errors"] + echo["errors"],
                recommend_server_cpu=rec["server_cpu"],
            )
            fresh = freshness(address, bootstrap, topic, freshness_samples)
            out.update(
                freshness_p50_ms=fresh["p50_ms"],
                freshness_p99_ms=fresh["p99_ms"],
                freshness_over_10s=fresh["over_10s"],
            )
        if "fusion" in parts:
            out["fusion_redis_rss_mb"] = round(rss_mb(pid))
    return out


def run_size(
    size: Size,
    parts: Sequence[str],
    args: argparse.Namespace,
    bootstrap: str,
    root: Path,
    registry: Path,
) -> dict[str, Any]:
    from bench.ingest import make_topic
    from services.common.redis_server import running_redis

    work = root / size.name
    work.mkdir(parents=True, exist_ok=True)
    point: dict[str, Any] = {"size": size.name, "users": size.users, "items": size.items,
                             "events": size.events}  # fmt: skip
    started = time.perf_counter()
    # Other work on this shared machine shows in the figures: say how busy it was.
    point["load_avg_at_start"] = round(os.getloadavg()[0], 2)
    finished: dict[str, float] = {}
    point["finished_at_s"] = finished

    def note(part: str) -> None:
        finished[part] = round(time.perf_counter() - started, 1)
        print(f"[{size.name}] {part} done at {finished[part]:.0f} s", flush=True)

    topic = make_topic(bootstrap, f"scale-{size.name}")
    with running_redis(work / "redis") as redis_server:
        stores = any(p in parts for p in ("store", "snapshot", "fusion", "recommend"))
        figures, memory = fill(size, args.seed, bootstrap, topic, stores, redis_server.url)
        point.update(figures)
        note("produce + stores")
        if "ingest" in parts:
            point.update(ingest(size, bootstrap, topic, work))
            note("ingest")
        snapshot_dir: Path | None = None
        if memory is not None and "snapshot" in parts:
            figures, snapshot_dir = snapshot(
                memory, work, args.seed, topic, end_offsets(bootstrap, topic)
            )
            point.update(figures)
            note("snapshot")
        del memory  # the servers and the trainer get the memory back
        gc.collect()
        if "fusion" in parts and snapshot_dir is not None:
            point.update(fusion_memory(work, registry, bootstrap, topic, snapshot_dir))
            note("fusion memory")
            shutil.rmtree(snapshot_dir, ignore_errors=True)
        if "fusion" in parts or "recommend" in parts:
            point.update(
                fusion_redis(size, work, registry, bootstrap, redis_server.url, parts,
                             args.duration, args.freshness_samples)
            )  # fmt: skip
            note("fusion Redis")
    if "export" in parts:
        figures, folder = export(work, topic, timeout_s=600 + size.events / 2_000)
        point.update(figures)
        note("export")
        if "training" in parts:
            for workers in (1, 2):
                point.update(train(folder, workers, work, timeout_s=args.train_timeout))
                note(f"training, {workers} worker(s)")
    point["wall_s"] = round(time.perf_counter() - started, 1)
    point["load_avg_at_end"] = round(os.getloadavg()[0], 2)
    shutil.rmtree(work, ignore_errors=True)
    return point


# -- output -----------------------------------------------------------------------
def plot(points: Sequence[Mapping[str, Any]], path: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fitted = exponents(points)
    events = [float(p["events"]) for p in points]
    if len(set(events)) < 2:
        return None
    fig, (times, memory) = plt.subplots(1, 2, figsize=(14, 6))
    for m in MEASURES:
        ys = [p.get(m.key) for p in points]
        exponent = fitted.get(m.key)
        if not m.cost or exponent is None:
            continue
        xs = [x for x, y in zip(events, ys, strict=True) if y]
        axis = memory if m.unit == "MB" else times
        axis.loglog(xs, [y for y in ys if y], marker="o", label=f"{m.label} (k={exponent:.2f})")
    for axis, title, unit in ((times, "time", "seconds"), (memory, "memory", "MB")):
        axis.set_xlabel("events")
        axis.set_ylabel(unit)
        axis.set_title(f"{title} against size (k: fitted log-log exponent)")
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="coldstart bench scale", description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="small,medium", help="of small,medium,large")
    p.add_argument("--only", default=",".join(PARTS), help=f"parts, of {','.join(PARTS)}")
    p.add_argument("--seed", type=int, default=22)
    p.add_argument("--duration", type=float, default=8.0, help="seconds per load phase")
    p.add_argument("--freshness-samples", type=int, default=30)
    p.add_argument("--train-timeout", type=float, default=3600.0, help="seconds per training run")
    p.add_argument("--dir", type=Path, default=None, help="work folder (default: a temp dir)")
    p.add_argument("--export-worker", nargs=3, metavar=("LOG", "FOLDER", "TOPIC"),
                   help=argparse.SUPPRESS)  # fmt: skip
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if args.export_worker:
        log_path, folder, topic = args.export_worker
        return export_worker(Path(log_path), Path(folder), topic)
    try:
        sizes = parse_sizes(args.sizes)
        parts = parse_parts(args.only)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.duration <= 0 or args.freshness_samples < 1:
        print("error: --duration and --freshness-samples must be positive", file=sys.stderr)
        return 2
    from bench.fusion import cached_catalog, linked_registry
    from services.common.kafka.local_broker import LocalKafka

    points: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-scale-", dir=args.dir) as tmp:
        root = Path(tmp)
        registry = linked_registry(cached_catalog(100_000), root / "registry").root
        broker = LocalKafka(root / "kafka", owned=True)
        try:
            bootstrap = broker.start(topics=()).bootstrap
            for size in sizes:
                print(f"--- {size.name}: {size.users:,} users, {size.items:,} items, "
                      f"{size.events:,} events; parts {','.join(parts)}", flush=True)  # fmt: skip
                points.append(run_size(size, parts, args, bootstrap, root, registry))
                print(json.dumps(points[-1]), flush=True)
        finally:
            broker.stop()
    targets = evaluate_targets(points)
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    png = plot(points, RESULTS_DIR / "scale.png")
    meta = {
        "sizes": [s.name for s in sizes],
        "parts": list(parts),
        "seed": args.seed,
        "cpus": os.cpu_count(),
        "points": points,
        "exponents": exponents(points),
        "targets": [{"name": t.name, "passed": t.passed, "detail": t.detail} for t in targets],
        "plot": str(png) if png else None,
    }
    write_results("scale", table_rows(points), meta)
    for target in targets:
        print(target.line())
    if png:
        print(f"-> {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

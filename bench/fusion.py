"""`coldstart bench fusion`: the fusion service as a real process over a
100k-item catalog, beside the echo service (the runtime's floor) in the same run.

1. Throughput and p50/p99 latency of Recommend and of Echo at 1, 16 and 64
   concurrent clients (one channel per client; clients spread over several
   processes so one Python client process is not the ceiling).
2. Freshness: an event produced to Kafka -> first Recommend that reflects it.
3. Memory: fusion RSS with the 100k catalog minus RSS with a 1k catalog.
4. Five model swaps under 50 concurrent clients: failed calls (must be 0).

Everything (broker, servers, clients) runs on this machine's cores; the table's
``server_cpu`` column says how busy the server was (with ``--processes`` > 1, the
supervisor and its workers together), so a client-bound run is visible as such.

``--rounds N`` alternates echo and Recommend N times per client count and reports
the median round's ratio (a shared machine's other load shifts by the minute);
``--processes N`` runs echo and fusion as N processes each (the runtime's
``processes`` setting); ``--set k=v`` sets a fusion setting (e.g. ``max_batch=1``);
``--freshness-samples 0`` / ``--swaps 0`` leave those phases out (no pass then).
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing as mp
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from bench.runner import write_results
from services.common.metrics import free_port
from services.common.paths import REPO_ROOT, cache_dir
from services.common.registry import ModelRegistry

CATALOG_ITEMS = 100_000
DIMENSION = 64
CONTENT_DIMENSION = 384
USERS = 1_000
# Bumped when the synthetic version's files change (2: the ANN index is tuned,
# services.common.ann), so a cached catalog of an older build is not reused.
CATALOG_REVISION = 2


# -- set-up ---------------------------------------------------------------------
def cached_catalog(n_items: int) -> ModelRegistry:
    """A synthetic version, built once per size and reused by later runs."""
    registry = ModelRegistry(cache_dir() / "bench" / f"fusion-{n_items}-{CATALOG_REVISION}")
    if registry.current() is None:
        from services.fusion.synthetic import publish_version

        print(f"building a synthetic {n_items}-item version (once)...", flush=True)
        publish_version(
            registry, n_items=n_items, dimension=DIMENSION, content_dimension=CONTENT_DIMENSION
        )
    return registry


def linked_registry(source: ModelRegistry, target: Path) -> ModelRegistry:
    """A registry whose first version hard-links the cached files (they are immutable)."""
    version = source.current()
    assert version is not None
    registry = ModelRegistry(target)
    registry.versions_dir.mkdir(parents=True, exist_ok=True)
    shutil.copytree(source.path(version), registry.path(version), copy_function=os.link)
    registry.set_current(version)
    return registry


def publish_copy(registry: ModelRegistry, source: Path) -> str:
    """A new version with the same files: what a retrain looks like to the server."""
    import json

    manifest = json.loads((source / "manifest.json").read_text())
    manifest.pop("version", None)
    manifest.pop("created_at", None)
    manifest.pop("parent_version", None)
    with registry.stage(manifest, tag="bench") as folder:
        for item in source.iterdir():
            if item.name != "manifest.json":
                os.link(item, folder / item.name)
    registry.set_current(manifest["version"])
    return str(manifest["version"])


@contextlib.contextmanager
def server(name: str, log_dir: Path, settings: dict[str, Any]) -> Iterator[tuple[str, int]]:
    """`coldstart serve <name>` on a free port; yields (address, pid)."""
    port = free_port()
    args = ["serve", name, "--set", f"port={port}"]
    for key, value in settings.items():
        args += ["--set", f"{key}={value}"]
    log = (log_dir / f"{name}-{port}.log").open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "services.cli", *args],
        cwd=REPO_ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_serving(f"127.0.0.1:{port}", process, timeout_s=300)
        yield f"127.0.0.1:{port}", process.pid
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
        log.close()


def wait_serving(address: str, process: subprocess.Popen[bytes], timeout_s: float) -> None:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"{address}: server exited with {process.returncode}")
            with contextlib.suppress(grpc.RpcError):
                reply = health.Check(health_pb2.HealthCheckRequest(), timeout=1.0)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            time.sleep(0.2)
    raise TimeoutError(f"{address}: not SERVING within {timeout_s}s")


# -- clients --------------------------------------------------------------------
def _client_process(
    address: str, method: str, threads: int, start_at: float, duration_s: float, seed: int, out: Any
) -> None:
    """One client process: ``threads`` threads, each with its own channel."""
    import threading

    import grpc
    from coldstart.v1 import common_pb2, echo_pb2, echo_pb2_grpc, fusion_pb2, fusion_pb2_grpc

    latencies: list[float] = []
    errors: list[str] = []
    versions: set[str] = set()
    lock = threading.Lock()

    def run(n: int) -> None:
        rng = np.random.default_rng(seed * 1000 + n)
        own: list[float] = []
        own_errors: list[str] = []
        own_versions: set[str] = set()
        with grpc.insecure_channel(address) as channel:
            if method == "echo":
                echo = echo_pb2_grpc.EchoServiceStub(channel)
                call = lambda: echo.Echo(echo_pb2.EchoRequest(message="ping"), timeout=30)  # noqa: E731
            else:
                fusion = fusion_pb2_grpc.FusionServiceStub(channel)

                def call() -> Any:
                    user = common_pb2.UserContext(user_id=f"bench-user-{rng.integers(USERS)}")
                    reply = fusion.Recommend(
                        fusion_pb2.RecommendRequest(user=user, k=10), timeout=30
                    )
                    own_versions.add(reply.model_version)
                    return reply

            call()  # connect before the clock starts
            while time.time() < start_at:
                time.sleep(0.001)
            end = start_at + duration_s
            while True:
                started = time.perf_counter()
                if time.time() >= end:
                    break
                try:
                    call()
                    own.append(time.perf_counter() - started)
                except grpc.RpcError as exc:
                    own_errors.append(f"{exc.code()}: {exc.details()}")
        with lock:
            latencies.extend(own)
            errors.extend(own_errors)
            versions.update(own_versions)

    workers = [threading.Thread(target=run, args=(n,)) for n in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    out.put({"latencies": latencies, "errors": errors, "versions": sorted(versions)})


def drive(
    address: str, method: str, clients: int, duration_s: float, processes: int, pid: int
) -> dict[str, Any]:
    """Run ``clients`` concurrent clients for ``duration_s``; aggregate the results."""
    import psutil

    ctx = mp.get_context("spawn")  # grpc and fork do not mix
    queue = ctx.Queue()
    processes = max(1, min(processes, clients))
    shares = [
        clients // processes + (1 if i < clients % processes else 0) for i in range(processes)
    ]
    start_at = time.time() + 3.0 + 0.2 * processes
    procs = [
        ctx.Process(
            target=_client_process,
            args=(address, method, share, start_at, duration_s, i, queue),
            daemon=True,
        )
        for i, share in enumerate(shares)
    ]
    for proc in procs:
        proc.start()
    # The server and its workers (`processes` > 1 runs them as children of a supervisor).
    parent = psutil.Process(pid)
    targets = [parent, *parent.children(recursive=True)]
    while time.time() < start_at:
        time.sleep(0.01)
    for target in targets:
        target.cpu_percent(None)
    time.sleep(duration_s)
    server_cpu = sum(target.cpu_percent(None) for target in targets) / 100
    results = [queue.get(timeout=duration_s + 120) for _ in procs]
    for proc in procs:
        proc.join(timeout=30)
    latencies = np.asarray([x for r in results for x in r["latencies"]]) * 1000
    errors = [e for r in results for e in r["errors"]]
    return {
        "calls": len(latencies),
        "qps": round(len(latencies) / duration_s, 1),
        "p50_ms": round(float(np.percentile(latencies, 50)), 2) if len(latencies) else None,
        "p99_ms": round(float(np.percentile(latencies, 99)), 2) if len(latencies) else None,
        "errors": len(errors),
        "error_sample": errors[:3],
        "server_cpu": round(server_cpu, 2),
        "versions": sorted({v for r in results for v in r["versions"]}),
    }


# -- the phases -----------------------------------------------------------------
def seed_users(bootstrap: str, topic: str, registry: ModelRegistry) -> None:
    """Registrations and a few interactions for the users the clients ask about."""
    from coldstart.v1 import events_pb2

    from services.common.events import make_producer, new_event, produce_and_wait

    rng = np.random.default_rng(0)
    events = []
    for u in range(USERS):
        user = f"bench-user-{u}"
        events.append(
            new_event(
                "bench",
                user_registered=events_pb2.UserRegistered(
                    user_id=user, attributes={"age_band": ["18-24", "25-34", "35-49", "50+"][u % 4]}
                ),
            )
        )
        for item in rng.integers(CATALOG_ITEMS, size=5):
            events.append(
                new_event(
                    "bench",
                    interaction=events_pb2.Interaction(
                        user_id=user, item_id=f"item-{item}", kind="view", value=1
                    ),
                )
            )
    producer = make_producer(bootstrap, client_id="bench-fusion")
    try:
        produce_and_wait(producer, topic, events, timeout_s=60)
    finally:
        producer.close()


def freshness(address: str, bootstrap: str, topic: str, samples: int) -> dict[str, Any]:
    """Produce an interaction for a user the service has never seen; time until a
    Recommend for that user is no longer answered as for a new user."""
    import grpc
    from coldstart.v1 import common_pb2, events_pb2, fusion_pb2, fusion_pb2_grpc

    from services.common.events import make_producer, new_event, produce_and_wait

    producer = make_producer(bootstrap, client_id="bench-freshness", linger_ms=0)
    delays: list[float] = []
    timeouts = 0
    with grpc.insecure_channel(address) as channel:
        stub = fusion_pb2_grpc.FusionServiceStub(channel)
        for n in range(samples):
            user = f"fresh-{uuid.uuid4().hex[:8]}-{n}"
            request = fusion_pb2.RecommendRequest(user=common_pb2.UserContext(user_id=user), k=10)
            event = new_event(
                "bench",
                interaction=events_pb2.Interaction(user_id=user, item_id="item-1", kind="view"),
            )
            started = time.perf_counter()
            produce_and_wait(producer, topic, [event])
            while True:
                if not stub.Recommend(request, timeout=10).new_user:
                    delays.append(time.perf_counter() - started)
                    break
                if time.perf_counter() - started > 10:
                    timeouts += 1
                    break
            time.sleep(0.05)
    producer.close()
    ms = np.asarray(delays) * 1000
    return {
        "samples": len(delays),
        "p50_ms": round(float(np.percentile(ms, 50)), 1),
        "p99_ms": round(float(np.percentile(ms, 99)), 1),
        "max_ms": round(float(ms.max()), 1),
        "over_10s": timeouts,
    }


def swaps_under_load(
    address: str, pid: int, registry: ModelRegistry, args: argparse.Namespace
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Versions published while clients call Recommend: (table row, summary)."""
    import grpc
    from coldstart.v1 import fusion_pb2, fusion_pb2_grpc

    source = registry.path(registry.current() or "")
    outcome: dict[str, Any] = {}
    swap_duration = 8.0 * args.swaps + 10
    # drive() spawns the client processes; this thread only waits for them.
    driver = threading.Thread(
        target=lambda: outcome.update(
            drive(
                address, "recommend", args.swap_clients, swap_duration, args.client_processes, pid
            )
        ),
        name="swap-load",
    )
    driver.start()
    time.sleep(5.0)
    published = []
    swap_seconds = []
    with grpc.insecure_channel(address) as channel:
        info = fusion_pb2_grpc.FusionServiceStub(channel)
        for _ in range(args.swaps):
            started = time.perf_counter()
            version = publish_copy(registry, source)
            published.append(version)
            while (
                info.GetModelInfo(fusion_pb2.GetModelInfoRequest(), timeout=10).version != version
            ):
                if time.perf_counter() - started > 60:
                    break
                time.sleep(0.05)
            swap_seconds.append(round(time.perf_counter() - started, 2))
            time.sleep(1.0)
    driver.join(timeout=swap_duration + 180)
    served = set(outcome.pop("versions"))
    row = {"phase": "swaps", "rpc": "recommend", "clients": args.swap_clients, **outcome}
    summary = {
        "published": len(published),
        "served_by_clients": len(served & set(published)),
        "publish_to_serving_s": swap_seconds,
        "failed_calls": outcome["errors"],
    }
    return row, summary


def rss_mb(pid: int) -> float:
    """RSS of the server; with worker processes, of its largest worker."""
    import psutil

    process = psutil.Process(pid)
    return (
        float(max(p.memory_info().rss for p in [process, *process.children(recursive=True)]))
        / 2**20
    )


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="coldstart bench fusion")
    parser.add_argument("--duration", type=float, default=8.0, help="seconds per load level")
    parser.add_argument("--clients", default="1,16,64")
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="echo/Recommend rounds per client count; the ratio is the median round's",
    )
    parser.add_argument("--client-processes", type=int, default=2)
    parser.add_argument("--max-workers", type=int, default=64, help="server threads")
    parser.add_argument("--freshness-samples", type=int, default=50)
    parser.add_argument("--swaps", type=int, default=5)
    parser.add_argument("--swap-clients", type=int, default=50)
    parser.add_argument(
        "--processes",
        type=int,
        default=1,
        help="server processes (the runtime's `processes` setting) for echo and fusion alike",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a fusion setting for this run (repeatable), e.g. --set max_batch=1",
    )
    args = parser.parse_args(argv)
    fusion_overrides: dict[str, Any] = {}
    for item in args.overrides:
        key, sep, value = item.partition("=")
        if not sep:
            parser.error(f"--set {item}: want KEY=VALUE")
        fusion_overrides[key.strip()] = value.strip()

    from services.common.kafka.local_broker import LocalKafka, Topic

    big = cached_catalog(CATALOG_ITEMS)
    small = cached_catalog(1_000)
    work = Path(tempfile.mkdtemp(prefix="bench-fusion-"))
    topic = f"bench.fusion.{uuid.uuid4().hex[:8]}"
    broker = LocalKafka(work / "kafka", owned=True)
    rows: list[dict[str, Any]] = []
    meta: dict[str, Any] = {
        "catalog_items": CATALOG_ITEMS,
        "dimension": DIMENSION,
        "content_dimension": CONTENT_DIMENSION,
        "cpu_count": os.cpu_count(),
        "client_processes": args.client_processes,
        "duration_s": args.duration,
        "processes": args.processes,
        "fusion_settings": fusion_overrides,
    }
    try:
        state = broker.start(topics=(Topic(topic, 6),))
        seed_users(state.bootstrap, topic, big)
        common: dict[str, Any] = {"max_workers": args.max_workers, "log_level": "WARNING"}
        if args.processes > 1:
            common["processes"] = args.processes

        with server(
            "fusion", work, {**common, "registry_dir": linked_registry(small, work / "small").root}
        ) as (_a, pid):
            time.sleep(1.0)
            rss_small = rss_mb(pid)
        registry = linked_registry(big, work / "registry")
        fusion_settings = {
            **common,
            "registry_dir": registry.root,
            "kafka_bootstrap": state.bootstrap,
            "events_topic": topic,
            "snapshot_dir": work / "snapshot",
            "swap_poll_s": 0.5,
            **fusion_overrides,
        }
        with (
            server("echo", work, common) as (echo_address, echo_pid),
            server("fusion", work, fusion_settings) as (address, pid),
        ):
            time.sleep(2.0)
            rss_big = rss_mb(pid)
            meta["memory"] = {
                "rss_mb_1k_items": round(rss_small, 1),
                "rss_mb_100k_items": round(rss_big, 1),
                "rss_mb_per_100k_items": round(
                    (rss_big - rss_small) * 100_000 / (CATALOG_ITEMS - 1_000), 1
                ),
            }
            ratios: dict[int, list[float]] = {}
            for clients in (int(c) for c in args.clients.split(",")):
                # Echo and Recommend alternate, so a shift in the machine's other load
                # hits both sides of a round's ratio alike.
                for round_no in range(args.rounds):
                    qps: dict[str, float] = {}
                    for method, target, target_pid in (
                        ("echo", echo_address, echo_pid),
                        ("recommend", address, pid),
                    ):
                        result = drive(
                            target,
                            method,
                            clients,
                            args.duration,
                            args.client_processes,
                            target_pid,
                        )
                        result.pop("versions")
                        qps[method] = result["qps"]
                        rows.append(
                            {
                                "phase": "throughput",
                                "rpc": method,
                                "clients": clients,
                                "round": round_no + 1,
                                **result,
                            }
                        )
                        print(rows[-1], flush=True)
                    ratios.setdefault(clients, []).append(qps["recommend"] / max(qps["echo"], 1e-9))
            top = max(ratios)
            meta["recommend_vs_echo_rounds"] = {
                str(c): [round(r, 3) for r in rs] for c, rs in ratios.items()
            }
            # The median round's ratio (the only round with --rounds 1).
            meta["recommend_vs_echo_at_max_clients"] = round(float(np.median(ratios[top])), 3)

            if args.freshness_samples > 0:
                meta["freshness"] = freshness(
                    address, state.bootstrap, topic, args.freshness_samples
                )
                print("freshness", meta["freshness"], flush=True)
            if args.swaps > 0:
                row, meta["swaps"] = swaps_under_load(address, pid, registry, args)
                rows.append(row)
    finally:
        broker.stop()
        shutil.rmtree(work, ignore_errors=True)

    # A phase left out (--swaps 0, --freshness-samples 0) is not a pass.
    passed = (
        meta.get("recommend_vs_echo_at_max_clients", 0) >= 0.4
        and meta.get("swaps", {}).get("failed_calls", 1) == 0
        and meta.get("freshness", {}).get("p99_ms", 1e9) <= 1000
    )
    meta["passed"] = passed
    write_results("fusion", rows, meta)
    print(
        {
            k: meta[k]
            for k in (
                "memory",
                "freshness",
                "swaps",
                "recommend_vs_echo_rounds",
                "recommend_vs_echo_at_max_clients",
                "passed",
            )
            if k in meta
        }
    )
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

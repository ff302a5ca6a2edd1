"""Closed-loop gRPC load: N concurrent clients call one unary method for a
fixed time; throughput, latency percentiles and errors.

Requests are sent as pre-serialised bytes on a generic method handle, so any
service can be driven (and compared with the echo floor) by the same client
code. Clients live in several spawned processes, each with one channel and a
few threads, so the Python client is not one GIL-bound process.
"""

from __future__ import annotations

import multiprocessing as mp
import statistics
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class LoadResult:
    clients: int
    seconds: float
    calls: int
    errors: int
    error_codes: dict[str, int]
    p50_ms: float
    p99_ms: float

    @property
    def throughput(self) -> float:
        return self.calls / self.seconds if self.seconds else 0.0

    def row(self, **extra: Any) -> dict[str, Any]:
        return {
            **extra,
            "clients": self.clients,
            "rps": round(self.throughput, 1),
            "p50_ms": round(self.p50_ms, 2),
            "p99_ms": round(self.p99_ms, 2),
            "calls": self.calls,
            "errors": self.errors,
        }


def _client_process(
    address: str,
    method: str,
    payloads: Sequence[bytes],
    metadata: Sequence[tuple[str, str]],
    threads: int,
    start_at: float,
    stop_at: float,
    timeout_s: float,
    out: Any,
) -> None:
    import grpc

    channel = grpc.insecure_channel(address)
    # No (de)serialisers: requests go out as the given bytes, replies stay bytes.
    call = channel.unary_unary(method, request_serializer=None, response_deserializer=None)
    latencies: list[float] = []
    errors: dict[str, int] = {}
    lock = threading.Lock()

    def loop(offset: int) -> None:
        mine: list[float] = []
        mine_errors: dict[str, int] = {}
        i = offset
        while time.time() < start_at:
            time.sleep(0.001)
        while True:
            began = time.time()
            if began >= stop_at:
                break
            try:
                call(payloads[i % len(payloads)], timeout=timeout_s, metadata=tuple(metadata))
                mine.append(time.time() - began)
            except grpc.RpcError as exc:
                code = exc.code().name if isinstance(exc, grpc.Call) else "UNKNOWN"
                mine_errors[code] = mine_errors.get(code, 0) + 1
            i += threads
        with lock:
            latencies.extend(mine)
            for code, count in mine_errors.items():
                errors[code] = errors.get(code, 0) + count

    workers = [threading.Thread(target=loop, args=(t,)) for t in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    channel.close()
    out.put((latencies, errors))


def run_load(
    address: str,
    method: str,
    payloads: Sequence[bytes],
    clients: int,
    seconds: float,
    metadata: Sequence[tuple[str, str]] = (),
    processes: int = 2,
    timeout_s: float = 10.0,
) -> LoadResult:
    """``clients`` concurrent callers of ``method`` (e.g. "/coldstart.v1.EchoService/Echo")."""
    context = mp.get_context("spawn")
    queue = context.Queue()
    processes = max(1, min(processes, clients))
    shares = [
        clients // processes + (1 if p < clients % processes else 0) for p in range(processes)
    ]
    start_at = time.time() + 3.0  # after the spawned interpreters imported grpc
    stop_at = start_at + seconds
    children = [
        context.Process(
            target=_client_process,
            args=(
                address,
                method,
                list(payloads),
                list(metadata),
                share,
                start_at,
                stop_at,
                timeout_s,
                queue,
            ),
        )
        for share in shares
        if share
    ]
    for child in children:
        child.start()
    latencies: list[float] = []
    errors: dict[str, int] = {}
    import queue as queue_module

    results = 0
    give_up = time.time() + seconds + 120
    while results < len(children):
        try:
            got, got_errors = queue.get(timeout=1.0)
        except queue_module.Empty:
            if time.time() > give_up or all(not c.is_alive() for c in children):
                raise RuntimeError("load client processes died without results") from None
            continue
        results += 1
        latencies += got
        for code, count in got_errors.items():
            errors[code] = errors.get(code, 0) + count
    for child in children:
        child.join(timeout=30)
    latencies.sort()

    def percentile(q: float) -> float:
        if not latencies:
            return float("nan")
        return 1000 * latencies[min(len(latencies) - 1, int(q * len(latencies)))]

    return LoadResult(
        clients=clients,
        seconds=seconds,
        calls=len(latencies),
        errors=sum(errors.values()),
        error_codes=errors,
        p50_ms=statistics.median(latencies) * 1000 if latencies else float("nan"),
        p99_ms=percentile(0.99),
    )

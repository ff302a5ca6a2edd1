"""Prometheus metrics every service exports, and the HTTP endpoint.

Per-RPC metrics are recorded by the runtime's interceptor (see server.py); a
service adds its own metrics with prometheus_client directly, named
``coldstart_<service>_<what>_<unit>``.
"""

from __future__ import annotations

import socket

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from services.common.errors import StartupError

RPC_REQUESTS = Counter(
    "coldstart_grpc_server_handled",
    "RPCs completed, by service, method and gRPC status code.",
    ["service", "method", "code"],
)
RPC_LATENCY = Histogram(
    "coldstart_grpc_server_handling_seconds",
    "Time from receiving an RPC to sending its answer.",
    ["service", "method"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)
# multiprocess_mode tells prometheus_client how to merge the values of several
# server processes (settings `processes` > 1); it is ignored otherwise.
RPC_IN_FLIGHT = Gauge(
    "coldstart_grpc_server_in_flight",
    "RPCs being handled right now.",
    ["service", "method"],
    multiprocess_mode="livesum",
)
# A gauge rather than an Info: Info metrics do not work across processes.
BUILD_INFO = Gauge(
    "coldstart_build_info",
    "Version of the running coldstart build (always 1).",
    ["service", "version"],
    multiprocess_mode="max",
)
SERVICE_READY = Gauge(
    "coldstart_service_ready",
    "1 while the service reports SERVING on grpc.health.v1, else 0.",
    ["service"],
    multiprocess_mode="livemin",
)


def multiprocess_registry(directory: str) -> CollectorRegistry:
    """A registry that merges the metrics files of several worker processes."""
    from prometheus_client import multiprocess

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=directory)
    return registry


def start_metrics_server(host: str, port: int, registry: CollectorRegistry | None = None) -> int:
    """Serve /metrics on ``host:port``; return the bound port (0 disables)."""
    if port == 0:
        return 0
    # prometheus_client's server sets SO_REUSEADDR only, so a busy port fails
    # here with a clear OSError that we turn into a one-line start-up error.
    try:
        if registry is None:
            server, _thread = start_http_server(port, addr=host)
        else:
            server, _thread = start_http_server(port, addr=host, registry=registry)
    except OSError as exc:
        raise StartupError(
            f"metrics_port {port}: cannot listen on {host}:{port} ({exc.strerror})"
        ) from None
    bound: int = server.server_address[1]
    return bound


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (tests and `coldstart up` pick ports with it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port

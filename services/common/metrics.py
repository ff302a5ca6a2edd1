"""Prometheus metrics every service exports, and the HTTP endpoint.

Per-RPC metrics are recorded by the runtime's interceptor (see server.py); a
service adds its own metrics with prometheus_client directly, named
``coldstart_<service>_<what>_<unit>``.
"""

from __future__ import annotations

import socket

from prometheus_client import Counter, Gauge, Histogram, Info, start_http_server

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
RPC_IN_FLIGHT = Gauge(
    "coldstart_grpc_server_in_flight",
    "RPCs being handled right now.",
    ["service", "method"],
)
BUILD_INFO = Info("coldstart_build", "Version of the running coldstart build.")
SERVICE_READY = Gauge(
    "coldstart_service_ready",
    "1 while the service reports SERVING on grpc.health.v1, else 0.",
    ["service"],
)


def start_metrics_server(host: str, port: int) -> int:
    """Serve /metrics on ``host:port``; return the bound port (0 disables)."""
    if port == 0:
        return 0
    # prometheus_client's server sets SO_REUSEADDR only, so a busy port fails
    # here with a clear OSError that we turn into a one-line start-up error.
    try:
        server, _thread = start_http_server(port, addr=host)
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

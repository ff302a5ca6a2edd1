"""The services' default ports, in one place.

Every service's settings default, `coldstart up` (``services/up.py``) and the
gateway's default downstream addresses read them from here; README, docs and
the k8s manifests repeat the numbers, and tests/unit/common/test_ports.py fails
when any of them names another port for a service.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ServicePorts:
    grpc: int
    # The Prometheus endpoint `coldstart up` and the k8s manifests use; the
    # settings' own metrics_port default stays 0 (off) for a bare `coldstart serve`.
    metrics: int


DEFAULT_PORTS: dict[str, ServicePorts] = {
    "gateway": ServicePorts(grpc=50050, metrics=9100),
    "encoder": ServicePorts(grpc=50051, metrics=9101),
    "fusion": ServicePorts(grpc=50052, metrics=9102),
    "trainer": ServicePorts(grpc=50053, metrics=9103),
}
# The echo service (runtime tests and benchmarks) has no metrics port of its own.
ECHO_PORT = 50060
# Redis (fusion's online user state with state_backend = "redis"): its own default,
# which fusion's redis_url and the k8s redis overlay use.
REDIS_PORT = 6379


def default_address(service: str) -> str:
    """Where a service listens by default on this machine, e.g. ``127.0.0.1:50052``."""
    return f"127.0.0.1:{DEFAULT_PORTS[service].grpc}"

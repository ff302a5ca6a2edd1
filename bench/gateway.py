"""`coldstart bench gateway`: Recommend through the gateway at 1, 16 and 64
concurrent clients, beside the echo floor on the same runtime in the same run.

Starts its own broker, encoder, fusion, gateway and echo on free ports (the
models come from the registry under .run/, made by `coldstart up` or made
here on the synthetic data). Target: gateway Recommend >= 25% of echo's
throughput at 64 clients, zero errors.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import tempfile
from collections.abc import Iterator
from pathlib import Path

from coldstart.v1 import echo_pb2, gateway_pb2

from bench.load import run_load
from bench.runner import write_results
from services.common.kafka.local_broker import LocalKafka
from services.common.metrics import free_port
from services.common.registry import ModelRegistry
from services.up import DEV_TOKEN, ensure_models, registry_dirs, start_service, wait_serving


@contextlib.contextmanager
def system(log_dir: Path) -> Iterator[dict[str, int]]:
    """Broker + encoder + fusion + gateway + echo on free ports."""
    broker = LocalKafka(log_dir / "kafka", owned=True)
    pids: list[int] = []
    try:
        bootstrap = broker.start().bootstrap
        encoder_registry, model_registry = registry_dirs()
        ports = {name: free_port() for name in ("encoder", "fusion", "gateway", "echo")}
        settings: dict[str, dict[str, object]] = {
            "encoder": {"registry_dir": encoder_registry},
            "fusion": {
                "registry_dir": model_registry,
                "kafka_bootstrap": bootstrap,
                "encoder_address": f"127.0.0.1:{ports['encoder']}",
            },
            "gateway": {
                "kafka_bootstrap": bootstrap,
                "fusion_address": f"127.0.0.1:{ports['fusion']}",
                "encoder_address": f"127.0.0.1:{ports['encoder']}",
                "registry_dir": model_registry,
                "auth_tokens": f"bench:{DEV_TOKEN}",
            },
            "echo": {},
        }
        for name, extra in settings.items():
            pid = start_service(name, {"port": ports[name], "metrics_port": 0, **extra}, log_dir)
            pids.append(pid)
            wait_serving(name, pid, ports[name], log_dir)
        yield ports
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        for pid in pids:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
        broker.stop()


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="coldstart bench gateway", description=__doc__)
    parser.add_argument("--seconds", type=float, default=60.0, help="per concurrency level")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 16, 64])
    args = parser.parse_args(argv)
    ensure_models("synthetic", retrain=False)
    item_count = ModelRegistry(registry_dirs()[1]).current_info()
    rows = []
    with tempfile.TemporaryDirectory() as tmp, system(Path(tmp)) as ports:
        users = [f"bench-user-{i}" for i in range(200)]
        recommend = [
            gateway_pb2.GatewayRecommendRequest(user_id=u, k=10).SerializeToString() for u in users
        ]
        echo = [echo_pb2.EchoRequest(message="x" * 64).SerializeToString()]
        auth = [("authorization", f"Bearer {DEV_TOKEN}")]
        for clients in args.clients:
            floor = run_load(
                f"127.0.0.1:{ports['echo']}",
                "/coldstart.v1.EchoService/Echo",
                echo,
                clients,
                args.seconds,
            )
            gateway = run_load(
                f"127.0.0.1:{ports['gateway']}",
                "/coldstart.v1.GatewayService/Recommend",
                recommend,
                clients,
                args.seconds,
                metadata=auth,
            )
            rows.append(floor.row(target="echo"))
            rows.append(
                {
                    **gateway.row(target="gateway Recommend"),
                    "vs_echo": round(gateway.throughput / floor.throughput, 3),
                }
            )
    meta = {
        "model_version": item_count.version if item_count else None,
        "target": "gateway Recommend >= 0.25 x echo throughput at 64 clients, zero errors",
    }
    write_results("gateway", rows, meta)
    return 0

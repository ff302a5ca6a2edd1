"""grpcurl and ghz, told nothing but the address (no --proto), against every
service as a real process: reflection must resolve services and methods.

The five servers run once for the module (echo, encoder on a tiny model, fusion
on a synthetic version, trainer not consuming, gateway in front of encoder and
fusion); the Go tools come from the session fixtures in conftest.py.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from coldstart.v1 import echo_pb2, encoder_pb2, fusion_pb2, gateway_pb2, trainer_pb2

from services.common.metrics import free_port
from services.common.registry import ModelRegistry
from services.fusion.synthetic import publish_version
from tests.integration.test_gateway import write_fallback_model
from tests.support.processes import ServiceProcess, running_service
from tests.unit.encoder.tiny_model import make_tiny_export

pytestmark = pytest.mark.integration

PROTOS: dict[str, ModuleType] = {
    "echo": echo_pb2,
    "encoder": encoder_pb2,
    "fusion": fusion_pb2,
    "trainer": trainer_pb2,
    "gateway": gateway_pb2,
}
TOKEN = "s3cret"
# ghz's load: bounded by count, per-call timeout and the process timeout.
GHZ_CALLS = 200
GHZ_CONCURRENCY = 8


def service_descriptor(name: str) -> Any:
    (service,) = PROTOS[name].DESCRIPTOR.services_by_name.values()
    return service


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, ServiceProcess]]:
    root = tmp_path_factory.mktemp("reflection")
    tiny = make_tiny_export(root / "tiny", int8=False)
    fusion_registry = ModelRegistry(root / "fusion-registry")
    publish_version(fusion_registry, n_items=200, seed=0)
    write_fallback_model(root / "gateway-registry")
    dead = f"127.0.0.1:{free_port()}"  # no broker: nothing here produces or consumes
    logs = root / "logs"
    with contextlib.ExitStack() as stack:
        started: dict[str, ServiceProcess] = {}

        def start(name: str, settings: dict[str, object]) -> None:
            started[name] = stack.enter_context(
                running_service(name, logs, settings=settings, timeout_s=120)
            )

        start("echo", {})
        start("encoder", {"model_path": tiny})
        start("fusion", {"registry_dir": fusion_registry.root, "snapshot_dir": root / "snap"})
        start(
            "trainer",
            {
                "consume": "false",
                "kafka_bootstrap": dead,
                "log_dir": root / "trainer",
                "registry_dir": root / "trainer-registry",
            },
        )
        start(
            "gateway",
            {
                "kafka_bootstrap": dead,
                "fusion_address": started["fusion"].address,
                "encoder_address": started["encoder"].address,
                "registry_dir": root / "gateway-registry",
                "auth_tokens": f"test:{TOKEN}",
            },
        )
        yield started


def run_tool(*command: object, timeout_s: float = 60) -> str:
    result = subprocess.run(
        [str(part) for part in command],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )
    assert result.returncode == 0, f"{command}: exit {result.returncode}\n{result.stderr}"
    return result.stdout


@pytest.mark.parametrize("name", list(PROTOS))
def test_grpcurl_lists_and_describes_every_method(
    name: str, servers: dict[str, ServiceProcess], grpcurl: Path
) -> None:
    address = servers[name].address
    service = service_descriptor(name)
    listed = run_tool(grpcurl, "-plaintext", address, "list").split()
    assert service.full_name in listed
    assert "grpc.health.v1.Health" in listed
    for method in service.methods:
        described = run_tool(grpcurl, "-plaintext", address, "describe", method.full_name)
        assert f"{method.full_name} is a method" in described
        assert f"rpc {method.name} ( .{method.input_type.full_name} )" in described


def test_grpcurl_calls_echo_through_reflection(
    servers: dict[str, ServiceProcess], grpcurl: Path
) -> None:
    reply = run_tool(
        grpcurl,
        "-plaintext",
        "-d",
        '{"message": "hi"}',
        servers["echo"].address,
        "coldstart.v1.EchoService/Echo",
    )
    assert json.loads(reply) == {"message": "hi"}


def test_grpcurl_calls_the_gateway_with_a_token(
    servers: dict[str, ServiceProcess], grpcurl: Path
) -> None:
    reply = json.loads(
        run_tool(
            grpcurl,
            "-plaintext",
            "-H",
            f"authorization: Bearer {TOKEN}",
            "-d",
            '{"user_id": "u1", "k": 5}',
            servers["gateway"].address,
            "coldstart.v1.GatewayService/Recommend",
        )
    )
    # Answered by fusion (not the gateway's fallback): ghz below loads the whole path.
    assert len(reply["items"]) == 5
    assert not reply.get("degraded", False)


def run_ghz(ghz: Path, address: str, call: str, data: dict[str, object], *extra: str) -> Any:
    output = run_tool(
        ghz,
        "--insecure",
        "--call",
        call,
        "-d",
        json.dumps(data),
        "-n",
        str(GHZ_CALLS),
        "-c",
        str(GHZ_CONCURRENCY),
        "--timeout",
        "10s",
        "--format",
        "json",
        *extra,
        address,
        timeout_s=120,
    )
    report = json.loads(output)
    # Printed for whoever wants the figure (pytest -s); never asserted: timing
    # targets live in the benchmarks.
    print(f"ghz {call} -n {GHZ_CALLS} -c {GHZ_CONCURRENCY}: {report['rps']:.0f} requests/s")
    return report


def test_ghz_loads_echo_without_a_proto_file(servers: dict[str, ServiceProcess], ghz: Path) -> None:
    report = run_ghz(
        ghz, servers["echo"].address, "coldstart.v1.EchoService/Echo", {"message": "hi"}
    )
    assert report["count"] == GHZ_CALLS
    assert report["statusCodeDistribution"] == {"OK": GHZ_CALLS}


def test_ghz_loads_gateway_recommend_without_a_proto_file(
    servers: dict[str, ServiceProcess], ghz: Path
) -> None:
    report = run_ghz(
        ghz,
        servers["gateway"].address,
        "coldstart.v1.GatewayService/Recommend",
        {"user_id": "u1", "k": 5},
        "--metadata",
        json.dumps({"authorization": f"Bearer {TOKEN}"}),
    )
    assert report["count"] == GHZ_CALLS
    assert report["statusCodeDistribution"] == {"OK": GHZ_CALLS}

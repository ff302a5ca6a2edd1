"""The shared runtime, exercised through the echo service in a real process."""

from __future__ import annotations

import signal
import socket
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
from coldstart.v1 import echo_pb2, echo_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from services.common.metrics import free_port
from services.common.paths import REPO_ROOT
from tests.support.processes import coldstart_command, running_service

pytestmark = pytest.mark.integration


def test_health_reflection_and_metrics(tmp_path: Path) -> None:
    with running_service("echo", tmp_path) as echo, grpc.insecure_channel(echo.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "coldstart.v1.EchoService"):
            reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING

        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        replies = reflection.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5
        )
        names = {s.name for r in replies for s in r.list_services_response.service}
        assert {"coldstart.v1.EchoService", "grpc.health.v1.Health"} <= names

        stub = echo_pb2_grpc.EchoServiceStub(channel)
        assert stub.Echo(echo_pb2.EchoRequest(message="hi"), timeout=5).message == "hi"
        with pytest.raises(grpc.RpcError) as raised:
            stub.Echo(echo_pb2.EchoRequest(sleep_ms=10**9), timeout=5)
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "sleep_ms" in (raised.value.details() or "")

        body = (
            urllib.request.urlopen(f"http://127.0.0.1:{echo.metrics_port}/metrics", timeout=5)
            .read()
            .decode()
        )
        assert (
            'coldstart_grpc_server_handled_total{code="OK",method="Echo",service="echo"} 1.0'
            in body
        )
        assert (
            'coldstart_grpc_server_handled_total{code="INVALID_ARGUMENT",method="Echo",service="echo"} 1.0'
            in body
        )
        assert (
            'coldstart_grpc_server_handling_seconds_bucket{le="0.005",method="Echo",service="echo"}'
            in body
        )
        assert "coldstart_grpc_server_in_flight" in body
        assert 'coldstart_build_info{service="echo",version="0.1.0"} 1.0' in body
        assert 'coldstart_service_ready{service="echo"} 1.0' in body
        assert echo.process.poll() is None


def test_sigterm_finishes_in_flight_calls_refuses_new_ones_and_exits_zero(tmp_path: Path) -> None:
    with running_service("echo", tmp_path, settings={"grace_seconds": 20}) as echo:
        results: list[str] = []
        errors: list[grpc.RpcError] = []

        def slow_call() -> None:
            with grpc.insecure_channel(echo.address) as channel:
                stub = echo_pb2_grpc.EchoServiceStub(channel)
                try:
                    results.append(
                        stub.Echo(
                            echo_pb2.EchoRequest(message="slow", sleep_ms=1500), timeout=30
                        ).message
                    )
                except grpc.RpcError as exc:
                    errors.append(exc)

        callers = [threading.Thread(target=slow_call) for _ in range(3)]
        for caller in callers:
            caller.start()
        time.sleep(0.5)  # the calls are now in the server
        echo.process.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        with grpc.insecure_channel(echo.address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            stub = echo_pb2_grpc.EchoServiceStub(channel)
            with pytest.raises(grpc.RpcError) as refused:
                stub.Echo(echo_pb2.EchoRequest(message="late"), timeout=3)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
            with pytest.raises(grpc.RpcError):
                health.Check(health_pb2.HealthCheckRequest(), timeout=2)
        for caller in callers:
            caller.join(timeout=30)
        assert results == ["slow", "slow", "slow"]
        assert errors == []
        assert echo.process.wait(timeout=30) == 0


def run_serve(args: list[str], timeout_s: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        coldstart_command("serve", *args),
        check=False,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--set", "bogus=1"], "--set bogus: unknown setting"),
        (["--set", "port=abc"], "--set port: expected an integer, got 'abc'"),
        (["--set", "grace_seconds=-1"], "grace_seconds: must be >= 0"),
        (["--set", "processes=0"], "processes: must be > 0"),
        (
            ["--set", "tls_cert_file=/nonexistent.pem", "--set", "tls_key_file=/nonexistent.key"],
            "tls_cert_file: file not found",
        ),
    ],
)
def test_bad_settings_exit_nonzero_with_one_line(args: list[str], message: str) -> None:
    result = run_serve(["echo", *args])
    assert result.returncode == 2
    assert message in result.stderr
    assert result.stderr.strip().count("\n") == 0, result.stderr
    assert "Traceback" not in result.stderr


def test_port_in_use_exits_nonzero_with_one_line() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_serve(["echo", "--set", f"port={port}"])
    assert result.returncode == 2
    assert f"port {port}: cannot listen on 127.0.0.1:{port}" in result.stderr
    assert "Traceback" not in result.stderr


def test_metrics_port_in_use_exits_nonzero_with_one_line() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_serve(
            ["echo", "--set", f"port={free_port()}", "--set", f"metrics_port={port}"]
        )
    assert result.returncode == 2
    assert f"metrics_port {port}: cannot listen" in result.stderr
    assert "Traceback" not in result.stderr


def test_several_processes_share_the_port_and_merge_their_metrics(tmp_path: Path) -> None:
    import psutil

    with running_service("echo", tmp_path, settings={"processes": 2}) as echo:
        workers = psutil.Process(echo.process.pid).children()
        assert len(workers) == 2
        for i in range(20):
            # A fresh connection each time: the kernel spreads them over the workers.
            with grpc.insecure_channel(echo.address) as channel:
                reply = echo_pb2_grpc.EchoServiceStub(channel).Echo(
                    echo_pb2.EchoRequest(message=str(i)), timeout=5
                )
                assert reply.message == str(i)
        body = (
            urllib.request.urlopen(f"http://127.0.0.1:{echo.metrics_port}/metrics", timeout=5)
            .read()
            .decode()
        )
        assert (
            'coldstart_grpc_server_handled_total{code="OK",method="Echo",service="echo"} 20.0'
            in body
        )
        echo.process.send_signal(signal.SIGTERM)
        assert echo.process.wait(timeout=30) == 0
        assert not any(w.is_running() and w.status() != psutil.STATUS_ZOMBIE for w in workers)

"""Start coldstart services as real subprocesses for integration tests.

Every process started here is killed and reaped by the context manager, even
when the test fails.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common.metrics import free_port
from services.common.paths import REPO_ROOT

# How much of a service's log a failing test prints.
LOG_TAIL_CHARS = 8000


@dataclass
class ServiceProcess:
    name: str
    process: subprocess.Popen[bytes]
    port: int
    metrics_port: int
    log_path: Path
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def terminate(self, timeout_s: float = 30.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait(timeout=10)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=10)


def coldstart_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "services.cli", *args]


def open_channel(address: str, credentials: grpc.ChannelCredentials | None = None) -> grpc.Channel:
    if credentials is None:
        return grpc.insecure_channel(address)
    return grpc.secure_channel(address, credentials)


def wait_serving(
    address: str,
    timeout_s: float,
    process: subprocess.Popen[bytes] | None = None,
    service: str = "",
    credentials: grpc.ChannelCredentials | None = None,
) -> None:
    deadline = time.monotonic() + timeout_s
    with open_channel(address, credentials) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if process is not None and process.poll() is not None:
                raise RuntimeError(f"process exited with {process.returncode} before serving")
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=1.0)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.1)
    raise TimeoutError(f"{address} not SERVING within {timeout_s}s")


@contextlib.contextmanager
def running_service(
    name: str,
    log_dir: Path,
    settings: dict[str, object] | None = None,
    env: dict[str, str] | None = None,
    timeout_s: float = 60.0,
    port: int | None = None,
    credentials: grpc.ChannelCredentials | None = None,
) -> Iterator[ServiceProcess]:
    """Run `coldstart serve <name>` on free ports until the block ends."""
    port = port or free_port()
    metrics_port = free_port()
    overrides = {"port": port, "metrics_port": metrics_port, **(settings or {})}
    args = ["serve", name]
    for key, value in overrides.items():
        args += ["--set", f"{key}={value}"]
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}-{port}.log"
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            coldstart_command(*args),
            cwd=REPO_ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=full_env,
        )
    service = ServiceProcess(name, process, port, metrics_port, log_path)
    try:
        try:
            wait_serving(service.address, timeout_s, process, credentials=credentials)
        except (RuntimeError, TimeoutError) as exc:
            raise RuntimeError(f"{name} did not start: {exc}\n{service.logs()[-3000:]}") from None
        yield service
    except BaseException:
        # A failing test shows what the service logged (pytest prints captured
        # stdout with the failure): the only trace of a flake on CI.
        print(f"--- last lines of {service.log_path.name} ---\n{service.logs()[-LOG_TAIL_CHARS:]}")
        raise
    finally:
        service.kill()

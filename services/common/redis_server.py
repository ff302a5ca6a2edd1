"""A real ``redis-server`` (the Debian package) on a free port, for integration tests
and benchmarks (tests/integration/conftest.py's ``redis_server``, ``coldstart bench
scale``; here, not in tests/, because a benchmark must not import from tests).

No persistence (``--save ''``, no AOF), its files in a temp dir, killed and
reaped when the block ends. ``redis_binary`` is None where the package is absent
(scripts/ensure_redis.sh installs it for ``make test`` when it can): the tests
that need it skip and say so.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from services.common.metrics import free_port

START_TIMEOUT_S = 10.0


def redis_binary() -> str | None:
    return shutil.which("redis-server")


@dataclass
class RedisServer:
    port: int
    process: subprocess.Popen[bytes]
    log_path: Path

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def stop(self) -> None:
        """SIGKILL: as abrupt as a crashed or partitioned Redis."""
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=10)


def _ping(port: int) -> bool:
    import redis

    client = redis.Redis(port=port, socket_timeout=0.2, socket_connect_timeout=0.2)
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False
    finally:
        client.close()


def start_redis(directory: Path, port: int | None = None) -> RedisServer:
    binary = redis_binary()
    if binary is None:
        raise FileNotFoundError("redis-server not on PATH")
    port = port or free_port()
    directory.mkdir(parents=True, exist_ok=True)
    log_path = directory / f"redis-{port}.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [
                binary,
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(directory),
                "--save",
                "",
                "--appendonly",
                "no",
                "--daemonize",
                "no",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    server = RedisServer(port, process, log_path)
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            break
        if _ping(port):
            return server
        time.sleep(0.05)
    server.stop()
    raise RuntimeError(f"redis-server did not start: {log_path.read_text(errors='replace')}")


@contextlib.contextmanager
def running_redis(directory: Path, port: int | None = None) -> Iterator[RedisServer]:
    server = start_redis(directory, port)
    try:
        yield server
    finally:
        server.stop()

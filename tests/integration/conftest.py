"""Integration fixtures: the pinned Go tools (services/common/gotools.py), and a
redis-server.

Each is built at most once per session (and once per checkout: the binary
stays in .cache/bin). Where Go is absent and the tool is not on the PATH, the
tests that ask for it skip and say why.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from services.common.gotools import GoToolError, go_tool
from services.common.redis_server import RedisServer, redis_binary, running_redis


def _pinned_tool(name: str) -> Path:
    try:
        return go_tool(name, use_path=False)
    except GoToolError as exc:
        pytest.skip(f"{name} unavailable: {exc}")


@pytest.fixture(scope="session")
def grpcurl() -> Path:
    return _pinned_tool("grpcurl")


@pytest.fixture(scope="session")
def ghz() -> Path:
    return _pinned_tool("ghz")


@pytest.fixture(scope="session")
def kustomize() -> Path:
    return _pinned_tool("kustomize")


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A real redis-server (Debian package) on a free port, shared by the session;
    tests keep apart by key prefix."""
    if redis_binary() is None:
        pytest.skip("redis-server not installed (apt-get install redis-server; make test does)")
    with running_redis(tmp_path_factory.mktemp("redis")) as server:
        yield server

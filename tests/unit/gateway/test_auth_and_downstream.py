from __future__ import annotations

from typing import Any

import grpc
import pytest

from services.common.errors import (
    DeadlineExceeded,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)
from services.gateway.auth import Authenticator, AuthInterceptor, TokenBucket, parse_tokens
from services.gateway.downstream import Deadline, DownstreamCaller


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_token_bucket_allows_burst_then_rate() -> None:
    clock = Clock()
    bucket = TokenBucket(rate=2.0, burst=3, clock=clock)
    assert [bucket.take() for _ in range(4)] == [True, True, True, False]
    clock.now += 0.5  # one token back at 2/s
    assert bucket.take() and not bucket.take()


def test_bearer_tokens_identify_clients() -> None:
    auth = Authenticator(parse_tokens(["shop:s3cret", "ads:t0ken"]), rate=0, burst=1)
    assert auth.client_for([("authorization", "Bearer s3cret")]) == "shop"
    assert auth.client_for([("authorization", "bearer t0ken")]) == "ads"
    with pytest.raises(Unauthenticated, match="expected metadata 'authorization: Bearer <token>'"):
        auth.client_for([])
    with pytest.raises(Unauthenticated, match="unknown token"):
        auth.client_for([("authorization", "Bearer nope")])
    assert Authenticator({}, 0, 1).client_for([]) == "anonymous"


def test_rate_limit_is_per_client() -> None:
    clock = Clock()
    auth = Authenticator(parse_tokens(["a:ta", "b:tb"]), rate=1.0, burst=2, clock=clock)
    a, b = [("authorization", "Bearer ta")], [("authorization", "Bearer tb")]
    auth.client_for(a)
    auth.client_for(a)
    with pytest.raises(ResourceExhausted, match="rate limit"):
        auth.client_for(a)
    assert auth.client_for(b) == "b"


class FakeRpcError(grpc.RpcError, grpc.Call):  # type: ignore[misc]
    def __init__(self, code: grpc.StatusCode, details: str = "") -> None:
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


class Flaky:
    def __init__(self, failures: list[grpc.StatusCode]) -> None:
        self.failures = failures
        self.timeouts: list[float] = []

    def __call__(self, request: Any, timeout: float) -> str:
        self.timeouts.append(timeout)
        if self.failures:
            raise FakeRpcError(self.failures.pop(0), "k: must be 1..1000")
        return "ok"


def test_idempotent_calls_retry_unavailable_only() -> None:
    caller = DownstreamCaller("fusion", timeout_s=1.0, retries=2, sleep=lambda _s: None)
    flaky = Flaky([grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNAVAILABLE])
    assert caller.call("Recommend", flaky, None, Deadline(5.0), idempotent=True) == "ok"
    assert len(flaky.timeouts) == 3

    not_idempotent = Flaky([grpc.StatusCode.UNAVAILABLE])
    with pytest.raises(Unavailable):
        caller.call("Write", not_idempotent, None, Deadline(5.0), idempotent=False)
    assert len(not_idempotent.timeouts) == 1

    missing = Flaky([grpc.StatusCode.NOT_FOUND])
    with pytest.raises(NotFound):
        caller.call("SimilarItems", missing, None, Deadline(5.0), idempotent=True)
    assert len(missing.timeouts) == 1

    invalid = Flaky([grpc.StatusCode.INVALID_ARGUMENT])
    with pytest.raises(InvalidArgument, match=r"k: must be 1\.\.1000"):
        caller.call("Recommend", invalid, None, Deadline(5.0), idempotent=True)
    assert len(invalid.timeouts) == 1


def test_deadline_comes_from_the_caller_and_is_capped() -> None:
    caller = DownstreamCaller("fusion", timeout_s=2.0, retries=0)
    flaky = Flaky([])
    caller.call("Recommend", flaky, None, Deadline(0.5), idempotent=True)
    assert 0.3 < flaky.timeouts[0] <= 0.45  # caller's 0.5 s minus the reserve
    caller.call("Recommend", flaky, None, Deadline(None), idempotent=True)
    assert flaky.timeouts[1] == 2.0
    with pytest.raises(DeadlineExceeded):
        caller.call("Recommend", flaky, None, Deadline(0.01), idempotent=True)


class _Details(grpc.HandlerCallDetails):
    def __init__(self, method: str) -> None:
        self.method = method
        self.invocation_metadata = ()


def _context(metadata: tuple[tuple[str, str], ...]) -> Any:
    class Context:
        def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
            return metadata

    return Context()


def test_auth_interceptor_wraps_each_method_once_and_checks_every_call() -> None:
    interceptor = AuthInterceptor(Authenticator(parse_tokens(["shop:abc"]), 0.0, 1))
    handler = grpc.unary_unary_rpc_method_handler(lambda request, context: "ok")
    method = "/coldstart.v1.GatewayService/Recommend"
    first = interceptor.intercept_service(lambda _d: handler, _Details(method))
    second = interceptor.intercept_service(lambda _d: handler, _Details(method))
    assert first is second and first is not None and first.unary_unary is not None
    # The token comes from each call's own metadata, not from the first call's.
    assert first.unary_unary(None, _context((("authorization", "Bearer abc"),))) == "ok"
    with pytest.raises(Unauthenticated):
        first.unary_unary(None, _context(()))
    health = interceptor.intercept_service(
        lambda _d: handler, _Details("/grpc.health.v1.Health/Check")
    )
    assert health is not None and health.unary_unary is not None
    assert health.unary_unary(None, _context(())) == "ok"

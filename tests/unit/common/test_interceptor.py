from __future__ import annotations

from typing import Any, cast

import grpc
import pytest

from services.common import metrics
from services.common.errors import InvalidArgument
from services.common.server import DomainErrorInterceptor


class Aborted(Exception):
    pass


class FakeContext:
    def __init__(self) -> None:
        self._code: grpc.StatusCode | None = None
        self.details = ""

    def abort(self, code: grpc.StatusCode, details: str) -> None:
        self._code, self.details = code, details
        raise Aborted()

    def code(self) -> grpc.StatusCode | None:
        return self._code


class Details:
    method = "/coldstart.v1.Test/Do"


def call_through(behaviour: Any) -> FakeContext:
    handler = grpc.unary_unary_rpc_method_handler(behaviour)
    wrapped = DomainErrorInterceptor("unit").intercept_service(lambda _d: handler, Details())  # type: ignore[arg-type]
    assert wrapped is not None
    context = FakeContext()
    with pytest.raises(Aborted):
        behaviour = wrapped.unary_unary
        assert behaviour is not None
        behaviour(None, cast(grpc.ServicerContext, context))
    return context


def count(code: str) -> float:
    value = metrics.RPC_REQUESTS.labels("unit", "Do", code)._value.get()
    return float(value)


def test_domain_errors_keep_their_code_and_message() -> None:
    before = count("INVALID_ARGUMENT")

    def bad(_request: Any, _context: Any) -> None:
        raise InvalidArgument("k", "must be 1..1000, got 0")

    context = call_through(bad)
    assert context.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert context.details == "k: must be 1..1000, got 0"
    assert count("INVALID_ARGUMENT") == before + 1


def test_unexpected_errors_become_internal_with_a_generic_message() -> None:
    def broken(_request: Any, _context: Any) -> None:
        raise KeyError("secret internals")

    context = call_through(broken)
    assert context.code() == grpc.StatusCode.INTERNAL
    assert context.details == "internal error"


def test_servicer_aborts_pass_through_unchanged() -> None:
    def aborting(_request: Any, context: Any) -> None:
        context.abort(grpc.StatusCode.NOT_FOUND, "item_id: unknown")

    context = call_through(aborting)
    assert context.code() == grpc.StatusCode.NOT_FOUND
    assert context.details == "item_id: unknown"


def test_a_method_is_wrapped_once_and_rewrapped_when_its_handler_changes() -> None:
    interceptor = DomainErrorInterceptor("unit")
    first_handler = grpc.unary_unary_rpc_method_handler(lambda request, context: "first")
    first = interceptor.intercept_service(lambda _d: first_handler, Details())  # type: ignore[arg-type]
    again = interceptor.intercept_service(lambda _d: first_handler, Details())  # type: ignore[arg-type]
    assert first is not None and first is again
    # A different handler for the same method (a server rebuilt in-process) is not
    # answered by the stale wrapper.
    other_handler = grpc.unary_unary_rpc_method_handler(lambda request, context: "other")
    other = interceptor.intercept_service(lambda _d: other_handler, Details())  # type: ignore[arg-type]
    assert other is not None and other is not first and other.unary_unary is not None
    assert other.unary_unary(None, cast(grpc.ServicerContext, FakeContext())) == "other"

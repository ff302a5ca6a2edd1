"""Calls to encoder and fusion: one long-lived channel per target, a deadline
on every call derived from the caller's remaining time, and retries with
backoff only for idempotent calls that failed with UNAVAILABLE."""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import grpc
from coldstart.v1 import common_pb2, encoder_pb2, encoder_pb2_grpc, fusion_pb2, fusion_pb2_grpc
from prometheus_client import Counter

from services.common.errors import (
    DeadlineExceeded,
    DomainError,
    InvalidArgument,
    NotFound,
    Unavailable,
)

log = logging.getLogger("coldstart.gateway.downstream")

DOWNSTREAM_CALLS = Counter(
    "coldstart_gateway_downstream_calls",
    "Calls from the gateway to encoder and fusion, by target, method and status code.",
    ["target", "method", "code"],
)

Response = TypeVar("Response")

# Time kept back from the caller's deadline to answer it (fallback included).
RESERVE_S = 0.05


class Deadline:
    """An absolute deadline on the monotonic clock."""

    def __init__(self, seconds_from_now: float | None) -> None:
        self.at = None if seconds_from_now is None else time.monotonic() + seconds_from_now

    def remaining(self, cap: float) -> float:
        if self.at is None:
            return cap
        return min(cap, self.at - time.monotonic() - RESERVE_S)


def make_channel(
    address: str, ca_file: str = "", cert_file: str = "", key_file: str = ""
) -> grpc.Channel:
    options = [
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.max_receive_message_length", 16 * 1024 * 1024),
        # Our own retry loop decides what is retried.
        ("grpc.enable_retries", 0),
        # Behind a headless Service the DNS name resolves to every pod: spread calls.
        ("grpc.lb_policy_name", "round_robin"),
    ]
    if not ca_file:
        return grpc.insecure_channel(address, options=options)
    credentials = grpc.ssl_channel_credentials(
        root_certificates=Path(ca_file).read_bytes(),
        private_key=Path(key_file).read_bytes() if key_file else None,
        certificate_chain=Path(cert_file).read_bytes() if cert_file else None,
    )
    return grpc.secure_channel(address, credentials, options=options)


class DownstreamCaller:
    def __init__(
        self,
        target: str,
        timeout_s: float,
        retries: int,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.target = target
        self.timeout_s = timeout_s
        self.retries = retries
        self.sleep = sleep
        self._ok: dict[str, Any] = {}  # method -> its OK counter (labels() once)

    def call(
        self,
        method: str,
        rpc: Callable[..., Response],
        request: Any,
        deadline: Deadline,
        *,
        idempotent: bool,
    ) -> Response:
        attempt = 0
        while True:
            timeout = deadline.remaining(self.timeout_s)
            if timeout <= 0:
                raise DeadlineExceeded(f"no time left to call {self.target}.{method}")
            try:
                response = rpc(request, timeout=timeout)
                ok = self._ok.get(method)
                if ok is None:
                    ok = self._ok[method] = DOWNSTREAM_CALLS.labels(self.target, method, "OK")
                ok.inc()
                return response
            except grpc.RpcError as exc:
                code = exc.code() if isinstance(exc, grpc.Call) else grpc.StatusCode.UNKNOWN
                DOWNSTREAM_CALLS.labels(self.target, method, code.name).inc()
                retryable = (
                    idempotent and code == grpc.StatusCode.UNAVAILABLE and attempt < self.retries
                )
                if retryable:
                    backoff = min(0.5, 0.05 * 2**attempt) * (0.5 + random.random() / 2)
                    if deadline.remaining(self.timeout_s) > backoff:
                        attempt += 1
                        self.sleep(backoff)
                        continue
                raise _translate(self.target, method, exc, code) from None


def _translate(target: str, method: str, exc: grpc.RpcError, code: grpc.StatusCode) -> DomainError:
    details = exc.details() if isinstance(exc, grpc.Call) else ""
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        # The field names of the downstream request match ours: pass them on.
        field, _sep, problem = (details or "").partition(": ")
        return InvalidArgument(field or "request", problem or details or "invalid")
    if code == grpc.StatusCode.NOT_FOUND:
        return NotFound(details or f"{target}.{method}: not found")
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return DeadlineExceeded(f"{target}.{method} did not answer in time")
    return Unavailable(f"{target} unavailable ({code.name})")


class EncoderClient:
    def __init__(self, channel: grpc.Channel, caller: DownstreamCaller) -> None:
        self.stub = encoder_pb2_grpc.EncoderServiceStub(channel)
        self.caller = caller

    def embed(self, texts: list[str], deadline: Deadline) -> list[list[float]]:
        reply = self.caller.call(
            "Embed",
            self.stub.Embed,
            encoder_pb2.EmbedRequest(texts=texts),
            deadline,
            idempotent=True,
        )
        return [list(v.values) for v in reply.vectors]


class FusionClient:
    def __init__(self, channel: grpc.Channel, caller: DownstreamCaller) -> None:
        self.stub = fusion_pb2_grpc.FusionServiceStub(channel)
        self.caller = caller
        # Recommend with the reply left as bytes (see ``recommend_wire``).
        self._recommend_wire = channel.unary_unary(
            "/coldstart.v1.FusionService/Recommend",
            request_serializer=fusion_pb2.RecommendRequest.SerializeToString,
            response_deserializer=None,
        )

    def recommend(
        self, request: fusion_pb2.RecommendRequest, deadline: Deadline
    ) -> fusion_pb2.RecommendResponse:
        return self.caller.call(
            "Recommend", self.stub.Recommend, request, deadline, idempotent=True
        )

    def recommend_wire(self, request: fusion_pb2.RecommendRequest, deadline: Deadline) -> bytes:
        """``recommend`` with fusion's serialised reply, not decoded (same retries and
        deadline)."""
        reply: bytes = self.caller.call(
            "Recommend", self._recommend_wire, request, deadline, idempotent=True
        )
        return reply

    def similar_items(
        self, request: fusion_pb2.SimilarItemsRequest, deadline: Deadline
    ) -> fusion_pb2.SimilarItemsResponse:
        return self.caller.call(
            "SimilarItems", self.stub.SimilarItems, request, deadline, idempotent=True
        )

    def upsert_items(
        self, items: list[common_pb2.ItemRecord], deadline: Deadline
    ) -> fusion_pb2.UpsertItemsResponse:
        # An upsert of the same items is idempotent, so it may be retried.
        request = fusion_pb2.UpsertItemsRequest(items=items)
        return self.caller.call(
            "UpsertItems", self.stub.UpsertItems, request, deadline, idempotent=True
        )

    def model_info(self, deadline: Deadline) -> common_pb2.ModelInfo:
        return self.caller.call(
            "GetModelInfo",
            self.stub.GetModelInfo,
            fusion_pb2.GetModelInfoRequest(),
            deadline,
            idempotent=True,
        )

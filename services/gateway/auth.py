"""Bearer-token authentication and a per-client token-bucket rate limit."""

from __future__ import annotations

import hmac
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import grpc

from services.common.errors import ResourceExhausted, Unauthenticated
from services.common.server import UnaryBehaviour, UnaryInterceptor

# Health checks and reflection stay open: probes and tooling carry no token.
OPEN_PREFIXES = ("/grpc.health.v1.", "/grpc.reflection.")


def parse_tokens(entries: Sequence[str]) -> dict[str, str]:
    """'client:token' entries -> {token: client}."""
    tokens: dict[str, str] = {}
    for entry in entries:
        client, _sep, token = entry.partition(":")
        tokens[token] = client
    return tokens


class TokenBucket:
    """Allows ``rate`` calls per second on average and ``burst`` at once."""

    def __init__(
        self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.clock = clock
        self.tokens = float(burst)
        self.updated = clock()

    def take(self) -> bool:
        now = self.clock()
        self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


class Authenticator:
    """Resolves the caller's client id and applies its rate limit."""

    def __init__(
        self,
        tokens: dict[str, str],
        rate: float,
        burst: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.tokens = tokens
        self.rate = rate
        self.burst = burst
        self.clock = clock
        self._buckets: dict[str, TokenBucket] = {}
        self._lock = threading.Lock()

    def client_for(self, metadata: Sequence[tuple[str, Any]] | None) -> str:
        """The caller's client id; raises Unauthenticated or ResourceExhausted."""
        client = self.identify(metadata)
        if self.rate > 0:
            with self._lock:
                bucket = self._buckets.get(client)
                if bucket is None:
                    bucket = self._buckets[client] = TokenBucket(self.rate, self.burst, self.clock)
                allowed = bucket.take()
            if not allowed:
                raise ResourceExhausted(
                    f"rate limit of {self.rate:g} requests/s for client {client!r} exceeded"
                )
        return client

    def identify(self, metadata: Sequence[tuple[str, Any]] | None) -> str:
        """The client id the metadata authenticates (no rate limiting)."""
        if not self.tokens:
            return "anonymous"
        header = next((str(v) for k, v in (metadata or ()) if k == "authorization"), "")
        scheme, _sep, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise Unauthenticated(
                "authorization: expected metadata 'authorization: Bearer <token>'"
            )
        for known, client in self.tokens.items():
            if hmac.compare_digest(known.encode(), token.strip().encode()):
                return client
        raise Unauthenticated("authorization: unknown token")


class AuthInterceptor(UnaryInterceptor):
    """Rejects unauthenticated or over-limit calls before they reach the servicer.

    It runs inside the runtime's error interceptor, so its errors get their
    status codes and are counted like any other answer. The caller's metadata
    is read from the call's context (``wrap`` runs once per method).
    """

    def __init__(self, authenticator: Authenticator) -> None:
        super().__init__()
        self.authenticator = authenticator

    def wrap(self, details: grpc.HandlerCallDetails, behaviour: UnaryBehaviour) -> UnaryBehaviour:
        if details.method.startswith(OPEN_PREFIXES):
            return behaviour
        authenticator = self.authenticator

        def checked(request: Any, context: grpc.ServicerContext) -> Any:
            authenticator.client_for(context.invocation_metadata())
            return behaviour(request, context)

        return checked

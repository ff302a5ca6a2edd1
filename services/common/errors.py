"""Domain errors. Service cores raise these; one interceptor maps them to gRPC
status codes, so the cores stay transport-free and bad input never surfaces
as UNKNOWN or INTERNAL."""

from __future__ import annotations

import grpc


class DomainError(Exception):
    """Base: an error the caller can act on, with the status code to send."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(DomainError):
    """A request field is wrong. The message names the field."""

    code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field


class NotFound(DomainError):
    code = grpc.StatusCode.NOT_FOUND


class FailedPrecondition(DomainError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class Unavailable(DomainError):
    """A dependency (broker, downstream service) cannot be reached; retryable."""

    code = grpc.StatusCode.UNAVAILABLE


class ResourceExhausted(DomainError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unauthenticated(DomainError):
    code = grpc.StatusCode.UNAUTHENTICATED


class DeadlineExceeded(DomainError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class StartupError(Exception):
    """A service cannot start (bad setting, missing model, port in use).

    The runtime prints its message as one line and exits non-zero.
    """

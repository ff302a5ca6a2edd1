"""One way to start a service: ``run_service(APP, argv)``.

It reads and validates settings, sets up JSON logs and the metrics endpoint,
builds the service (models are loaded here), binds the port, runs the warm-up
and only then reports SERVING on ``grpc.health.v1``. SIGTERM (or SIGINT) flips
health to NOT_SERVING, stops accepting calls, lets in-flight calls finish within
``grace_seconds`` and exits 0. Start-up problems print one line and exit 2.
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from services.common import metrics, reflection
from services.common.errors import DomainError, StartupError
from services.common.heap import freeze_long_lived
from services.common.logs import configure_logging
from services.common.settings import ServerSettings, SettingsError, load_settings

log = logging.getLogger("coldstart.server")

S = TypeVar("S", bound=ServerSettings)
AddServicer = Callable[[Any, grpc.Server], None]

VERSION = "0.1.0"
# Set in the environment of the worker processes a supervisor starts.
WORKER_ENV = "COLDSTART_WORKER"


@dataclass
class ServiceParts:
    """What a service's ``build`` returns to the runtime."""

    # (generated add_XServicer_to_server, servicer instance) pairs.
    servicers: list[tuple[AddServicer, Any]]
    # Full proto service names, e.g. "coldstart.v1.EncoderService".
    service_names: list[str]
    # Runs after the port is bound and before SERVING (e.g. a first inference).
    warmup: Callable[[], None] | None = None
    # Runs after the server stopped (flush, close consumers...).
    close: Callable[[], None] | None = None
    # Extra interceptors (e.g. the gateway's auth), run inside the runtime's
    # error mapping so that the DomainErrors they raise get their status code
    # and are counted in the per-RPC metrics like any other answer.
    interceptors: list[grpc.ServerInterceptor] = field(default_factory=list)


@dataclass(frozen=True)
class ServiceApp(Generic[S]):
    name: str
    settings_type: type[S]
    build: Callable[[S], ServiceParts]


UnaryBehaviour = Callable[[Any, grpc.ServicerContext], Any]


class UnaryInterceptor(grpc.ServerInterceptor):
    """Base for interceptors that wrap the behaviour of unary-unary methods
    (all of ours); other kinds of handler pass through untouched.

    ``wrap`` runs once per method, not once per call: the wrapped handler is
    kept and reused while the handler it wraps stays the same object. So
    ``wrap`` may use ``details.method`` but nothing else of the call; per-call
    data (metadata, peer) is read from the ``context`` inside the behaviour.
    """

    def __init__(self) -> None:
        # method -> (the handler it wraps, the wrapped handler)
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    def wrap(self, details: grpc.HandlerCallDetails, behaviour: UnaryBehaviour) -> UnaryBehaviour:
        raise NotImplementedError

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        if handler is None or handler.unary_unary is None:
            return handler
        method = handler_call_details.method
        cached = self._wrapped.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = grpc.unary_unary_rpc_method_handler(
            self.wrap(handler_call_details, handler.unary_unary),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
        self._wrapped[method] = (handler, wrapped)
        return wrapped


class DomainErrorInterceptor(UnaryInterceptor):
    """Records per-RPC metrics and maps domain errors to status codes.

    Bad input never becomes UNKNOWN: DomainError subclasses carry their code;
    any other exception is logged with its traceback and answered INTERNAL with
    a generic message (details stay in the logs, not with the caller).
    """

    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def wrap(self, details: grpc.HandlerCallDetails, behaviour: UnaryBehaviour) -> UnaryBehaviour:
        method = details.method.rsplit("/", 1)[-1]
        service = self.service

        def wrapped(request: Any, context: grpc.ServicerContext) -> Any:
            started = time.perf_counter()
            in_flight = metrics.RPC_IN_FLIGHT.labels(service, method)
            in_flight.inc()
            code = grpc.StatusCode.OK
            try:
                return behaviour(request, context)
            except DomainError as exc:
                code = exc.code
                context.abort(exc.code, exc.message)
            except Exception:
                # context.abort() raises too; its code is already set on the context.
                set_code = context.code()  # type: ignore[attr-defined]
                if isinstance(set_code, grpc.StatusCode) and set_code != grpc.StatusCode.OK:
                    code = set_code
                    raise
                code = grpc.StatusCode.INTERNAL
                log.exception("unhandled error", extra={"method": method})
                context.abort(grpc.StatusCode.INTERNAL, "internal error")
            finally:
                in_flight.dec()
                metrics.RPC_LATENCY.labels(service, method).observe(time.perf_counter() - started)
                metrics.RPC_REQUESTS.labels(service, method, code.name).inc()
            return None  # unreachable: abort() raises

        return wrapped


def server_credentials(settings: ServerSettings) -> grpc.ServerCredentials | None:
    if not settings.tls_cert_file:
        return None
    key = Path(settings.tls_key_file).read_bytes()
    cert = Path(settings.tls_cert_file).read_bytes()
    client_ca = (
        Path(settings.tls_client_ca_file).read_bytes() if settings.tls_client_ca_file else None
    )
    return grpc.ssl_server_credentials(
        [(key, cert)],
        root_certificates=client_ca,
        require_client_auth=client_ca is not None,
    )


class RunningService:
    """A started server; tests use it in-process, ``run_service`` in a process."""

    def __init__(self, name: str, settings: ServerSettings, parts: ServiceParts) -> None:
        self.name = name
        self.settings = settings
        self.parts = parts
        self.health = health.HealthServicer()
        self.server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=settings.max_workers, thread_name_prefix=name),
            interceptors=[DomainErrorInterceptor(name), *parts.interceptors],
            options=[
                ("grpc.max_receive_message_length", settings.max_receive_message_bytes),
                ("grpc.max_send_message_length", settings.max_send_message_bytes),
                # Without this a second server could bind the same port silently;
                # only the worker processes of one supervisor share a port.
                ("grpc.so_reuseport", 1 if os.environ.get(WORKER_ENV) else 0),
            ],
        )
        for add, servicer in parts.servicers:
            add(servicer, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            [*parts.service_names, health.SERVICE_NAME, reflection.SERVICE_NAME], self.server
        )
        self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        address = f"{settings.host}:{settings.port}"
        credentials = server_credentials(settings)
        try:
            if credentials is None:
                self.port = self.server.add_insecure_port(address)
            else:
                self.port = self.server.add_secure_port(address, credentials)
        except RuntimeError:
            self.port = 0
        if self.port == 0:
            raise StartupError(
                f"port {settings.port}: cannot listen on {address} (in use or not permitted)"
            )

    def _set_health(self, status: int) -> None:
        for service_name in ["", *self.parts.service_names]:
            self.health.set(service_name, status)
        metrics.SERVICE_READY.labels(self.name).set(
            1 if status == health_pb2.HealthCheckResponse.SERVING else 0
        )

    def start(self) -> None:
        self.server.start()
        if self.parts.warmup is not None:
            self.parts.warmup()
        # Models loaded and warmed: their objects live as long as the process.
        freeze_long_lived()
        self._set_health(health_pb2.HealthCheckResponse.SERVING)
        log.info("serving", extra={"port": self.port, "services": self.parts.service_names})

    def stop(self, grace: float | None = None) -> None:
        """NOT_SERVING, refuse new calls, wait for in-flight ones, then close."""
        self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        grace = self.settings.grace_seconds if grace is None else grace
        self.server.stop(grace).wait()
        if self.parts.close is not None:
            self.parts.close()
        # Frozen objects are never collected; thawed, the interpreter's exit finds
        # nothing reported as leaked (native extensions check at exit).
        gc.unfreeze()
        log.info("stopped")


def parse_service_args(name: str, argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=f"coldstart serve {name}")
    parser.add_argument("--config", help=f"TOML settings file (section [{name}])")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one setting (repeatable)",
    )
    return parser.parse_args(list(argv))


def run_service(app: ServiceApp[S], argv: Sequence[str] = ()) -> int:
    """Run ``app`` until SIGTERM/SIGINT; return the process exit code."""
    args = parse_service_args(app.name, argv)
    prog = f"coldstart serve {app.name}"
    try:
        settings = load_settings(
            app.settings_type, app.name, config_file=args.config, overrides=args.overrides
        )
    except SettingsError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    configure_logging(app.name, settings.log_level)
    if settings.processes > 1 and not os.environ.get(WORKER_ENV):
        return supervise(app, settings, list(argv))
    metrics.BUILD_INFO.labels(app.name, VERSION).set(1)

    stop_requested = threading.Event()

    def request_stop(signum: int, _frame: object) -> None:
        log.info("signal received, shutting down", extra={"signal": signal.Signals(signum).name})
        stop_requested.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)

    try:
        metrics.start_metrics_server(settings.host, settings.metrics_port)
        parts = app.build(settings)
        running = RunningService(app.name, settings, parts)
        running.start()
    except (StartupError, SettingsError) as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2

    while not stop_requested.wait(timeout=1.0):
        pass
    running.stop()
    return 0


def supervise(app: ServiceApp[S], settings: S, argv: list[str]) -> int:
    """Run ``settings.processes`` copies of the service on one port.

    Each worker is a fresh interpreter (`coldstart serve` again) that binds the
    port with SO_REUSEPORT, so the kernel spreads connections over them; this
    process serves their merged metrics and passes SIGTERM on.
    """
    import shutil
    import sys
    import tempfile

    prog = f"coldstart serve {app.name}"
    # Hold the port (bound, not listening) so an outside server cannot take it
    # between the workers' starts, and fail early if it is taken already.
    holder = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        holder.bind((settings.host, settings.port))
    except OSError as exc:
        print(
            f"{prog}: error: port {settings.port}: cannot listen on {settings.host}:{settings.port} ({exc.strerror})",
            file=sys.stderr,
        )
        return 2
    port = holder.getsockname()[1]
    metrics_dir = tempfile.mkdtemp(prefix=f"coldstart-{app.name}-metrics-")
    try:
        metrics.start_metrics_server(
            settings.host, settings.metrics_port, metrics.multiprocess_registry(metrics_dir)
        )
    except StartupError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    command = [
        sys.executable,
        "-m",
        "services.cli",
        "serve",
        app.name,
        *argv,
        "--set",
        f"port={port}",
        "--set",
        "metrics_port=0",
    ]
    workers = [
        subprocess.Popen(
            command, env={**os.environ, WORKER_ENV: str(i), "PROMETHEUS_MULTIPROC_DIR": metrics_dir}
        )
        for i in range(settings.processes)
    ]
    log.info("supervising workers", extra={"port": port, "pids": [w.pid for w in workers]})
    stopping = threading.Event()

    def forward(signum: int, _frame: object) -> None:
        stopping.set()
        for worker in workers:
            if worker.poll() is None:
                worker.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    code = 0
    try:
        while any(w.poll() is None for w in workers):
            failed = [w for w in workers if w.poll() not in (None, 0)]
            if failed and not stopping.is_set():
                # One worker down (bad start or crash): stop the rest and say so.
                code = failed[0].returncode
                forward(signal.SIGTERM, None)
            time.sleep(0.2)
        if not code:
            code = next((w.returncode for w in workers if w.returncode), 0)
    finally:
        holder.close()
        shutil.rmtree(metrics_dir, ignore_errors=True)
    return code

"""A real single-node Apache Kafka broker (KRaft combined mode) from Maven
Central jars, for one machine and for the integration tests.

`coldstart kafka start` resolves the jars (cached by the POM's hash), formats a
data directory, starts the JVM in its own process session, waits until the
client port serves, and creates the topics with explicit partition counts.
State (pid, ports) is kept in ``<state_dir>/broker.json`` so `stop` and
`status` work from another process.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from services.common.paths import cache_dir, run_dir

POM = Path(__file__).resolve().parent / "pom.xml"

LOG4J2_CONFIG = """<?xml version="1.0" encoding="UTF-8"?>
<Configuration status="WARN">
  <Appenders>
    <File name="server" fileName="${sys:kafka.logs.dir}/server.log">
      <PatternLayout pattern="[%d] %p %m (%c)%n"/>
    </File>
  </Appenders>
  <Loggers>
    <Root level="INFO"><AppenderRef ref="server"/></Root>
    <Logger name="kafka.request.logger" level="WARN"/>
    <Logger name="org.apache.kafka.controller" level="WARN"/>
  </Loggers>
</Configuration>
"""


class KafkaError(RuntimeError):
    """The broker could not be resolved, started or reached; one-line message."""


@dataclass(frozen=True)
class Topic:
    name: str
    partitions: int


DEFAULT_TOPICS = (Topic("coldstart.events", 6), Topic("coldstart.events.dlq", 1))


@dataclass
class BrokerState:
    pid: int
    port: int
    controller_port: int
    data_dir: str
    log_dir: str

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"


def resolve_jars() -> Path:
    """Folder of the broker's jars; resolved once per POM content."""
    digest = hashlib.sha256(POM.read_bytes()).hexdigest()[:16]
    target = cache_dir() / "kafka" / f"jars-{digest}"
    if (target / ".complete").exists():
        return target
    if shutil.which("mvn") is None:
        raise KafkaError("mvn not found: Maven is needed to resolve the Kafka jars")
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    result = subprocess.run(
        [
            "mvn",
            "-B",
            "-q",
            "-f",
            str(POM),
            "dependency:copy-dependencies",
            "-DincludeScope=runtime",
            f"-DoutputDirectory={partial}",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        tail = (result.stdout + result.stderr).strip().splitlines()[-3:]
        raise KafkaError(f"resolving Kafka jars with Maven failed: {' | '.join(tail)}")
    (partial / ".complete").write_text("ok\n")
    shutil.rmtree(target, ignore_errors=True)
    partial.rename(target)
    return target


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child still answers kill(0); check its state.
    try:
        status = Path(f"/proc/{pid}/stat").read_text().split()[2]
    except OSError:
        return False
    return status != "Z"


def die_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` after which the child gets SIGTERM when the thread that
    started it dies (Linux ``PR_SET_PDEATHSIG``; None elsewhere). A bench or test
    killed hard then leaves no broker behind; the broker of ``coldstart kafka
    start`` / ``make up`` is meant to outlive its starter and does not use it.

    ``prctl`` is looked up here, in the parent: between fork and exec the child
    only makes that one C call (no import, no allocation), which is what makes a
    ``preexec_fn`` safe in a process with threads."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    prctl = ctypes.CDLL(None, use_errno=True).prctl
    pr_set_pdeathsig, sigterm = 1, int(signal.SIGTERM)

    def set_death_signal() -> None:
        prctl(pr_set_pdeathsig, sigterm)

    return set_death_signal


class LocalKafka:
    """One broker whose files live in ``state_dir``.

    ``owned``: the broker belongs to this process and dies with it (benches and
    tests); otherwise it runs until ``stop()``, whoever started it."""

    def __init__(
        self,
        state_dir: Path | None = None,
        port: int = 0,
        controller_port: int = 0,
        *,
        owned: bool = False,
    ) -> None:
        self.state_dir = Path(state_dir) if state_dir else run_dir() / "kafka"
        self.port = port
        self.controller_port = controller_port
        self.owned = owned
        self.state_file = self.state_dir / "broker.json"

    def state(self) -> BrokerState | None:
        if not self.state_file.exists():
            return None
        state = BrokerState(**json.loads(self.state_file.read_text()))
        return state if _alive(state.pid) else None

    def start(
        self, topics: tuple[Topic, ...] = DEFAULT_TOPICS, timeout_s: float = 120.0
    ) -> BrokerState:
        """Start (or find running) the broker and make sure the topics exist."""
        running = self.state()
        if running is not None and _port_open(running.port):
            create_topics(running.bootstrap, topics)
            return running
        java = shutil.which("java")
        if java is None:
            raise KafkaError("java not found: Kafka 4.x needs Java 17 or newer")
        jars = resolve_jars()
        port = self.port or _free_port()
        controller_port = self.controller_port or _free_port()
        if port == controller_port:
            raise KafkaError("port and controller port must differ")
        for name, value in (("port", port), ("controller port", controller_port)):
            if _port_open(value):
                raise KafkaError(f"{name} {value} on 127.0.0.1 is already in use")
        data_dir = self.state_dir / "data"
        log_dir = self.state_dir / "logs"
        log_dir.mkdir(parents=True, exist_ok=True)
        properties = self.state_dir / "server.properties"
        properties.write_text(_server_properties(port, controller_port, data_dir))
        log_config = self.state_dir / "log4j2.xml"
        log_config.write_text(LOG4J2_CONFIG)
        classpath = f"{jars}/*"
        # The broker refuses to start on an unformatted dir, and a dir formatted
        # for other ports/cluster is stale: format fresh every start (data of a
        # stopped local broker is disposable by design; tests want a clean one).
        shutil.rmtree(data_dir, ignore_errors=True)
        cluster_id = (
            subprocess.run(
                [java, "-cp", classpath, "kafka.tools.StorageTool", "random-uuid"],
                capture_output=True,
                text=True,
                check=True,
            )
            .stdout.strip()
            .splitlines()[-1]
        )
        formatted = subprocess.run(
            [
                java,
                "-cp",
                classpath,
                "kafka.tools.StorageTool",
                "format",
                "-t",
                cluster_id,
                "-c",
                str(properties),
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        if formatted.returncode != 0:
            raise KafkaError(f"formatting {data_dir} failed: {formatted.stderr.strip()[-300:]}")
        stdout = (log_dir / "stdout.log").open("ab")
        process = subprocess.Popen(
            [
                java,
                "-Xms256m",
                "-Xmx512m",
                "-XX:+UseG1GC",
                "-XX:TieredStopAtLevel=1",
                f"-Dkafka.logs.dir={log_dir}",
                f"-Dlog4j2.configurationFile={log_config}",
                "-cp",
                classpath,
                "kafka.Kafka",
                str(properties),
            ],
            stdout=stdout,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # outlives `coldstart kafka start`; stop() ends it
            preexec_fn=die_with_parent() if self.owned else None,  # noqa: PLW1509 (see there)
        )
        stdout.close()
        state = BrokerState(process.pid, port, controller_port, str(data_dir), str(log_dir))
        self.state_file.write_text(json.dumps(asdict(state)))
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise KafkaError(
                    f"broker exited with {process.returncode}; see {log_dir}/server.log"
                )
            if _port_open(port):
                break
            time.sleep(0.25)
        else:
            self.stop()
            raise KafkaError(f"broker did not open 127.0.0.1:{port} within {timeout_s:.0f}s")
        create_topics(state.bootstrap, topics, timeout_s=max(10.0, deadline - time.monotonic()))
        return state

    def stop(self, timeout_s: float = 30.0) -> bool:
        """SIGTERM the broker and wait; SIGKILL if it will not go. True if one ran."""
        if not self.state_file.exists():
            return False
        state = BrokerState(**json.loads(self.state_file.read_text()))
        was_running = _alive(state.pid)
        if was_running:
            os.kill(state.pid, signal.SIGTERM)
            deadline = time.monotonic() + timeout_s
            while _alive(state.pid) and time.monotonic() < deadline:
                _reap(state.pid)
                time.sleep(0.2)
            if _alive(state.pid):
                os.kill(state.pid, signal.SIGKILL)
                time.sleep(0.5)
            _reap(state.pid)
        self.state_file.unlink(missing_ok=True)
        return was_running


def _reap(pid: int) -> None:
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


def _server_properties(port: int, controller_port: int, data_dir: Path) -> str:
    return "\n".join(
        [
            "process.roles=broker,controller",
            "node.id=1",
            f"controller.quorum.voters=1@127.0.0.1:{controller_port}",
            f"listeners=PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller_port}",
            f"advertised.listeners=PLAINTEXT://127.0.0.1:{port}",
            "inter.broker.listener.name=PLAINTEXT",
            "controller.listener.names=CONTROLLER",
            "listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
            f"log.dirs={data_dir}",
            # One node: internal topics need replication factor 1 or never appear.
            "offsets.topic.replication.factor=1",
            "offsets.topic.num.partitions=6",
            "transaction.state.log.replication.factor=1",
            "transaction.state.log.min.isr=1",
            "share.coordinator.state.topic.replication.factor=1",
            "share.coordinator.state.topic.min.isr=1",
            "group.initial.rebalance.delay.ms=0",
            "auto.create.topics.enable=false",
            "num.partitions=1",
            "log.cleaner.dedupe.buffer.size=8388608",
            "",
        ]
    )


def create_topics(bootstrap: str, topics: tuple[Topic, ...], timeout_s: float = 30.0) -> None:
    """Create missing topics; wait until each has a leader for every partition."""
    from kafka import KafkaAdminClient, KafkaConsumer
    from kafka.admin import NewTopic
    from kafka.errors import KafkaError as ClientError
    from kafka.errors import TopicAlreadyExistsError

    deadline = time.monotonic() + timeout_s
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            admin = KafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=10_000)
            try:
                existing = set(admin.list_topics())
                missing = [
                    NewTopic(t.name, num_partitions=t.partitions, replication_factor=1)
                    for t in topics
                    if t.name not in existing
                ]
                if missing:
                    with contextlib.suppress(TopicAlreadyExistsError):
                        admin.create_topics(missing)
            finally:
                admin.close()
            probe = KafkaConsumer(bootstrap_servers=bootstrap)
            try:
                ready = all(
                    len(probe.partitions_for_topic(t.name) or ()) == t.partitions for t in topics
                )
            finally:
                probe.close()
            if ready:
                return
        except ClientError as exc:
            last_error = exc
        time.sleep(0.5)
    raise KafkaError(f"topics not ready on {bootstrap} within {timeout_s:.0f}s ({last_error})")


def cli(action: str, argv: list[str]) -> int:
    """`coldstart kafka start|stop|status [--port N] [--controller-port N] [--state-dir D]`."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog=f"coldstart kafka {action}")
    parser.add_argument(
        "--port", type=int, default=int(os.environ.get("COLDSTART_KAFKA_PORT", "9092"))
    )
    parser.add_argument("--controller-port", type=int, default=0)
    parser.add_argument("--state-dir", type=Path, default=None)
    args = parser.parse_args(argv)
    broker = LocalKafka(args.state_dir, port=args.port, controller_port=args.controller_port)
    try:
        if action == "start":
            started = broker.start()
            print(
                f"kafka: serving on {started.bootstrap} (pid {started.pid}); logs in {started.log_dir}"
            )
            return 0
        if action == "stop":
            print("kafka: stopped" if broker.stop() else "kafka: was not running")
            return 0
        state = broker.state()
        if state is None:
            print("kafka: not running")
            return 1
        up = "serving" if _port_open(state.port) else "starting"
        print(f"kafka: {up} on {state.bootstrap} (pid {state.pid})")
        return 0
    except KafkaError as exc:
        print(f"coldstart kafka {action}: error: {exc}", file=sys.stderr)
        return 1

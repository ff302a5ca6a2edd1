"""`coldstart up` / `coldstart down`: the whole system on one machine.

Starts the local Kafka broker, makes sure an encoder export and a first
recommender model exist (training one on the embedded synthetic data, or on
a dataset named by ``--data``), starts encoder, fusion, trainer and gateway as
background processes, waits until each reports SERVING, and prints how to
call the gateway. `coldstart down` stops everything it started.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from services.common.gotools import find_go_tool
from services.common.kafka.local_broker import KafkaError, LocalKafka
from services.common.paths import REPO_ROOT, run_dir
from services.common.ports import DEFAULT_PORTS
from services.common.registry import ModelRegistry
from services.trainer.retrain import RunRecord
from services.trainer.settings import TrainerSettings

DEV_TOKEN = "dev-token"


@dataclass(frozen=True)
class Ports:
    gateway: int = DEFAULT_PORTS["gateway"].grpc
    encoder: int = DEFAULT_PORTS["encoder"].grpc
    fusion: int = DEFAULT_PORTS["fusion"].grpc
    trainer: int = DEFAULT_PORTS["trainer"].grpc
    kafka: int = 9092

    def metrics(self, service: str) -> int:
        return DEFAULT_PORTS[service].metrics


def state_file() -> Path:
    return run_dir() / "up.json"


def registry_dirs() -> tuple[Path, Path]:
    root = run_dir() / "registry"
    return root / "encoder", root / "recommender"


def _coldstart(*args: str) -> list[str]:
    return [sys.executable, "-m", "services.cli", *args]


def _run_step(title: str, command: list[str]) -> None:
    print(f"==> {title}", flush=True)
    result = subprocess.run(command, cwd=REPO_ROOT, check=False)
    if result.returncode != 0:
        raise SystemExit(
            f"coldstart up: {title} failed (exit {result.returncode}); command: {' '.join(command)}"
        )


# A retraining run starts after this many new events in the main job: a demo burst
# of a few hundred interactions is enough to see the loop turn.
RETRAIN_EVERY_EVENTS = 200
DATA_MARKER = "up-data"  # in the recommender registry: the dataset its versions came from


def trainer_settings(data: str) -> TrainerSettings:
    """The main job's trainer: its own log and the shared registry, the first model's
    data as its base data, and a retrain trigger on."""
    _, model_registry = registry_dirs()
    return TrainerSettings(
        registry_dir=str(model_registry),
        log_dir=str(run_dir() / "trainer"),
        initial_data=data,
        retrain_every_events=RETRAIN_EVERY_EVENTS,
        workers=1,
    )


def ensure_models(data: str, retrain: bool) -> None:
    """An encoder export and a first recommender version, made once.

    The first version is a retraining run of the trainer (base data plus whatever
    its event log holds, the newest interactions held out), run here before the
    services start, so every version the registry ever holds is made and gated the
    same way and later runs compare like with like.
    """
    encoder_registry, model_registry = registry_dirs()
    if ModelRegistry(encoder_registry).current() is None:
        _run_step(
            "exporting the text encoder to ONNX",
            _coldstart("export", "encoder", "--registry-dir", str(encoder_registry), "--int8"),
        )
    marker = model_registry / DATA_MARKER
    previous = marker.read_text().strip() if marker.is_file() else None
    if previous is not None and previous != data:
        print(f"==> the registry's versions were trained on {previous}, not {data}", flush=True)
        retrain = True
    if not retrain and ModelRegistry(model_registry).current() is not None:
        return
    # A first version of other data (or one the user asked to replace) is no bar
    # for the new one's gate: start the registry afresh.
    shutil.rmtree(model_registry, ignore_errors=True)
    print(f"==> training a first model on {data} (a trainer run)", flush=True)
    record = train_first_version(trainer_settings(data))
    if record.state != "published":
        raise SystemExit(
            f"coldstart up: the first training run {record.state}: {record.message} "
            f"(log: {run_dir() / 'trainer' / 'runs' / record.run_id / 'train.log'})"
        )
    model_registry.mkdir(parents=True, exist_ok=True)
    marker.write_text(data + "\n")
    print(f"    published {record.published_version}: {record.message}", flush=True)


def train_first_version(settings: TrainerSettings) -> RunRecord:
    """One retraining run, in this process, on the trainer's log and registry
    (the trainer service must not be running on them)."""
    from services.trainer.event_log import EventLog
    from services.trainer.retrain import Retrainer

    settings.validate()
    log_dir = settings.log_path()
    log_dir.mkdir(parents=True, exist_ok=True)
    event_log = EventLog(log_dir / "events.sqlite", synchronous=settings.sqlite_synchronous)
    try:
        registry = ModelRegistry(settings.registry_path())
        registry.root.mkdir(parents=True, exist_ok=True)
        retrainer = Retrainer(settings, event_log, registry)
        retrainer.recover()
        return retrainer.run(f"first model on {settings.initial_data}")
    finally:
        event_log.close()


def service_settings(service: str, ports: Ports, kafka: str, data: str) -> dict[str, object]:
    encoder_registry, model_registry = registry_dirs()
    trainer = trainer_settings(data)
    common: dict[str, object] = {
        "port": getattr(ports, service),
        "metrics_port": ports.metrics(service),
    }
    specific: dict[str, dict[str, object]] = {
        "encoder": {"registry_dir": encoder_registry},
        "fusion": {
            "registry_dir": model_registry,
            "kafka_bootstrap": kafka,
            "encoder_address": f"127.0.0.1:{ports.encoder}",
            "snapshot_dir": run_dir() / "fusion",
        },
        "trainer": {
            "kafka_bootstrap": kafka,
            # The same log, registry, base data and trigger the first version's run had.
            **{
                name: getattr(trainer, name)
                for name in ("registry_dir", "log_dir", "initial_data", "retrain_every_events")
            },
        },
        "gateway": {
            "kafka_bootstrap": kafka,
            "fusion_address": f"127.0.0.1:{ports.fusion}",
            "encoder_address": f"127.0.0.1:{ports.encoder}",
            "registry_dir": model_registry,
            "auth_tokens": f"dev:{DEV_TOKEN}",
        },
    }
    return {**common, **specific[service]}


def start_service(service: str, settings: dict[str, object], log_dir: Path) -> int:
    args = ["serve", service]
    for key, value in settings.items():
        args += ["--set", f"{key}={value}"]
    log_dir.mkdir(parents=True, exist_ok=True)
    with (log_dir / f"{service}.log").open("ab") as log:
        process = subprocess.Popen(
            _coldstart(*args),
            cwd=REPO_ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # keeps running after `coldstart up` returns
        )
    return process.pid


def wait_serving(
    service: str, pid: int, port: int, log_dir: Path, timeout_s: float = 300.0
) -> None:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if not _alive(pid):
                tail = (
                    (log_dir / f"{service}.log")
                    .read_text(errors="replace")
                    .strip()
                    .splitlines()[-5:]
                )
                raise SystemExit(
                    f"coldstart up: {service} exited during start-up:\n  " + "\n  ".join(tail)
                )
            try:
                if (
                    stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status
                    == health_pb2.HealthCheckResponse.SERVING
                ):
                    print(f"    {service} SERVING on 127.0.0.1:{port}", flush=True)
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.25)
    raise SystemExit(
        f"coldstart up: {service} not SERVING within {timeout_s:.0f}s; see {log_dir / service}.log"
    )


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def grpcurl_path() -> str | None:
    """grpcurl from PATH, else the pinned one built once from the Go module proxy."""
    print("==> grpcurl (built once from the Go module proxy where missing)", flush=True)
    found = find_go_tool("grpcurl")
    return str(found) if found is not None else None


def how_to_call(ports: Ports, grpcurl: str | None) -> str:
    address = f"127.0.0.1:{ports.gateway}"
    grpcurl_cmd = grpcurl or "grpcurl"
    return f"""
coldstart is up. Gateway: {address} (token: {DEV_TOKEN}); logs in {run_dir() / "logs"}.

Call it with grpcurl{"" if grpcurl else " (not found: install it, or use the Python snippet)"}:

  {grpcurl_cmd} -plaintext -H 'authorization: Bearer {DEV_TOKEN}' \\
    -d '{{"anonymous": {{"interest_text": "space adventure with robots"}}, "k": 5, "include_display": true}}' \\
    {address} coldstart.v1.GatewayService/Recommend

Or from Python (inside this repo's virtualenv: .venv/bin/python):

  import grpc
  from coldstart.v1 import gateway_pb2, gateway_pb2_grpc
  stub = gateway_pb2_grpc.GatewayServiceStub(grpc.insecure_channel("{address}"))
  auth = (("authorization", "Bearer {DEV_TOKEN}"),)
  user = stub.RegisterUser(gateway_pb2.RegisterUserRequest(interest_text="film noir"), metadata=auth, timeout=5)
  print(stub.Recommend(gateway_pb2.GatewayRecommendRequest(user_id=user.user_id, k=5, include_display=True), metadata=auth, timeout=5))

Then try `.venv/bin/coldstart demo`; stop everything with `make down`.
"""


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="coldstart up", description=__doc__)
    parser.add_argument(
        "--data",
        default="synthetic",
        help="dataset for the first model: synthetic, ml-100k, ml-latest-small or a folder",
    )
    parser.add_argument(
        "--retrain",
        action="store_true",
        help="discard the recommender registry and train a first model anew",
    )
    parser.add_argument("--kafka-port", type=int, default=9092)
    args = parser.parse_args(argv)
    ports = Ports(kafka=args.kafka_port)
    if state_file().exists():
        main_down([])
    print(f"==> starting Kafka on 127.0.0.1:{ports.kafka}", flush=True)
    try:
        broker = LocalKafka(run_dir() / "kafka", port=ports.kafka).start()
    except KafkaError as exc:
        print(f"coldstart up: error: {exc}", file=sys.stderr)
        return 1
    log_dir = run_dir() / "logs"
    started: dict[str, int] = {}
    state_file().parent.mkdir(parents=True, exist_ok=True)
    try:
        ensure_models(args.data, args.retrain)
        for service in ("encoder", "fusion", "trainer", "gateway"):
            print(f"==> starting {service}", flush=True)
            pid = start_service(
                service, service_settings(service, ports, broker.bootstrap, args.data), log_dir
            )
            started[service] = pid
            state_file().write_text(json.dumps({"services": started, "ports": ports.__dict__}))
            wait_serving(service, pid, getattr(ports, service), log_dir)
    except (SystemExit, KeyboardInterrupt):
        # Half a system is worse than none: stop what this run started.
        main_down([])
        raise
    print(how_to_call(ports, grpcurl_path()))
    return 0


def main_down(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="coldstart down", description="stop what `coldstart up` started"
    )
    parser.add_argument("--keep-kafka", action="store_true")
    args = parser.parse_args(argv)
    if state_file().exists():
        services: dict[str, int] = json.loads(state_file().read_text()).get("services", {})
        for service, pid in reversed(list(services.items())):
            if _alive(pid):
                os.kill(pid, signal.SIGTERM)
                deadline = time.monotonic() + 30
                while _alive(pid) and time.monotonic() < deadline:
                    time.sleep(0.2)
                if _alive(pid):
                    os.kill(pid, signal.SIGKILL)
                print(f"stopped {service}")
        state_file().unlink()
    if not args.keep_kafka and LocalKafka(run_dir() / "kafka").stop():
        print("stopped kafka")
    return 0

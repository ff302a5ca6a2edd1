"""SIGKILL of `coldstart serve trainer` during training and during publishing:
the registry never lists a partial version, CURRENT always names a complete
one, and the next start cleans up (or finishes a publication the gate passed)."""

from __future__ import annotations

import json
import random
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest
from coldstart.v1 import events_pb2, trainer_pb2, trainer_pb2_grpc

from services.common.events import encode_event, new_event
from services.common.registry import MANIFEST, ModelRegistry
from services.trainer.event_log import EventLog, Incoming
from services.trainer.retrain import RUN_ENV
from tests.support.processes import ServiceProcess, running_service

pytestmark = pytest.mark.integration

FAKE = (
    "{python} -m tests.unit.trainer_service.fake_trainer --data {data} "
    "--registry {registry} --tag {run_id}"
)
FINAL = ("published", "gated", "failed")


def seed_log(path: Path) -> None:
    """Items and skewed interactions, so a popularity model beats chance."""
    rng = random.Random(3)
    events = [
        new_event(
            "test",
            timestamp_ms=1000,
            item_upserted=events_pb2.ItemUpserted(item_id=f"i{n}", text=f"item {n}"),
        )
        for n in range(60)
    ]
    for n in range(3000):
        item = min(int(rng.expovariate(0.15)), 59)
        events.append(
            new_event(
                "test",
                timestamp_ms=2000 + n,
                interaction=events_pb2.Interaction(
                    user_id=f"u{rng.randrange(300)}", item_id=f"i{item}", kind="view", value=1.0
                ),
            )
        )
    log = EventLog(path)
    log.apply("unused", [Incoming(0, i, e, encode_event(e)) for i, e in enumerate(events)], {})
    log.close()


def complete(folder: Path) -> bool:
    """All files the stand-in trainer writes, at their full size."""
    weights = folder / "weights.bin"
    return (
        (folder / "popularity.json").is_file()
        and weights.is_file()
        and weights.stat().st_size == 4096
    )


class RegistryWatcher:
    """Checks the registry's invariants every few milliseconds in a thread."""

    def __init__(self, root: Path) -> None:
        self.registry = ModelRegistry(root)
        self.violations: list[str] = []
        self.checks = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.check()
            self.checks += 1
            time.sleep(0.005)

    def check(self) -> None:
        listed = self.registry.versions()
        for version in listed:
            folder = self.registry.path(version)
            try:
                manifest = json.loads((folder / MANIFEST).read_text())
            except FileNotFoundError:
                continue  # pruned between listing and reading: gone whole, not partial
            if manifest.get("version") != version:
                self.violations.append(f"{version}: manifest names {manifest.get('version')}")
            if not complete(folder) and folder.exists():
                self.violations.append(f"{version}: listed without all of its files")
        current = self.registry.current()
        if current is not None and not (self.registry.path(current) / MANIFEST).is_file():
            self.violations.append(f"CURRENT names {current}, which is not a complete version")

    def __enter__(self) -> RegistryWatcher:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def stub(trainer: ServiceProcess) -> trainer_pb2_grpc.TrainerServiceStub:
    return trainer_pb2_grpc.TrainerServiceStub(grpc.insecure_channel(trainer.address))


def wait_for(condition: object, timeout_s: float = 60.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():  # type: ignore[operator]
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def journal(state_dir: Path) -> list[dict[str, object]]:
    runs: list[dict[str, object]] = json.loads((state_dir / "runs.json").read_text())["runs"]
    return runs


def process_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split()[2]
    except OSError:
        return False
    return state != "Z"


def test_kills_during_training_and_publishing_never_expose_a_partial_version(
    tmp_path: Path,
) -> None:
    state_dir = tmp_path / "state"
    registry = ModelRegistry(tmp_path / "registry")
    seed_log(state_dir / "events.sqlite")
    base: dict[str, object] = {
        "consume": "false",
        "log_dir": state_dir,
        "registry_dir": registry.root,
        "train_command": FAKE,
        "holdout_fraction": 0.2,
    }

    @contextmanager
    def trainer(**extra: object) -> Iterator[ServiceProcess]:
        with running_service("trainer", tmp_path / "logs", settings={**base, **extra}) as svc:
            yield svc

    def trigger(svc: ServiceProcess) -> str:
        reply = stub(svc).TriggerRetrain(trainer_pb2.TriggerRetrainRequest(reason="t"), timeout=10)
        assert reply.started
        return reply.run_id

    def last_state(svc: ServiceProcess) -> str:
        reply = stub(svc).GetStatus(trainer_pb2.GetStatusRequest(), timeout=10)
        return reply.last_run.state

    with RegistryWatcher(registry.root) as watcher:
        # A: a first version.
        with trainer() as svc:
            trigger(svc)
            wait_for(lambda: last_state(svc) in FINAL, what="first run")
            status = stub(svc).GetStatus(trainer_pb2.GetStatusRequest(), timeout=10)
            assert status.last_run.state == "published", status.last_run.message
            first = registry.current()
            assert first is not None and status.current_model.version == first
            assert list(status.kept_versions) == [first]
            assert status.last_run.candidate_metrics["recall_at_20"] > 0
            assert status.current_model.metrics["holdout_recall_at_20"] > 0

        # B: SIGKILL while the training command runs.
        with trainer(train_command=f"{FAKE} --sleep 60") as svc:
            run_b = trigger(svc)
            wait_for(lambda: last_state(svc) == "training", what="training")
            wait_for(lambda: journal(state_dir)[-1].get("pid"), what="training pid")
            orphan = int(journal(state_dir)[-1]["pid"])  # type: ignore[call-overload]
            svc.kill()
        assert registry.versions() == [first] and registry.current() == first
        assert process_alive(orphan)  # its own session: the kill did not reach it

        # C: SIGKILL inside ModelRegistry.stage (files moved in, not yet renamed).
        pause = {"debug_pause_seconds": 60}
        with trainer(debug_pause_point="publish_staging", **pause) as svc:
            # The start-up recovered B: run failed, orphan killed.
            runs = {r["run_id"]: r for r in journal(state_dir)}
            assert runs[run_b]["state"] == "failed"
            assert runs[run_b]["message"] == "interrupted while training (trainer restarted)"
            wait_for(lambda: not process_alive(orphan), 10, "orphan to die")
            run_c = trigger(svc)
            wait_for(
                lambda: any(registry.staging_dir.glob("*/weights.bin")), what="a staged version"
            )
            svc.kill()
        assert registry.versions() == [first] and registry.current() == first
        assert any(registry.staging_dir.iterdir())  # the kill did land mid-stage

        # D: SIGKILL after the rename, before CURRENT flips.
        with trainer(debug_pause_point="publish_renamed", **pause) as svc:
            runs = {r["run_id"]: r for r in journal(state_dir)}
            assert runs[run_c]["state"] == "failed"
            assert runs[run_c]["message"] == "interrupted while publishing; nothing was published"
            assert list(registry.staging_dir.iterdir()) == []
            run_d = trigger(svc)
            wait_for(lambda: len(registry.versions()) == 2, what="the renamed version")
            svc.kill()
        second = registry.versions()[-1]
        assert registry.current() == first  # complete but not current yet

        # E: the next start finishes the publication the gate had passed.
        with trainer() as svc:
            runs = {r["run_id"]: r for r in journal(state_dir)}
            assert runs[run_d]["state"] == "published"
            assert registry.current() == second
            assert registry.manifest(second)["trainer"]["run_id"] == run_d
            reply = stub(svc).Rollback(trainer_pb2.RollbackRequest(), timeout=10)
            assert (reply.current_version, reply.previous_version) == (first, second)
            assert registry.current() == first
        assert not any(
            f"{RUN_ENV}=".encode() in p.read_bytes()
            for p in Path("/proc").glob("[0-9]*/environ")
            if _readable(p)
        )

    assert watcher.checks > 100
    assert watcher.violations == []


def _readable(path: Path) -> bool:
    try:
        path.read_bytes()
    except OSError:
        return False
    return True

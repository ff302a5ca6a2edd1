"""Retraining runs end to end with a stand-in training command (a real subprocess):
publish, gate, fail loudly, prune, roll back, recover after a crash."""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from services.common.errors import FailedPrecondition, InvalidArgument, NotFound
from services.common.registry import ModelRegistry
from services.trainer import metrics
from services.trainer.data.synthetic import generate
from services.trainer.event_log import EventLog
from services.trainer.retrain import Retrainer, RunRecord
from services.trainer.settings import TrainerSettings
from services.trainer.training_set import InitialData, initial_from_dataset

pytestmark = pytest.mark.integration

FAKE = "{python} -m tests.unit.trainer_service.fake_trainer --data {data} --registry {registry} --tag {run_id} --workers {workers}"


@pytest.fixture(scope="module")
def initial() -> InitialData:
    return initial_from_dataset(generate())


def make(tmp_path: Path, initial: InitialData, extra: str = "", **settings: Any) -> Retrainer:
    options: dict[str, Any] = {
        "log_dir": str(tmp_path / "state"),
        "registry_dir": str(tmp_path / "registry"),
        "train_command": f"{FAKE} {extra}".strip(),
        "keep_versions": 3,
        **settings,
    }
    config = TrainerSettings(**options)
    config.validate()
    log = EventLog(tmp_path / "state" / "events.sqlite")
    retrainer = Retrainer(config, log, ModelRegistry(tmp_path / "registry"), initial=initial)
    retrainer.recover()
    return retrainer


def with_command(retrainer: Retrainer, extra: str) -> Retrainer:
    retrainer.settings = TrainerSettings(
        **{**retrainer.settings.__dict__, "train_command": f"{FAKE} {extra}".strip()}
    )
    return retrainer


def outcome_count(outcome: str) -> float:
    value: float = metrics.RUNS.labels(outcome)._value.get()
    return value


def test_publish_gate_prune_and_rollback(tmp_path: Path, initial: InitialData) -> None:
    retrainer = make(tmp_path, initial)
    registry = retrainer.registry
    published_before = outcome_count("published")

    first = retrainer.run("first")
    assert first.state == "published", first.message
    assert registry.current() == first.published_version
    manifest = registry.manifest(first.published_version)
    assert manifest["trainer"]["run_id"] == first.run_id
    assert manifest["trainer"]["training_rows"] > 0
    assert (registry.path(first.published_version) / "popularity.json").is_file()
    assert first.candidate_metrics["recall_at_20"] > 0.0
    assert outcome_count("published") == published_before + 1

    # A clearly worse candidate is gated: it never enters the registry.
    worse = with_command(retrainer, "--mode inverse").run("worse")
    assert worse.state == "gated", worse.message
    assert worse.candidate_metrics["recall_at_20"] < worse.current_metrics["recall_at_20"]
    assert registry.versions() == [first.published_version]
    assert registry.current() == first.published_version
    gauge = metrics.EVALUATION_RECALL.labels("candidate")._value.get()
    assert gauge == pytest.approx(worse.candidate_metrics["recall_at_20"])

    # An equally good one passes the gate (>= current * (1 - threshold)).
    versions = [first.published_version]
    with_command(retrainer, "")
    for n in range(3):
        again = retrainer.run(f"again {n}")
        assert again.state == "published", again.message
        versions.append(again.published_version)
    # keep_versions = 3: the oldest went; the journal tells the story.
    assert registry.versions() == versions[-3:]
    assert [r.state for r in retrainer.runs()] == ["published", "gated", *["published"] * 3]
    journal = json.loads((tmp_path / "state" / "runs.json").read_text())
    assert [r["run_id"] for r in journal["runs"]] == [r.run_id for r in retrainer.runs()]
    # Work folders are gone; the training log stays.
    run_dir = tmp_path / "state" / "runs" / first.run_id
    assert not (run_dir / "data").exists() and not (run_dir / "candidates").exists()
    assert "fake trainer" in (run_dir / "train.log").read_text()

    current, previous = retrainer.rollback("")
    assert (current, previous) == (versions[-2], versions[-1])
    assert registry.current() == versions[-2]
    assert retrainer.rollback(versions[-1]) == (versions[-1], versions[-2])
    with pytest.raises(NotFound):
        retrainer.rollback(versions[0])  # pruned
    with pytest.raises(InvalidArgument):
        retrainer.rollback("../../etc")
    retrainer.rollback(versions[-3])
    with pytest.raises(FailedPrecondition, match="no earlier version"):
        retrainer.rollback("")


def assert_failed_and_unchanged(
    retrainer: Retrainer, record: RunRecord, before: list[str], message: str
) -> None:
    assert record.state == "failed"
    assert message in record.message, record.message
    assert retrainer.registry.versions() == before
    assert retrainer.registry.current() == (before[-1] if before else None)
    staging = retrainer.registry.staging_dir
    assert not staging.is_dir() or list(staging.iterdir()) == []


def test_failing_training_fails_loudly(
    tmp_path: Path, initial: InitialData, caplog: pytest.LogCaptureFixture
) -> None:
    retrainer = make(tmp_path, initial, "--fail")
    failed_before = outcome_count("failed")
    record = retrainer.run("doomed")
    assert_failed_and_unchanged(retrainer, record, [], "training exited with 3")
    assert "failing on purpose" in record.message
    assert outcome_count("failed") == failed_before + 1
    assert any("run failed" in r.getMessage() for r in caplog.records)


def test_training_timeout_kills_the_command(tmp_path: Path, initial: InitialData) -> None:
    retrainer = make(tmp_path, initial, "--sleep 60", train_timeout_seconds=1.0)
    record = retrainer.run("slow")
    assert_failed_and_unchanged(retrainer, record, [], "train_timeout_seconds")
    assert record.pid == 0


def test_unwritable_registry_fails_the_run_and_keeps_the_current_version(
    tmp_path: Path, initial: InitialData
) -> None:
    retrainer = make(tmp_path, initial)
    good = retrainer.run("good")
    assert good.state == "published"
    before = retrainer.registry.versions()
    shutil.rmtree(retrainer.registry.staging_dir, ignore_errors=True)
    retrainer.registry.staging_dir.write_text("not a folder")  # mkdir of staging fails
    record = retrainer.run("blocked")
    assert_failed_and_unchanged(retrainer, record, before, "writing the registry failed")
    retrainer.registry.staging_dir.unlink()


def test_disk_full_while_publishing_keeps_the_current_version(
    tmp_path: Path, initial: InitialData, monkeypatch: pytest.MonkeyPatch
) -> None:
    retrainer = make(tmp_path, initial)
    assert retrainer.run("good").state == "published"
    before = retrainer.registry.versions()

    def full(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("services.trainer.retrain.shutil.move", full)
    record = retrainer.run("full disk")
    assert_failed_and_unchanged(retrainer, record, before, "No space left on device")


def test_failed_current_flip_removes_the_new_version(
    tmp_path: Path, initial: InitialData, monkeypatch: pytest.MonkeyPatch
) -> None:
    retrainer = make(tmp_path, initial)
    assert retrainer.run("good").state == "published"
    before = retrainer.registry.versions()

    def full(version: str) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(retrainer.registry, "set_current", full)
    record = retrainer.run("flip fails")
    assert_failed_and_unchanged(retrainer, record, before, "flipping CURRENT failed")


def test_recovery_rolls_an_interrupted_publication_forward(
    tmp_path: Path, initial: InitialData
) -> None:
    retrainer = make(tmp_path, initial)
    first = retrainer.run("first")
    registry = retrainer.registry
    # What a kill between the rename and the CURRENT flip leaves behind:
    staged: dict[str, Any] = {"trainer": {"run_id": "r-interrupted"}}
    with registry.stage(staged) as folder:
        (folder / "weights.bin").write_bytes(b"x")
    (registry.staging_dir / "half-written").mkdir()
    journal = json.loads((tmp_path / "state" / "runs.json").read_text())
    journal["runs"] += [
        {"run_id": "r-interrupted", "reason": "x", "state": "publishing"},
        {"run_id": "r-lost", "reason": "x", "state": "publishing"},
        {"run_id": "r-training", "reason": "x", "state": "training", "pid": 999_999},
    ]
    (tmp_path / "state" / "runs.json").write_text(json.dumps(journal))

    again = Retrainer(retrainer.settings, retrainer.event_log, registry, initial=initial)
    again.recover()
    states = {r.run_id: (r.state, r.message) for r in again.runs()}
    assert states["r-interrupted"][0] == "published"
    assert states["r-lost"] == ("failed", "interrupted while publishing; nothing was published")
    assert states["r-training"] == ("failed", "interrupted while training (trainer restarted)")
    assert registry.current() == staged["version"]
    assert registry.versions() == [first.published_version, staged["version"]]
    assert list(registry.staging_dir.iterdir()) == []

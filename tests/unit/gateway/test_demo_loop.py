"""The demo's retraining loop against stand-in stubs: what it prints and returns
for each verdict, and that it asks for a run only when none starts by itself."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from coldstart.v1 import common_pb2, gateway_pb2, trainer_pb2

from services.gateway.demo import DEMO_INTERESTS, Demo


class FakeGateway:
    def __init__(self, version: str = "v1") -> None:
        self.version = version
        self.liked = 0
        self.users = 0

    def RegisterUser(self, request: Any, **_: Any) -> gateway_pb2.RegisterUserResponse:
        self.users += 1
        return gateway_pb2.RegisterUserResponse(user_id=f"demo-{self.users}")

    def Recommend(self, request: Any, **_: Any) -> gateway_pb2.GatewayRecommendResponse:
        assert request.include_display
        items = [
            common_pb2.ScoredItem(
                item_id=f"i{n}", score=1.0, display=common_pb2.ItemDisplay(title=f"Item {n}")
            )
            for n in range(request.k)
        ]
        return gateway_pb2.GatewayRecommendResponse(items=items, model_version=self.version)

    def RecordInteractions(self, request: Any, **_: Any) -> None:
        self.liked += len(request.interactions)

    def GetModelInfo(self, request: Any, **_: Any) -> common_pb2.ModelInfo:
        return common_pb2.ModelInfo(version=self.version)


class FakeTrainer:
    """Answers GetStatus from a script of (events_applied, run) steps, the last one forever."""

    def __init__(self, gateway: FakeGateway, steps: list[tuple[int, trainer_pb2.TrainingRun]]):
        self.gateway = gateway
        self.steps: Iterator[tuple[int, trainer_pb2.TrainingRun]] = iter(steps)
        self.last = steps[0]
        self.triggered: list[str] = []

    def GetStatus(self, request: Any, **_: Any) -> trainer_pb2.TrainerStatus:
        self.last = next(self.steps, self.last)
        applied, run = self.last
        if run.state == "published":
            self.gateway.version = run.published_version  # fusion swaps
        return trainer_pb2.TrainerStatus(
            events_applied=applied,
            last_run=run,
            current_model=common_pb2.ModelInfo(version="v1"),
        )

    def TriggerRetrain(self, request: Any, **_: Any) -> trainer_pb2.TriggerRetrainResponse:
        self.triggered.append(request.reason)
        self.steps = iter(
            [(self.last[0], run("r2", "training")), (self.last[0], run("r2", "gated"))]
        )
        return trainer_pb2.TriggerRetrainResponse(run_id="r2", started=True)


def run(run_id: str, state: str, **extra: Any) -> trainer_pb2.TrainingRun:
    return trainer_pb2.TrainingRun(run_id=run_id, state=state, **extra)


@pytest.fixture(autouse=True)
def no_sleep(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("services.gateway.demo.time.sleep", lambda _s: None)


def test_a_published_run_is_followed_to_fusion_and_a_recommend() -> None:
    gateway = FakeGateway()
    burst = len(DEMO_INTERESTS) * 4
    old = run("r0", "published", published_version="v1")
    trainer = FakeTrainer(
        gateway,
        [
            (10, old),
            (10 + burst, run("r1", "exporting", reason=f"{burst} new events")),
            (10 + burst, run("r1", "training")),
            (10 + burst, run("r1", "published", published_version="v2", message="recall ok")),
        ],
    )
    lines: list[str] = []
    outcome = Demo(gateway, "t", 5, lines.append).retrain_loop(trainer, per_user=4)  # type: ignore[arg-type]
    assert gateway.liked == outcome.interactions == burst
    assert (outcome.state, outcome.previous_version, outcome.published_version) == (
        "published",
        "v1",
        "v2",
    )
    assert outcome.served_version == "v2"
    assert not trainer.triggered
    steps = [what for _, what in outcome.timeline]
    assert steps[0] == f"{burst} interactions acknowledged by Kafka (gateway RecordInteractions)"
    assert f"run r1 started ({burst} new events)" in steps
    assert "run training" in steps
    assert any(s.startswith("gate passed, published v2: recall ok") for s in steps)
    assert any("Item 0" in line for line in lines)  # the new version's list shows titles


def test_without_a_trigger_it_asks_for_a_run_and_reports_the_gate() -> None:
    gateway = FakeGateway()
    idle = run("r0", "published", published_version="v1")
    trainer = FakeTrainer(gateway, [(0, idle), (len(DEMO_INTERESTS) * 2, idle)])
    outcome = Demo(gateway, "t", 5, lambda _line: None).retrain_loop(  # type: ignore[arg-type]
        trainer,  # type: ignore[arg-type]
        per_user=2,
        wait_for_trigger_s=0.0,
    )
    assert trainer.triggered == ["coldstart demo"]
    assert outcome.state == "gated"
    assert outcome.published_version == outcome.served_version == ""
    steps = [what for _, what in outcome.timeline]
    assert any(s.startswith("no run started by itself: asked for one (r2)") for s in steps)
    assert any(s.startswith("the gate kept v1") for s in steps)


def test_no_verdict_in_time_is_reported_not_hung() -> None:
    gateway = FakeGateway()
    stuck = run("r0", "published", published_version="v1")
    trainer = FakeTrainer(gateway, [(0, stuck), (100, run("r1", "training"))])
    outcome = Demo(gateway, "t", 5, lambda _line: None).retrain_loop(  # type: ignore[arg-type]
        trainer,  # type: ignore[arg-type]
        per_user=1,
        timeout_s=0.05,
    )
    assert outcome.state == ""
    assert outcome.timeline[-1][1].startswith("no verdict within 0.05s (run r1)")

"""The whole system: encoder, fusion, trainer and gateway each in its own
process over real sockets, with the real broker and a real trained model."""

from __future__ import annotations

import contextlib
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from coldstart.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc

from services.common.kafka.local_broker import Topic, create_topics
from services.common.metrics import free_port
from services.up import ensure_models, registry_dirs
from tests.support.processes import ServiceProcess, running_service

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TOPIC = "e2e.events"
AUTH = (("authorization", "Bearer e2e-token"),)


@dataclass
class System:
    gateway: gateway_pb2_grpc.GatewayServiceStub
    services: dict[str, ServiceProcess]
    settings: dict[str, dict[str, object]]
    log_dir: Path


@pytest.fixture(scope="module")
def system(kafka_broker: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[System]:
    # The first models are made once (cached under .run/ like `make up`) and
    # copied, so the services here cannot change the repository's registry.
    ensure_models("synthetic", retrain=False)
    home = tmp_path_factory.mktemp("home")
    encoder_registry, model_registry = home / "encoder", home / "recommender"
    shutil.copytree(registry_dirs()[0], encoder_registry)
    shutil.copytree(registry_dirs()[1], model_registry)
    create_topics(kafka_broker, (Topic(TOPIC, 3),))
    log_dir = tmp_path_factory.mktemp("logs")
    ports = {name: free_port() for name in ("encoder", "fusion", "trainer", "gateway")}
    settings: dict[str, dict[str, object]] = {
        "encoder": {"registry_dir": encoder_registry},
        "fusion": {
            "registry_dir": model_registry,
            "kafka_bootstrap": kafka_broker,
            "events_topic": TOPIC,
            "encoder_address": f"127.0.0.1:{ports['encoder']}",
            "snapshot_dir": home / "fusion",
        },
        "trainer": {
            "registry_dir": model_registry,
            "kafka_bootstrap": kafka_broker,
            "events_topic": TOPIC,
            "log_dir": home / "trainer",
            "group_id": "e2e-trainer",
            # The main job's loop: base data and a trigger a demo burst sets off. The
            # gate is lenient here: its verdicts are tested in test_trainer_retrain,
            # this test follows a published version to fusion.
            "initial_data": "synthetic",
            "retrain_every_events": 100,
            "gate_threshold": 0.5,
        },
        "gateway": {
            "kafka_bootstrap": kafka_broker,
            "events_topic": TOPIC,
            "fusion_address": f"127.0.0.1:{ports['fusion']}",
            "encoder_address": f"127.0.0.1:{ports['encoder']}",
            "registry_dir": model_registry,
            "auth_tokens": "e2e:e2e-token",
            "downstream_timeout_s": 1.0,
        },
    }
    with contextlib.ExitStack() as stack:
        services = {
            name: stack.enter_context(
                running_service(name, log_dir, settings[name], port=ports[name], timeout_s=180)
            )
            for name in ("encoder", "fusion", "trainer", "gateway")
        }
        channel = stack.enter_context(grpc.insecure_channel(services["gateway"].address))
        yield System(gateway_pb2_grpc.GatewayServiceStub(channel), services, settings, log_dir)


def recommend(system: System, user_id: str, k: int = 10) -> gateway_pb2.GatewayRecommendResponse:
    reply: gateway_pb2.GatewayRecommendResponse = system.gateway.Recommend(
        gateway_pb2.GatewayRecommendRequest(user_id=user_id, k=k), metadata=AUTH, timeout=5
    )
    return reply


def wait_for(condition: object, timeout_s: float) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        if condition():  # type: ignore[operator]
            return time.monotonic() - started
        time.sleep(0.05)
    raise AssertionError(f"condition not met within {timeout_s}s")


def test_new_user_gets_recommendations_that_follow_an_interaction(system: System) -> None:
    user = system.gateway.RegisterUser(
        gateway_pb2.RegisterUserRequest(
            attributes={"age_band": "25-34"}, interest_text="space robots"
        ),
        metadata=AUTH,
        timeout=10,
    )
    wait_for(lambda: not recommend(system, user.user_id).new_user, 5.0)
    before = recommend(system, user.user_id)
    assert len(before.items) == 10
    assert not before.degraded
    assert all(item.reason for item in before.items)
    liked = before.items[0].item_id
    system.gateway.RecordInteractions(
        gateway_pb2.RecordInteractionsRequest(
            interactions=[
                gateway_pb2.InteractionRecord(user_id=user.user_id, item_id=liked, kind="like")
            ]
        ),
        metadata=AUTH,
        timeout=10,
    )
    acked = time.monotonic()
    # The liked item is excluded from then on (it is in the user's history) and the list changes.
    wait_for(
        lambda: (
            [i.item_id for i in recommend(system, user.user_id).items]
            != [i.item_id for i in before.items]
        ),
        1.0,
    )
    assert time.monotonic() - acked < 1.5


def test_a_new_item_is_recommended(system: System) -> None:
    system.gateway.UpsertItems(
        gateway_pb2.GatewayUpsertItemsRequest(
            items=[
                gateway_pb2.ItemInput(
                    item_id="e2e-new-item",
                    text="Deep Ocean Lullabies (2026) | Documentary",
                    attributes={"collection": "e2e-fresh"},
                )
            ]
        ),
        metadata=AUTH,
        timeout=10,
    )
    only_new = common_pb2.ItemFilters(attribute_equals={"collection": "e2e-fresh"})
    reply = system.gateway.Recommend(
        gateway_pb2.GatewayRecommendRequest(user_id="someone-new", k=5, filters=only_new),
        metadata=AUTH,
        timeout=5,
    )
    assert [i.item_id for i in reply.items] == ["e2e-new-item"]
    # Its content vector is in the index: it has neighbours at once.
    similar = system.gateway.SimilarItems(
        gateway_pb2.GatewaySimilarItemsRequest(item_id="e2e-new-item", k=5),
        metadata=AUTH,
        timeout=5,
    )
    assert len(similar.items) == 5
    assert "e2e-new-item" not in [i.item_id for i in similar.items]


def test_a_forgotten_user_is_gone_from_the_online_state(system: System) -> None:
    user = system.gateway.RegisterUser(
        gateway_pb2.RegisterUserRequest(attributes={"gender": "F"}), metadata=AUTH, timeout=10
    )
    wait_for(lambda: not recommend(system, user.user_id).new_user, 5.0)
    system.gateway.ForgetUser(
        gateway_pb2.ForgetUserRequest(user_id=user.user_id), metadata=AUTH, timeout=10
    )
    wait_for(lambda: recommend(system, user.user_id).new_user, 5.0)


@pytest.mark.parametrize(
    ("request_", "code", "message"),
    [
        (
            gateway_pb2.GatewayRecommendRequest(user_id="u1", k=0),
            grpc.StatusCode.INVALID_ARGUMENT,
            "k: must be 1..1000",
        ),
        (
            gateway_pb2.GatewayRecommendRequest(user_id="u1", k=1001),
            grpc.StatusCode.INVALID_ARGUMENT,
            "k: must be 1..1000",
        ),
        (
            gateway_pb2.GatewaySimilarItemsRequest(item_id="", k=5),
            grpc.StatusCode.INVALID_ARGUMENT,
            "item_id: must not be empty",
        ),
        (
            gateway_pb2.GatewaySimilarItemsRequest(item_id="no-such-item", k=5),
            grpc.StatusCode.NOT_FOUND,
            "item_id",
        ),
    ],
)
def test_bad_input_gets_its_documented_status(
    system: System, request_: object, code: grpc.StatusCode, message: str
) -> None:
    with pytest.raises(grpc.RpcError) as raised:
        if isinstance(request_, gateway_pb2.GatewayRecommendRequest):
            system.gateway.Recommend(request_, metadata=AUTH, timeout=5)
        else:
            assert isinstance(request_, gateway_pb2.GatewaySimilarItemsRequest)
            system.gateway.SimilarItems(request_, metadata=AUTH, timeout=5)
    assert raised.value.code() == code
    assert message in (raised.value.details() or "")


def test_display_fields_come_on_request(system: System) -> None:
    plain = recommend(system, "someone-curious", k=3)
    assert not any(item.HasField("display") for item in plain.items)
    shown = system.gateway.Recommend(
        gateway_pb2.GatewayRecommendRequest(user_id="someone-curious", k=3, include_display=True),
        metadata=AUTH,
        timeout=5,
    )
    # The embedded catalog's titles, e.g. "The Rocket and the Moon", and its attributes.
    assert all(item.display.title and " | " not in item.display.title for item in shown.items)
    assert all("category" in item.display.attributes for item in shown.items)
    similar = system.gateway.SimilarItems(
        gateway_pb2.GatewaySimilarItemsRequest(
            item_id=shown.items[0].item_id, k=3, include_display=True
        ),
        metadata=AUTH,
        timeout=5,
    )
    assert all(item.display.title for item in similar.items)


def test_the_demo_loop_retrains_publishes_and_serves(system: System) -> None:
    from coldstart.v1 import trainer_pb2_grpc

    from services.gateway.demo import Demo

    lines: list[str] = []
    with grpc.insecure_channel(system.services["trainer"].address) as channel:
        demo = Demo(system.gateway, "e2e-token", 5, lines.append)
        outcome = demo.retrain_loop(
            trainer_pb2_grpc.TrainerServiceStub(channel), per_user=15, timeout_s=300
        )
    report = "\n".join(lines)
    assert outcome.state == "published", report
    # The burst (8 users x 15 likes) set the trainer's own trigger off: nobody asked.
    assert not any("asked for one" in what for _, what in outcome.timeline), report
    assert outcome.published_version and outcome.published_version != outcome.previous_version
    assert outcome.served_version == outcome.published_version, report
    steps = [what for _, what in outcome.timeline]
    assert any(s.startswith("trainer logged them") for s in steps), report
    assert any(s.startswith("fusion swapped to " + outcome.published_version) for s in steps)
    seconds = [at for at, _ in outcome.timeline]
    assert seconds == sorted(seconds)


def test_fusion_down_degrades_then_recovers(system: System) -> None:
    fusion = system.services["fusion"]
    fusion.kill()
    reply = recommend(system, "u-degraded", k=5)
    assert reply.degraded
    assert len(reply.items) == 5
    with running_service(
        "fusion", system.log_dir, system.settings["fusion"], port=fusion.port, timeout_s=180
    ) as again:
        system.services["fusion"] = again
        wait_for(lambda: not recommend(system, "u-degraded", k=5).degraded, 10.0)

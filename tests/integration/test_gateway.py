"""The gateway as a real process with a real broker; fusion and encoder are
absent here (their outage is part of what is tested); the end-to-end suite
runs all four services together."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from coldstart.v1 import events_pb2, gateway_pb2, gateway_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from kafka import KafkaConsumer, TopicPartition

from services.common.events import decode_event
from services.common.kafka.local_broker import Topic, create_topics
from services.common.metrics import free_port
from services.common.registry import ModelRegistry
from tests.support.certs import make_certs
from tests.support.processes import ServiceProcess, running_service

pytestmark = pytest.mark.integration

TOPIC = "gateway-test.events"
TOKEN = (("authorization", "Bearer s3cret"),)


def write_fallback_model(root: Path) -> str:
    """A registry version with just what the fallback reads."""
    registry = ModelRegistry(root)
    manifest: dict[str, object] = {"kind": "test-fallback"}
    with registry.stage(manifest) as folder:
        (folder / "item_ids.json").write_text(json.dumps(["m1", "m2", "m3"]))
        np.save(folder / "popularity.npy", np.array([3.0, 30.0, 10.0]))
        records = [
            {"text": f"Film {n} | drama", "attributes": {"genre": "drama"}} for n in (1, 2, 3)
        ]
        (folder / "items.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    registry.set_current(str(manifest["version"]))
    return str(manifest["version"])


@pytest.fixture(scope="module")
def gateway(
    kafka_broker: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServiceProcess]:
    create_topics(kafka_broker, (Topic(TOPIC, 2),))
    registry = tmp_path_factory.mktemp("registry")
    write_fallback_model(registry)
    dead = free_port()  # nothing listens here: fusion and encoder are "down"
    settings = {
        "kafka_bootstrap": kafka_broker,
        "events_topic": TOPIC,
        "fusion_address": f"127.0.0.1:{dead}",
        "encoder_address": f"127.0.0.1:{dead}",
        "registry_dir": registry,
        "auth_tokens": "shop:s3cret,limited:l1m1t",
        "max_receive_message_bytes": 64 * 1024,
        "downstream_timeout_s": 0.5,
    }
    with running_service("gateway", tmp_path_factory.mktemp("logs"), settings) as service:
        yield service


def stub(service: ServiceProcess) -> tuple[grpc.Channel, gateway_pb2_grpc.GatewayServiceStub]:
    channel = grpc.insecure_channel(service.address)
    return channel, gateway_pb2_grpc.GatewayServiceStub(channel)


def topic_events(bootstrap: str) -> list[events_pb2.Event]:
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    partitions = [TopicPartition(TOPIC, p) for p in range(2)]
    consumer.assign(partitions)
    consumer.seek_to_beginning()
    end = consumer.end_offsets(partitions)
    events: list[events_pb2.Event] = []
    deadline = time.monotonic() + 20
    while any(consumer.position(tp) < end[tp] for tp in partitions) and time.monotonic() < deadline:
        for records in consumer.poll(timeout_ms=200).values():
            events += [decode_event(r.value) for r in records]
    consumer.close()
    return events


def test_calls_need_a_known_bearer_token_but_health_does_not(gateway: ServiceProcess) -> None:
    channel, gw = stub(gateway)
    with channel:
        no_token: tuple[tuple[str, str], ...] = ()
        for metadata in (
            no_token,
            (("authorization", "Bearer wrong"),),
            (("authorization", "Basic s3cret"),),
        ):
            with pytest.raises(grpc.RpcError) as raised:
                gw.GetModelInfo(
                    gateway_pb2.GatewayGetModelInfoRequest(), metadata=metadata, timeout=5
                )
            assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED
        health = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=5
        )
        assert health.status == health_pb2.HealthCheckResponse.SERVING


def test_writes_reach_the_topic_once_even_when_retried(
    gateway: ServiceProcess, kafka_broker: str
) -> None:
    channel, gw = stub(gateway)
    with channel:
        registered = gw.RegisterUser(
            gateway_pb2.RegisterUserRequest(
                attributes={"gender": "F"}, interest_text="film noir", idempotency_key="reg-1"
            ),
            metadata=TOKEN,
            timeout=10,
        )
        again = gw.RegisterUser(
            gateway_pb2.RegisterUserRequest(
                attributes={"gender": "F"}, interest_text="film noir", idempotency_key="reg-1"
            ),
            metadata=TOKEN,
            timeout=10,
        )
        assert again == registered
        request = gateway_pb2.RecordInteractionsRequest(
            interactions=[
                gateway_pb2.InteractionRecord(
                    user_id=registered.user_id, item_id="m1", kind="click"
                ),
                gateway_pb2.InteractionRecord(
                    user_id=registered.user_id, item_id="m2", kind="rating", value=4.5
                ),
            ],
            idempotency_key="batch-1",
        )
        recorded = gw.RecordInteractions(request, metadata=TOKEN, timeout=10)
        assert gw.RecordInteractions(request, metadata=TOKEN, timeout=10) == recorded
    events = topic_events(kafka_broker)
    ids = [e.event_id for e in events]
    assert ids.count(registered.event_id) == 1
    assert all(ids.count(i) == 1 for i in recorded.event_ids)
    by_id = {e.event_id: e for e in events}
    registration = by_id[registered.event_id].user_registered
    assert registration.user_id == registered.user_id
    assert registration.interest_text == "film noir"  # encoder down: text travels without a vector
    assert by_id[recorded.event_ids[1]].interaction.value == pytest.approx(4.5)


def test_fusion_down_gives_degraded_popular_items(gateway: ServiceProcess) -> None:
    channel, gw = stub(gateway)
    with channel:
        reply = gw.Recommend(
            gateway_pb2.GatewayRecommendRequest(user_id="u1", k=2), metadata=TOKEN, timeout=5
        )
        shown = gw.Recommend(
            gateway_pb2.GatewayRecommendRequest(user_id="u1", k=2, include_display=True),
            metadata=TOKEN,
            timeout=5,
        )
    assert reply.degraded
    assert [i.item_id for i in reply.items] == ["m2", "m3"]
    assert not any(i.HasField("display") for i in reply.items)  # display fields on request only
    assert [(i.display.title, dict(i.display.attributes)) for i in shown.items] == [
        ("Film 2", {"genre": "drama"}),
        ("Film 3", {"genre": "drama"}),
    ]


@pytest.mark.parametrize(
    ("request_", "code", "field"),
    [
        (
            gateway_pb2.GatewayRecommendRequest(user_id="u1", k=0),
            grpc.StatusCode.INVALID_ARGUMENT,
            "k: must be 1..1000",
        ),
        (
            gateway_pb2.GatewayRecommendRequest(k=3),
            grpc.StatusCode.INVALID_ARGUMENT,
            "who: set user_id or anonymous",
        ),
        (
            gateway_pb2.GatewayRecommendRequest(
                anonymous=gateway_pb2.AnonymousProfile(interest_text="x" * 20_000), k=3
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "anonymous.interest_text: must be at most 8192 bytes",
        ),
        (
            gateway_pb2.GatewayRecommendRequest(
                anonymous=gateway_pb2.AnonymousProfile(interest_text="x" * 70_000), k=3
            ),
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "",
        ),
    ],
)
def test_bad_requests_get_their_documented_codes(
    gateway: ServiceProcess,
    request_: gateway_pb2.GatewayRecommendRequest,
    code: grpc.StatusCode,
    field: str,
) -> None:
    channel, gw = stub(gateway)
    with channel, pytest.raises(grpc.RpcError) as raised:
        gw.Recommend(request_, metadata=TOKEN, timeout=5)
    assert raised.value.code() == code
    assert field in (raised.value.details() or "")


def test_bad_write_input_names_the_field(gateway: ServiceProcess) -> None:
    channel, gw = stub(gateway)
    with channel, pytest.raises(grpc.RpcError) as raised:
        gw.RecordInteractions(
            gateway_pb2.RecordInteractionsRequest(
                interactions=[gateway_pb2.InteractionRecord(user_id="u1")]
            ),
            metadata=TOKEN,
            timeout=5,
        )
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "interactions[0].item_id" in (raised.value.details() or "")


def test_rate_limit_answers_resource_exhausted(kafka_broker: str, tmp_path: Path) -> None:
    settings = {
        "kafka_bootstrap": kafka_broker,
        "auth_tokens": "shop:s3cret",
        "rate_limit_per_second": 1,
        "rate_limit_burst": 3,
        "fusion_address": f"127.0.0.1:{free_port()}",
        "registry_dir": tmp_path / "empty-registry",
    }
    with running_service("gateway", tmp_path, settings) as service:
        channel, gw = stub(service)
        codes = []
        with channel:
            for _ in range(6):
                try:
                    gw.Recommend(
                        gateway_pb2.GatewayRecommendRequest(user_id="u1", k=1),
                        metadata=TOKEN,
                        timeout=5,
                    )
                    codes.append(grpc.StatusCode.OK)
                except grpc.RpcError as exc:
                    codes.append(exc.code())
    assert codes[:3] != [grpc.StatusCode.RESOURCE_EXHAUSTED] * 3
    assert grpc.StatusCode.RESOURCE_EXHAUSTED in codes[3:]


def test_broker_down_makes_writes_unavailable(tmp_path: Path) -> None:
    settings = {"kafka_bootstrap": f"127.0.0.1:{free_port()}", "produce_timeout_s": 2}
    with running_service("gateway", tmp_path, settings) as service:
        channel, gw = stub(service)
        with channel, pytest.raises(grpc.RpcError) as raised:
            gw.ForgetUser(gateway_pb2.ForgetUserRequest(user_id="u1"), timeout=20)
    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE


def test_mutual_tls(kafka_broker: str, tmp_path: Path) -> None:
    certs = make_certs(tmp_path / "certs")
    settings = {
        "kafka_bootstrap": kafka_broker,
        "tls_cert_file": certs.server_cert,
        "tls_key_file": certs.server_key,
        "tls_client_ca_file": certs.ca,
        "fusion_address": f"127.0.0.1:{free_port()}",
        "registry_dir": tmp_path / "empty-registry",
    }
    with_client_cert = grpc.ssl_channel_credentials(
        certs.ca.read_bytes(), certs.client_key.read_bytes(), certs.client_cert.read_bytes()
    )
    with running_service("gateway", tmp_path, settings, credentials=with_client_cert) as service:
        with grpc.secure_channel(service.address, with_client_cert) as channel:
            health = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=5
            )
            assert health.status == health_pb2.HealthCheckResponse.SERVING
        without = grpc.ssl_channel_credentials(certs.ca.read_bytes())
        with (
            grpc.secure_channel(service.address, without) as channel,
            pytest.raises(grpc.RpcError) as raised,
        ):
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
        with grpc.insecure_channel(service.address) as channel, pytest.raises(grpc.RpcError):
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)

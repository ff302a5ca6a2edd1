"""Calling a fusion server under test: one channel per test block, a deadline on
every call."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import grpc
from coldstart.v1 import common_pb2, events_pb2, fusion_pb2, fusion_pb2_grpc

from tests.support.processes import ServiceProcess


@contextlib.contextmanager
def stub_for(service: ServiceProcess) -> Iterator[fusion_pb2_grpc.FusionServiceStub]:
    with grpc.insecure_channel(service.address) as channel:
        yield fusion_pb2_grpc.FusionServiceStub(channel)


def recommend(
    stub: fusion_pb2_grpc.FusionServiceStub, user_id: str, k: int = 10, timeout_s: float = 10.0
) -> fusion_pb2.RecommendResponse:
    request = fusion_pb2.RecommendRequest(user=common_pb2.UserContext(user_id=user_id), k=k)
    reply: fusion_pb2.RecommendResponse = stub.Recommend(request, timeout=timeout_s)
    return reply


def produce(bootstrap: str, topic: str, *events: events_pb2.Event) -> None:
    """A plain kafka-python producer (nothing of ours between it and the broker), keyed
    by user as the gateway keys events."""
    from kafka import KafkaProducer

    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)
    try:
        for event in events:
            key = event.interaction.user_id or event.user_forgotten.user_id
            producer.send(topic, key=key.encode(), value=event.SerializeToString())
        producer.flush(timeout=10)
    finally:
        producer.close()

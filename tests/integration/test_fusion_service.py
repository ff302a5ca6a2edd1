"""The fusion service as a real process: events from Kafka, restarts from a
snapshot, hot swaps under load, bad input and bad models."""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from coldstart.v1 import common_pb2, events_pb2, fusion_pb2, fusion_pb2_grpc

from services.common.events import new_event
from services.common.kafka.local_broker import Topic, create_topics
from services.common.paths import REPO_ROOT
from services.common.registry import ModelRegistry
from services.fusion.online_state import SNAPSHOT_FILE, UserStore, read_snapshot
from services.fusion.synthetic import publish_version
from tests.support.fusion_client import produce, recommend, stub_for
from tests.support.processes import ServiceProcess, coldstart_command, running_service

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def base_registry(tmp_path_factory: pytest.TempPathFactory) -> ModelRegistry:
    registry = ModelRegistry(tmp_path_factory.mktemp("fusion-registry"))
    publish_version(registry, n_items=1_000, seed=0)
    return registry


@pytest.fixture()
def registry(tmp_path: Path, base_registry: ModelRegistry) -> ModelRegistry:
    """A private copy, so swaps in one test do not leak into another."""
    target = tmp_path / "registry"
    shutil.copytree(base_registry.root, target)
    return ModelRegistry(target)


def metric(service: ServiceProcess, line_start: str) -> float | None:
    body = (
        urllib.request.urlopen(f"http://127.0.0.1:{service.metrics_port}/metrics", timeout=5)
        .read()
        .decode()
    )
    for line in body.splitlines():
        if line.startswith(line_start):
            return float(line.rsplit(" ", 1)[1])
    return None


def interaction(user: str, item: str) -> events_pb2.Event:
    return new_event(
        "test",
        interaction=events_pb2.Interaction(user_id=user, item_id=item, kind="click", value=1),
    )


def wait_for(condition: Callable[[], bool], timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"condition not met within {timeout_s}s")


def test_events_change_recommendations_and_a_restart_resumes_from_the_snapshot(
    tmp_path: Path, registry: ModelRegistry, kafka_broker: str
) -> None:
    topic = f"test.fusion.{uuid.uuid4().hex[:8]}"
    create_topics(kafka_broker, (Topic(topic, 3),))
    settings = {
        "registry_dir": registry.root,
        "kafka_bootstrap": kafka_broker,
        "events_topic": topic,
        "snapshot_dir": tmp_path / "snap",
        "snapshot_interval_s": 0.5,
    }
    with running_service("fusion", tmp_path, settings=settings) as fusion:
        with stub_for(fusion) as stub:
            before = recommend(stub, "alice", k=1000)
            assert before.new_user
            assert "item-5" in {i.item_id for i in before.items}

            produce(kafka_broker, topic, interaction("alice", "item-5"))

            def changed() -> bool:
                reply = recommend(stub, "alice", k=1000)
                return not reply.new_user and "item-5" not in {i.item_id for i in reply.items}

            wait_for(changed)
            top = recommend(stub, "alice")
            assert any(i.reason.startswith("similar to Item 5") for i in top.items)
        assert fusion.terminate() == 0  # graceful stop writes the final snapshot
    snapshot = read_snapshot(tmp_path / "snap" / SNAPSHOT_FILE)
    assert snapshot is not None
    assert sum(snapshot["offsets"].values()) == 1
    restored = UserStore()
    restored.restore(snapshot)
    alice = restored.get("alice")
    assert alice is not None and tuple(alice.recent_item_ids) == ("item-5",)

    # Produced while no fusion runs: the restart must pick it up, and only it.
    produce(kafka_broker, topic, interaction("alice", "item-77"))
    with (
        running_service("fusion", tmp_path, settings=settings) as fusion,
        stub_for(fusion) as stub,
    ):

        def both_seen() -> bool:
            ids = {i.item_id for i in recommend(stub, "alice", k=1000).items}
            return "item-5" not in ids and "item-77" not in ids

        wait_for(both_seen)
        applied = metric(fusion, 'coldstart_fusion_events_applied_total{kind="interaction"}')
        assert applied == 1.0  # item-5 came from the snapshot, not a replay

        produce(
            kafka_broker,
            topic,
            new_event("test", user_forgotten=events_pb2.UserForgotten(user_id="alice")),
        )
        wait_for(lambda: recommend(stub, "alice").new_user)


def test_bad_input_gets_clear_codes_and_unknown_ids_are_documented(
    tmp_path: Path, registry: ModelRegistry
) -> None:
    with (
        running_service("fusion", tmp_path, settings={"registry_dir": registry.root}) as fusion,
        stub_for(fusion) as stub,
    ):
        bad = [
            (fusion_pb2.RecommendRequest(k=0), "k: must be 1..1000"),
            (fusion_pb2.RecommendRequest(k=1001), "k: must be 1..1000"),
            (
                fusion_pb2.RecommendRequest(
                    k=5, user=common_pb2.UserContext(interest_vector=[0.1] * 3)
                ),
                "user.interest_vector: must have 16 values, got 3",
            ),
            (
                fusion_pb2.RecommendRequest(
                    k=5, user=common_pb2.UserContext(interest_vector=[float("nan")] * 16)
                ),
                "user.interest_vector: must be finite",
            ),
        ]
        for request, message in bad:
            with pytest.raises(grpc.RpcError) as raised:
                stub.Recommend(request, timeout=10)
            assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert message in (raised.value.details() or "")
        with pytest.raises(grpc.RpcError) as raised:
            stub.UpsertItems(
                fusion_pb2.UpsertItemsRequest(
                    items=[common_pb2.ItemRecord(item_id="x", content_vector=[float("inf")] * 16)]
                ),
                timeout=10,
            )
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.RpcError) as raised:
            stub.SimilarItems(fusion_pb2.SimilarItemsRequest(item_id="ghost", k=3), timeout=10)
        assert raised.value.code() == grpc.StatusCode.NOT_FOUND

        # Unknown user: served as new, not an error. Unknown exclusions: ignored.
        reply = stub.Recommend(
            fusion_pb2.RecommendRequest(
                user=common_pb2.UserContext(user_id="stranger"),
                k=5,
                exclude_item_ids=["ghost"],
            ),
            timeout=10,
        )
        assert reply.new_user and len(reply.items) == 5 and reply.model_version
        # Unknown candidates: reported, left out of the ranking.
        ranked = stub.Rank(
            fusion_pb2.RankRequest(candidate_item_ids=["item-1", "ghost", "item-2"]), timeout=10
        )
        assert list(ranked.unknown_item_ids) == ["ghost"]
        assert sorted(i.item_id for i in ranked.items) == ["item-1", "item-2"]

        # An upserted item is in the live index for the very next call.
        similar_to = stub.SimilarItems(fusion_pb2.SimilarItemsRequest(item_id="item-9", k=1))
        upsert = fusion_pb2.UpsertItemsRequest(
            items=[
                common_pb2.ItemRecord(
                    item_id="brand-new",
                    text="Brand new",
                    # item-9's own content: the new item must become its nearest neighbour.
                    content_vector=_content_of(registry, "item-9"),
                )
            ]
        )
        assert stub.UpsertItems(upsert, timeout=10).upserted == 1
        after = stub.SimilarItems(fusion_pb2.SimilarItemsRequest(item_id="item-9", k=1))
        assert after.items[0].item_id == "brand-new" != similar_to.items[0].item_id
        assert fusion.process.poll() is None


def _content_of(registry: ModelRegistry, item_id: str) -> list[float]:
    import numpy as np

    version = registry.current()
    assert version is not None
    ids = json.loads((registry.path(version) / "item_ids.json").read_text())
    content = np.load(registry.path(version) / "content_vectors.npy")
    return [float(x) for x in content[ids.index(item_id)]]


def test_swaps_under_load_fail_no_call_and_a_bad_version_keeps_the_old_one(
    tmp_path: Path, registry: ModelRegistry
) -> None:
    settings = {"registry_dir": registry.root, "swap_poll_s": 0.2, "max_workers": 16}
    with running_service("fusion", tmp_path, settings=settings) as fusion:
        errors: list[str] = []
        versions: set[str] = set()
        calls = [0]
        stop = threading.Event()

        def client(n: int) -> None:
            with grpc.insecure_channel(fusion.address) as channel:
                stub = fusion_pb2_grpc.FusionServiceStub(channel)
                request = fusion_pb2.RecommendRequest(
                    user=common_pb2.UserContext(user_id=f"u{n}", recent_item_ids=[f"item-{n}"]),
                    k=10,
                )
                while not stop.is_set():
                    try:
                        versions.add(stub.Recommend(request, timeout=10).model_version)
                        calls[0] += 1
                    except grpc.RpcError as exc:
                        errors.append(f"{exc.code()}: {exc.details()}")

        clients = [threading.Thread(target=client, args=(n,)) for n in range(8)]
        for thread in clients:
            thread.start()
        published: list[str] = []
        try:
            for seed in (1, 2, 3):
                published.append(publish_version(registry, n_items=500, seed=seed))
                wait_for(lambda: published[-1] in versions, timeout_s=30)
            bad = publish_version(registry, n_items=100, seed=9)
            (registry.path(bad) / "user_tower.onnx").write_bytes(b"\x00broken")
            wait_for(
                lambda: (
                    metric(fusion, f'coldstart_fusion_model_load_failures_total{{version="{bad}"}}')
                    == 1.0
                )
            )
            served_after_bad = calls[0]
            wait_for(lambda: calls[0] > served_after_bad + 20)
        finally:
            stop.set()
            for thread in clients:
                thread.join(timeout=30)
        assert errors == []
        assert set(published) <= versions
        assert bad not in versions
        assert metric(fusion, f'coldstart_fusion_model_info{{version="{published[-1]}"}}') == 1.0


def run_serve(args: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        coldstart_command("serve", "fusion", *args),
        check=False,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_missing_or_corrupt_model_at_start_exits_with_one_line(
    tmp_path: Path, registry: ModelRegistry
) -> None:
    empty = run_serve(["--set", f"registry_dir={tmp_path / 'empty'}", "--set", "port=0"])
    assert empty.returncode == 2
    assert "no model in registry" in empty.stderr and "coldstart train" in empty.stderr
    assert empty.stderr.strip().count("\n") == 0, empty.stderr

    version = registry.current()
    assert version is not None
    (registry.path(version) / "item_vectors.npy").write_bytes(b"garbage")
    corrupt = run_serve(["--set", f"registry_dir={registry.root}", "--set", "port=0"])
    assert corrupt.returncode == 2
    assert "item_vectors.npy" in corrupt.stderr
    assert corrupt.stderr.strip().count("\n") == 0, corrupt.stderr
    assert "Traceback" not in corrupt.stderr

"""The redis overlay: a Redis StatefulSet + Service on services/common/ports.py's
REDIS_PORT, fusion replicas reading it, a StatefulSet of writers, and settings
that load (rendering and schema validation: the TREES tests)."""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest

from services.common.ports import REDIS_PORT
from services.common.settings import load_settings
from services.fusion.settings import FusionSettings
from tests.integration.k8s.k8s_support import PORTS, Rendered, config_map, find

pytestmark = pytest.mark.integration


def fusion_env(workload: dict[str, Any]) -> dict[str, Any]:
    (container,) = workload["spec"]["template"]["spec"]["containers"]
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


def test_redis_runs_on_its_port_and_fusion_reads_it_there(rendered: Rendered) -> None:
    resources = rendered("overlays/redis")
    redis = find(resources, "StatefulSet", "coldstart-redis")
    (container,) = redis["spec"]["template"]["spec"]["containers"]
    assert [p["containerPort"] for p in container["ports"]] == [REDIS_PORT]
    service = find(resources, "Service", "coldstart-redis")
    assert [p["port"] for p in service["spec"]["ports"]] == [REDIS_PORT]
    assert (
        service["spec"]["selector"].items()
        <= redis["spec"]["template"]["metadata"]["labels"].items()
    )
    for kind, name in (
        ("Deployment", "coldstart-fusion"),
        ("StatefulSet", "coldstart-fusion-writer"),
    ):
        env = fusion_env(find(resources, kind, name))
        assert env["COLDSTART_FUSION_STATE_BACKEND"] == "redis"
        url = urlparse(env["COLDSTART_FUSION_REDIS_URL"])
        assert (url.hostname, url.port) == ("coldstart-redis", REDIS_PORT)


def test_writers_are_a_stateful_set_with_static_members_outside_the_service(
    rendered: Rendered,
) -> None:
    resources = rendered("overlays/redis")
    writers = find(resources, "StatefulSet", "coldstart-fusion-writer")
    env = fusion_env(writers)
    assert env["COLDSTART_FUSION_STATE_WRITER"] == "true"
    assert env["COLDSTART_FUSION_STATE_WRITER_INSTANCE"] == {
        "fieldRef": {"fieldPath": "metadata.name"}
    }
    assert writers["spec"]["replicas"] >= 2
    (container,) = writers["spec"]["template"]["spec"]["containers"]
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == {
        "grpc": PORTS["fusion"][0],
        "metrics": PORTS["fusion"][1],
    }
    labels = writers["spec"]["template"]["metadata"]["labels"]
    serving = find(resources, "Service", "coldstart-fusion")
    assert not serving["spec"]["selector"].items() <= labels.items()
    # The serving replicas do not write.
    assert "COLDSTART_FUSION_STATE_WRITER" not in fusion_env(
        find(resources, "Deployment", "coldstart-fusion")
    )


def test_the_writers_settings_load_and_validate(tmp_path: Path, rendered: Rendered) -> None:
    resources = rendered("overlays/redis")
    path = tmp_path / "coldstart.toml"
    path.write_text(config_map(resources, "coldstart-config")["data"]["coldstart.toml"])
    env = fusion_env(find(resources, "StatefulSet", "coldstart-fusion-writer"))
    environ = {k: v for k, v in env.items() if isinstance(v, str)}
    environ["COLDSTART_FUSION_STATE_WRITER_INSTANCE"] = "coldstart-fusion-writer-0"
    settings = load_settings(FusionSettings, "fusion", config_file=path, environ=environ)
    assert settings.state_backend == "redis" and settings.state_writer
    assert settings.state_writer_instance == "coldstart-fusion-writer-0"
    assert settings.kafka_bootstrap

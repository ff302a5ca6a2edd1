"""Every metric the alerting rules and the Grafana dashboard query is one the
services really export: each service runs as a real process (as
`coldstart serve <name>` runs in its pod) and its /metrics is scraped."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from k8s.tools import monitoring
from services.common.metrics import free_port
from services.common.paths import cache_dir
from tests.support.processes import ServiceProcess, coldstart_command, running_service

pytestmark = pytest.mark.integration

RUNTIME_METRICS = (
    "coldstart_grpc_server_handled_total",
    "coldstart_grpc_server_handling_seconds_bucket",
    "coldstart_grpc_server_in_flight",
    "coldstart_build_info",
    "coldstart_service_ready",
)
# Labels Prometheus adds to every series of a target (ServiceMonitor / scrape config).
TARGET_LABELS = frozenset({"namespace", "pod", "job", "instance", "container", "endpoint", "app"})


def queries() -> list[str]:
    rules = [r["expr"] for r in monitoring.iter_rules(monitoring.load_rules())]
    board = json.loads(monitoring.DASHBOARD_FILE.read_text())
    return rules + [
        monitoring.substitute_grafana_variables(q) for q in monitoring.dashboard_queries(board)
    ]


def queried_names() -> set[str]:
    return {
        n for q in queries() for n in monitoring.metric_names(q)
    } - monitoring.PROMETHEUS_SYNTHETIC


def owner(name: str) -> str:
    """The service whose process exports ``name`` ('*' = every service)."""
    if name in RUNTIME_METRICS:
        return "*"
    parts = name.split("_")
    assert parts[0] == "coldstart", name
    return parts[1]


def scrape(service: ServiceProcess) -> dict[str, Any]:
    url = f"http://127.0.0.1:{service.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as reply:
        text = reply.read().decode()
    return {family.name: family for family in text_string_to_metric_families(text)}


def exported(families: dict[str, Any], name: str) -> Any:
    """The family that makes series called ``name``, or None."""
    for family in families.values():
        if any(sample.name == name for sample in family.samples):
            return family
    suffixes = {
        "counter": ("_total",),
        "histogram": ("_bucket", "_sum", "_count"),
        "summary": ("_sum", "_count"),
        "gauge": ("",),
        "info": ("_info",),
        "unknown": ("",),
    }
    for family in families.values():
        if any(family.name + s == name for s in suffixes.get(family.type, ())):
            return family
    return None


def check_service(service: str, process: ServiceProcess) -> None:
    families = scrape(process)
    wanted = sorted(n for n in queried_names() if owner(n) in {service, "*"})
    missing = [n for n in wanted if exported(families, n) is None]
    assert not missing, f"{service} does not export {missing}"
    # Label names used in matchers exist on the series, where there are series.
    import promql_parser

    for expr in queries():
        for name, labels in _matchers(promql_parser.parse(expr)):
            if name in monitoring.PROMETHEUS_SYNTHETIC:
                continue
            family = exported(families, name) if owner(name) in {service, "*"} else None
            samples = [s for s in family.samples if s.name == name] if family else []
            if not samples:
                continue
            have = set().union(*(s.labels.keys() for s in samples))
            unknown = set(labels) - have - TARGET_LABELS - {"__name__"}
            assert not unknown, f"{name}: labels {unknown} not on {service}'s series ({expr})"


def _matchers(node: Any) -> Iterator[tuple[str, list[str]]]:
    import promql_parser

    if isinstance(node, promql_parser.VectorSelector):
        yield node.name or "", [m.name for m in node.matchers.matchers]
        return
    if isinstance(node, promql_parser.MatrixSelector):
        yield from _matchers(node.vector_selector)
        return
    if isinstance(node, promql_parser.Call):
        for argument in node.args:
            yield from _matchers(argument)
        return
    for attribute in ("lhs", "rhs", "expr", "param"):
        child = getattr(node, attribute, None)
        if child is not None:
            yield from _matchers(child)


def test_every_queried_metric_has_an_owner() -> None:
    owners = {owner(n) for n in queried_names()}
    assert owners <= {"*", "gateway", "encoder", "fusion", "trainer"}, owners


def test_runtime_metrics_via_echo(tmp_path: Path) -> None:
    with running_service("echo", tmp_path) as echo:
        check_service("echo", echo)
        families = scrape(echo)
    # The check can fail: a name no family makes is not found.
    assert exported(families, "coldstart_grpc_server_handled_total") is not None
    assert exported(families, "coldstart_grpc_server_handling_seconds_bucket") is not None
    assert exported(families, "coldstart_grpc_server_handled_bucket") is None
    assert exported(families, "coldstart_echo_nonexistent_total") is None


def test_gateway_exports_what_is_queried(tmp_path: Path) -> None:
    dead = free_port()  # broker, encoder and fusion down: the gateway still starts
    settings = {
        "kafka_bootstrap": f"127.0.0.1:{dead}",
        "encoder_address": f"127.0.0.1:{dead}",
        "fusion_address": f"127.0.0.1:{dead}",
        "registry_dir": tmp_path / "registry",
        "auth_tokens": "k8s-test:token",
    }
    with running_service("gateway", tmp_path / "logs", settings) as gateway:
        check_service("gateway", gateway)


def test_fusion_exports_what_is_queried(tmp_path: Path) -> None:
    from services.common.registry import ModelRegistry
    from services.fusion.synthetic import publish_version

    registry = ModelRegistry(tmp_path / "registry")
    publish_version(registry, n_items=200, seed=0)
    settings: dict[str, object] = {
        "registry_dir": registry.root,
        "snapshot_dir": tmp_path / "snapshots",
    }
    with running_service("fusion", tmp_path / "logs", settings) as fusion:
        check_service("fusion", fusion)


def test_trainer_exports_what_is_queried(tmp_path: Path) -> None:
    settings = {
        "consume": "false",  # no broker needed to start and be scraped
        "kafka_bootstrap": f"127.0.0.1:{free_port()}",
        "log_dir": tmp_path / "log",
        "registry_dir": tmp_path / "registry",
    }
    with running_service("trainer", tmp_path / "logs", settings) as trainer:
        check_service("trainer", trainer)


def exported_encoder() -> Path:
    """An encoder registry with the default model exported (cached: ~1 min once)."""
    import subprocess

    root = cache_dir() / "k8s-tests" / "encoder-registry"
    if (root / "CURRENT").is_file():
        return root
    result = subprocess.run(
        coldstart_command("export", "encoder", "--registry-dir", str(root)),
        check=False,
        capture_output=True,
        text=True,
        timeout=400,
    )
    if result.returncode != 0:
        pytest.skip(
            f"encoder: `coldstart export encoder` failed, cannot start it: {result.stderr[-500:]}"
        )
    return root


@pytest.mark.slow
def test_encoder_exports_what_is_queried(tmp_path: Path) -> None:
    settings = {"registry_dir": exported_encoder(), "intra_op_threads": 1}
    with running_service("encoder", tmp_path / "logs", settings, timeout_s=120) as encoder:
        check_service("encoder", encoder)

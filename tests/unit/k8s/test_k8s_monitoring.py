"""Alerting rules and the dashboard: they parse, agree with their generated
copies, cover what issue 9 asks for, and query metrics defined in services/."""

from __future__ import annotations

import json
import re

import pytest

from k8s.tools import monitoring
from services.common.paths import REPO_ROOT


def all_queries() -> list[str]:
    rules = [r["expr"] for r in monitoring.iter_rules(monitoring.load_rules())]
    panels = monitoring.dashboard_queries(json.loads(monitoring.DASHBOARD_FILE.read_text()))
    return rules + [monitoring.substitute_grafana_variables(q) for q in panels]


def test_generated_files_are_in_sync() -> None:
    assert monitoring.main(["--check"]) == 0


def test_every_expression_parses() -> None:
    import promql_parser

    for expr in all_queries():
        promql_parser.parse(expr)
    with pytest.raises(ValueError):
        promql_parser.parse("sum(rate(coldstart_grpc_server_handled_total[5m])")


def test_rules_are_well_formed_alerts() -> None:
    rules = list(monitoring.iter_rules(monitoring.load_rules()))
    names = [r["alert"] for r in rules]
    assert len(names) == len(set(names))
    for rule in rules:
        assert set(rule) <= {"alert", "expr", "for", "labels", "annotations", "keep_firing_for"}
        assert rule["labels"]["severity"] in {"critical", "warning"}
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]
        if "for" in rule:
            assert re.fullmatch(r"\d+[smh]", rule["for"])


def test_rules_cover_issue_9() -> None:
    by_metric: dict[str, set[str]] = {}
    for rule in monitoring.iter_rules(monitoring.load_rules()):
        for name in monitoring.metric_names(rule["expr"]):
            by_metric.setdefault(name, set()).add(rule["alert"])
    expressions = {r["alert"]: r["expr"] for r in monitoring.iter_rules(monitoring.load_rules())}
    assert "coldstart_grpc_server_handled_total" in by_metric  # error rate
    assert "histogram_quantile(0.99" in expressions["ColdstartHighLatencyP99"]  # p99 latency
    assert "coldstart_trainer_consumer_lag" in by_metric  # consumer lag
    assert 'outcome="failed"' in expressions["ColdstartTrainingRunFailed"]
    assert 'outcome="gated"' in expressions["ColdstartTrainingGatedOut"]
    assert "coldstart_gateway_degraded_responses_total" in by_metric  # degraded answers


def test_plain_scrape_config_keeps_coldstart_pods_metrics_ports() -> None:
    import yaml

    config = yaml.safe_load(
        (monitoring.MONITORING_DIR / "prometheus" / "scrape-config.yaml").read_text()
    )
    (job,) = config["scrape_configs"]
    assert job["honor_labels"] is True
    keeps = {
        (tuple(r["source_labels"]), r["regex"])
        for r in job["relabel_configs"]
        if r.get("action") == "keep"
    }
    assert (("__meta_kubernetes_pod_label_app_kubernetes_io_part_of",), "coldstart") in keeps
    assert (("__meta_kubernetes_pod_container_port_name",), "metrics") in keeps


def test_dashboard_has_panels_with_queries() -> None:
    document = json.loads(monitoring.DASHBOARD_FILE.read_text())
    assert document["uid"] == "coldstart-overview"
    ids = [p["id"] for p in document["panels"]]
    assert len(ids) == len(set(ids)) and len(ids) >= 10
    for panel in document["panels"]:
        assert panel["targets"], panel["title"]


# Prometheus-side suffixes of the families prometheus_client defines.
_SUFFIXES = ("_total", "_bucket", "_sum", "_count", "_created", "_info")


def _family(name: str) -> str:
    for suffix in _SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def test_queried_metrics_are_defined_in_the_services_source() -> None:
    """Static twin of tests/integration/test_k8s_metrics.py: every queried metric
    is a name some prometheus_client metric in services/ defines."""
    source = "\n".join(p.read_text() for p in (REPO_ROOT / "services").rglob("*.py"))
    defined = set(re.findall(r'"(coldstart_[a-z0-9_]+)"', source))
    families = {_family(d) for d in defined} | defined
    missing = sorted(
        name
        for expr in all_queries()
        for name in monitoring.metric_names(expr)
        if name not in monitoring.PROMETHEUS_SYNTHETIC and _family(name) not in families
    )
    assert not missing, f"queried but defined nowhere in services/: {missing}"

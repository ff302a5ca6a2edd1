"""The monitoring tree as kustomize renders it: the PrometheusRule carries the
rules file, the ServiceMonitors select the services' metrics ports, the
dashboard ConfigMap carries the dashboard (the sources are checked by
tests/unit/k8s/test_k8s_monitoring.py)."""

from __future__ import annotations

import json

import pytest

from k8s.tools import monitoring
from tests.integration.k8s.k8s_support import Rendered, find

pytestmark = pytest.mark.integration


def test_prometheus_rule_carries_the_rules_file(rendered: Rendered) -> None:
    rule = find(rendered("monitoring"), "PrometheusRule", "coldstart")
    assert rule["spec"]["groups"] == monitoring.load_rules()["groups"]


def test_service_monitors_scrape_every_service_and_keep_its_service_label(
    rendered: Rendered,
) -> None:
    resources = rendered("monitoring")
    for service in ("gateway", "encoder", "fusion", "trainer"):
        monitor = find(resources, "ServiceMonitor", f"coldstart-{service}")
        service_object = find(rendered("overlays/cpu"), "Service", f"coldstart-{service}")
        assert (
            monitor["spec"]["selector"]["matchLabels"].items()
            <= service_object["metadata"]["labels"].items()
        )
        (endpoint,) = monitor["spec"]["endpoints"]
        assert endpoint["port"] == "metrics"
        assert "metrics" in {p["name"] for p in service_object["spec"]["ports"]}
        # The exported "service" label must not become exported_service.
        assert endpoint["honorLabels"] is True
    dashboard = find(resources, "ConfigMap", "coldstart-grafana-dashboard")
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(dashboard["data"]["coldstart.json"]) == monitoring.dashboard()

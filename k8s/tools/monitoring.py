"""Generated monitoring files, and the PromQL helpers the tests use.

``rules/coldstart-alerts.yaml`` (a plain Prometheus rules file) is the source
of the alerting rules; ``prometheusrule.yaml`` wraps the same groups for the
Prometheus Operator, and ``grafana/coldstart.json`` is the Grafana dashboard.
``python -m k8s.tools.monitoring --write`` regenerates both;
``--check`` fails when a committed copy differs from what would be generated.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

MONITORING_DIR = Path(__file__).resolve().parents[1] / "monitoring"
RULES_FILE = MONITORING_DIR / "rules" / "coldstart-alerts.yaml"
PROMETHEUS_RULE_FILE = MONITORING_DIR / "prometheusrule.yaml"
DASHBOARD_FILE = MONITORING_DIR / "grafana" / "coldstart.json"

# Metrics Prometheus makes itself for every target; no service exports them.
PROMETHEUS_SYNTHETIC = frozenset({"up", "scrape_duration_seconds", "scrape_samples_scraped"})
# What Grafana template variables stand for when a query is parsed.
GRAFANA_SUBSTITUTIONS = {
    "$__rate_interval": "5m",
    "$__interval": "1m",
    "${datasource}": "",
    "$namespace": "coldstart",
    "$service": "gateway",
}


def load_rules(path: Path = RULES_FILE) -> dict[str, Any]:
    document = yaml.safe_load(path.read_text())
    if not isinstance(document, dict) or not isinstance(document.get("groups"), list):
        raise ValueError(f"{path}: a rules file is a mapping with a list of groups")
    return document


def iter_rules(document: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for group in document["groups"]:
        yield from group["rules"]


def prometheus_rule(document: dict[str, Any]) -> dict[str, Any]:
    """The PrometheusRule (monitoring.coreos.com/v1) carrying ``document``'s groups."""
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {
            "name": "coldstart",
            "labels": {
                "app.kubernetes.io/part-of": "coldstart",
                # The label kube-prometheus-stack's Prometheus selects rules by.
                "release": "prometheus",
            },
        },
        "spec": {"groups": document["groups"]},
    }


def _panel(
    panel_id: int,
    title: str,
    targets: list[tuple[str, str]],
    unit: str,
    x: int,
    y: int,
    *,
    description: str = "",
) -> dict[str, Any]:
    return {
        "id": panel_id,
        "type": "timeseries",
        "title": title,
        "description": description,
        "datasource": {"type": "prometheus", "uid": "${datasource}"},
        "gridPos": {"h": 8, "w": 12, "x": x, "y": y},
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "options": {"legend": {"displayMode": "list", "placement": "bottom"}},
        "targets": [
            {
                "refId": chr(ord("A") + i),
                "expr": expr,
                "legendFormat": legend,
                "datasource": {"type": "prometheus", "uid": "${datasource}"},
            }
            for i, (expr, legend) in enumerate(targets)
        ],
    }


NS = 'namespace=~"$namespace"'
PANELS: list[tuple[str, list[tuple[str, str]], str, str]] = [
    (
        "Requests per second",
        [
            (
                f'sum by (service, method) (rate(coldstart_grpc_server_handled_total{{{NS}, method!~"Check|Watch"}}[$__rate_interval]))',
                "{{service}} {{method}}",
            )
        ],
        "reqps",
        "RPCs answered, by service and method (health checks excluded).",
    ),
    (
        "Server-side error ratio",
        [
            (
                f'sum by (service) (rate(coldstart_grpc_server_handled_total{{{NS}, code=~"INTERNAL|UNKNOWN|UNAVAILABLE|DEADLINE_EXCEEDED|DATA_LOSS|UNIMPLEMENTED"}}[$__rate_interval])) / sum by (service) (rate(coldstart_grpc_server_handled_total{{{NS}}}[$__rate_interval]))',
                "{{service}}",
            )
        ],
        "percentunit",
        "Share of RPCs ending with a server-side error code (alert at 1%).",
    ),
    (
        "Latency p50 / p99",
        [
            (
                f'histogram_quantile(0.5, sum by (service, le) (rate(coldstart_grpc_server_handling_seconds_bucket{{{NS}, method!~"Check|Watch"}}[$__rate_interval])))',
                "p50 {{service}}",
            ),
            (
                f'histogram_quantile(0.99, sum by (service, le) (rate(coldstart_grpc_server_handling_seconds_bucket{{{NS}, method!~"Check|Watch"}}[$__rate_interval])))',
                "p99 {{service}}",
            ),
        ],
        "s",
        "Server-side handling time (alert when p99 > 500 ms).",
    ),
    (
        "In flight and ready pods",
        [
            (
                f"sum by (service) (coldstart_grpc_server_in_flight{{{NS}}})",
                "in flight {{service}}",
            ),
            (f"sum by (service) (coldstart_service_ready{{{NS}}})", "ready pods {{service}}"),
        ],
        "short",
        "",
    ),
    (
        "Gateway: degraded answers and downstream calls",
        [
            (
                f"sum(rate(coldstart_gateway_degraded_responses_total{{{NS}}}[$__rate_interval]))",
                "degraded answers",
            ),
            (
                f"sum by (target, code) (rate(coldstart_gateway_downstream_calls_total{{{NS}}}[$__rate_interval]))",
                "{{target}} {{code}}",
            ),
        ],
        "reqps",
        "Fallback answers served because fusion failed, and the gateway's calls to encoder and fusion.",
    ),
    (
        "Gateway: events produced",
        [
            (
                f"sum by (kind) (rate(coldstart_gateway_events_produced_total{{{NS}}}[$__rate_interval]))",
                "{{kind}}",
            )
        ],
        "ops",
        "",
    ),
    (
        "Encoder: batches and cache",
        [
            (
                f"sum(rate(coldstart_encoder_batch_size_sum{{{NS}}}[$__rate_interval])) / sum(rate(coldstart_encoder_batch_size_count{{{NS}}}[$__rate_interval]))",
                "texts per batch",
            ),
            (
                f"sum(rate(coldstart_encoder_cache_hits_total{{{NS}}}[$__rate_interval])) / (sum(rate(coldstart_encoder_cache_hits_total{{{NS}}}[$__rate_interval])) + sum(rate(coldstart_encoder_cache_misses_total{{{NS}}}[$__rate_interval])))",
                "cache hit ratio",
            ),
        ],
        "short",
        "",
    ),
    (
        "Encoder: inference and queue wait p99",
        [
            (
                f"histogram_quantile(0.99, sum by (le) (rate(coldstart_encoder_inference_seconds_bucket{{{NS}}}[$__rate_interval])))",
                "inference p99",
            ),
            (
                f"histogram_quantile(0.99, sum by (le) (rate(coldstart_encoder_queue_wait_seconds_bucket{{{NS}}}[$__rate_interval])))",
                "queue wait p99",
            ),
        ],
        "s",
        "",
    ),
    (
        "Fusion: model and online state",
        [
            (f"max by (version) (coldstart_fusion_model_info{{{NS}}})", "serving {{version}}"),
            (
                f"sum(increase(coldstart_fusion_model_swaps_total{{{NS}}}[$__rate_interval]))",
                "swaps",
            ),
            (f"max(coldstart_fusion_online_users{{{NS}}})", "online users"),
        ],
        "short",
        "The model version each fusion pod serves, swaps, and the users held online.",
    ),
    (
        "Fusion: events applied",
        [
            (
                f"sum by (kind) (rate(coldstart_fusion_events_applied_total{{{NS}}}[$__rate_interval]))",
                "{{kind}}",
            )
        ],
        "ops",
        "",
    ),
    (
        "Trainer: consumer lag",
        [(f"max(coldstart_trainer_consumer_lag{{{NS}}})", "lag (messages)")],
        "short",
        "Messages behind the end of the events topic (alert above 100k for 15 min).",
    ),
    (
        "Trainer: retraining runs and recall@20",
        [
            (
                f"sum by (outcome) (increase(coldstart_trainer_runs_total{{{NS}}}[1h]))",
                "runs {{outcome}} (1h)",
            ),
            (
                f"max by (model) (coldstart_trainer_evaluation_recall_at_20{{{NS}}})",
                "recall@20 {{model}}",
            ),
        ],
        "short",
        "Runs published, gated out (not better than the current version) or failed.",
    ),
]


def dashboard() -> dict[str, Any]:
    panels = [
        _panel(i + 1, title, targets, unit, (i % 2) * 12, (i // 2) * 8, description=description)
        for i, (title, targets, unit, description) in enumerate(PANELS)
    ]
    return {
        "uid": "coldstart-overview",
        "title": "coldstart",
        "tags": ["coldstart"],
        "timezone": "browser",
        "schemaVersion": 39,
        "version": 1,
        "editable": True,
        "refresh": "30s",
        "time": {"from": "now-6h", "to": "now"},
        "templating": {
            "list": [
                {
                    "name": "datasource",
                    "label": "Data source",
                    "type": "datasource",
                    "query": "prometheus",
                },
                {
                    "name": "namespace",
                    "label": "Namespace",
                    "type": "query",
                    "datasource": {"type": "prometheus", "uid": "${datasource}"},
                    "query": "label_values(coldstart_service_ready, namespace)",
                    "refresh": 2,
                    "includeAll": False,
                    "multi": False,
                },
            ]
        },
        "annotations": {"list": []},
        "panels": panels,
    }


def dashboard_queries(document: dict[str, Any]) -> list[str]:
    """Every PromQL expression of a dashboard (panel targets and variable queries)."""
    queries = [t["expr"] for p in document.get("panels", []) for t in p.get("targets", [])]
    for variable in document.get("templating", {}).get("list", []):
        query = variable.get("query", "")
        match = re.fullmatch(r"label_values\((.+),\s*\w+\)", str(query))
        if match:
            queries.append(match.group(1))
    return queries


def substitute_grafana_variables(expr: str) -> str:
    for variable, value in GRAFANA_SUBSTITUTIONS.items():
        expr = expr.replace(variable, value)
    if "$" in expr:
        raise ValueError(f"unknown Grafana variable in {expr!r}")
    return expr


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (parsed with promql-parser)."""
    import promql_parser

    names: set[str] = set()

    def walk(node: Any) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            if node.name:
                names.add(node.name)
            for matcher in node.matchers.matchers:
                if matcher.name == "__name__":
                    names.add(matcher.value)
            return
        if isinstance(node, promql_parser.MatrixSelector):
            walk(node.vector_selector)
            return
        if isinstance(node, promql_parser.Call):
            for argument in node.args:
                walk(argument)
            return
        for attribute in ("lhs", "rhs", "expr", "param"):
            child = getattr(node, attribute, None)
            if child is not None:
                walk(child)

    walk(promql_parser.parse(expr))
    return names


class _BlockDumper(yaml.SafeDumper):
    """Writes multi-line strings (PromQL) as literal blocks."""


def _represent_str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_BlockDumper.add_representer(str, _represent_str)


def rendered_files() -> dict[Path, str]:
    rules = load_rules()
    header = (
        "# Generated by `python -m k8s.tools.monitoring --write` from\n"
        "# rules/coldstart-alerts.yaml: edit that file, not this one.\n"
    )
    return {
        PROMETHEUS_RULE_FILE: header
        + yaml.dump(
            prometheus_rule(rules),
            Dumper=_BlockDumper,
            sort_keys=False,
            width=100,
            allow_unicode=True,
        ),
        DASHBOARD_FILE: json.dumps(dashboard(), indent=2) + "\n",
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m k8s.tools.monitoring", description=__doc__)
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--write", action="store_true", help="regenerate the files")
    action.add_argument("--check", action="store_true", help="fail if a file is stale")
    args = parser.parse_args(argv)
    stale = []
    for path, text in rendered_files().items():
        if args.write:
            path.write_text(text)
        elif not path.exists() or path.read_text() != text:
            stale.append(str(path))
    if stale:
        print(f"monitoring: stale, run --write: {', '.join(stale)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

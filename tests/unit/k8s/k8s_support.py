"""Rendered manifests of k8s/, shared by the k8s unit tests (rendered once)."""

from __future__ import annotations

import copy
import functools
from typing import Any

import yaml

from k8s.tools.kustomize import render
from services.common.paths import REPO_ROOT

K8S = REPO_ROOT / "k8s"
TREES = ("overlays/cpu", "overlays/gpu", "monitoring", "kafka")
SERVING = ("gateway", "encoder", "fusion")
SERVICES = ("gateway", "encoder", "fusion", "trainer")
# The ports issue 9 fixed for each service: (gRPC, metrics).
PORTS = {
    "gateway": (50050, 9100),
    "encoder": (50051, 9101),
    "fusion": (50052, 9102),
    "trainer": (50053, 9103),
}


@functools.cache
def _rendered(tree: str) -> tuple[Any, ...]:
    return tuple(render(K8S / tree))


def rendered(tree: str) -> list[dict[str, Any]]:
    """The resources of one kustomization (a fresh copy the caller may change)."""
    return copy.deepcopy(list(_rendered(tree)))


def find(resources: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    for resource in resources:
        if resource["kind"] == kind and resource["metadata"]["name"] == name:
            return resource
    raise KeyError(f"{kind}/{name} not rendered")


def config_map(resources: list[dict[str, Any]], prefix: str) -> dict[str, Any]:
    matches = [
        r
        for r in resources
        if r["kind"] == "ConfigMap" and r["metadata"]["name"].startswith(prefix + "-")
    ]
    assert len(matches) == 1, f"one ConfigMap {prefix}-<hash> expected, got {len(matches)}"
    return matches[0]


def retrain_job(tree: str) -> dict[str, Any]:
    """The retraining PyTorchJob template of an overlay, filled as the launcher fills it."""
    from k8s.tools.pytorchjob_launcher import build_job

    template = yaml.safe_load(
        config_map(rendered(tree), "coldstart-config")["data"]["retrain-pytorchjob.yaml"]
    )
    return build_job(
        template,
        run_id="20260101-000000-abc",
        workers=4,
        data="/var/lib/coldstart/shared/runs/r1/data",
        registry="/var/lib/coldstart/shared/runs/r1/registry",
        device="cuda" if "gpu" in tree else "cpu",
        namespace="coldstart",
        image="registry.example.com/coldstart:test",
    )

"""Manifests of k8s/ as the real kustomize renders them (the pinned binary of
services/common/gotools.py), shared by the k8s integration tests."""

from __future__ import annotations

import copy
import subprocess
from pathlib import Path
from typing import Any

import yaml

from services.common.paths import REPO_ROOT
from services.common.ports import DEFAULT_PORTS

K8S = REPO_ROOT / "k8s"
TREES = ("overlays/cpu", "overlays/gpu", "overlays/redis", "monitoring", "kafka")
SERVING = ("gateway", "encoder", "fusion")
SERVICES = ("gateway", "encoder", "fusion", "trainer")
# The ports issue 9 fixed for each service: (gRPC, metrics).
PORTS = {name: (ports.grpc, ports.metrics) for name, ports in DEFAULT_PORTS.items()}


def kustomize_build(kustomize: Path, folder: Path) -> list[dict[str, Any]]:
    """The resources ``kustomize build folder`` prints, parsed."""
    result = subprocess.run(
        [str(kustomize), "build", str(folder)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if result.returncode != 0:
        raise AssertionError(f"kustomize build {folder} failed: {result.stderr.strip()}")
    return [document for document in yaml.safe_load_all(result.stdout) if document is not None]


class Rendered:
    """``rendered(tree)``: the resources of one kustomization under k8s/, a fresh
    copy the caller may change; each tree is built once (the fixture that makes
    this lives for the session)."""

    def __init__(self, kustomize: Path) -> None:
        self.kustomize = kustomize
        self._built: dict[str, list[dict[str, Any]]] = {}

    def __call__(self, tree: str) -> list[dict[str, Any]]:
        if tree not in self._built:
            self._built[tree] = kustomize_build(self.kustomize, K8S / tree)
        return copy.deepcopy(self._built[tree])


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


def retrain_job(rendered: Rendered, tree: str) -> dict[str, Any]:
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

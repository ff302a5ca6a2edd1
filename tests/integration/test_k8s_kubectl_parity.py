"""The offline renderer (k8s/tools/kustomize.py) renders exactly what
`kubectl kustomize` renders, where kubectl is installed."""

from __future__ import annotations

import shutil
import subprocess

import pytest
import yaml

from k8s.tools.kustomize import render
from services.common.paths import REPO_ROOT

pytestmark = pytest.mark.integration

TREES = ("base", "overlays/cpu", "overlays/gpu", "monitoring", "kafka")


@pytest.mark.parametrize("tree", TREES)
def test_renderer_matches_kubectl_kustomize(tree: str) -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip(
            "kubectl is not installed: the offline renderer is checked by tests/unit/k8s only"
        )
    result = subprocess.run(
        [kubectl, "kustomize", str(REPO_ROOT / "k8s" / tree)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    expected = list(yaml.safe_load_all(result.stdout))
    assert render(REPO_ROOT / "k8s" / tree) == expected

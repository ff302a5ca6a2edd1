"""The k8s trees rendered by the pinned kustomize, once per session; tests that
ask for them skip (saying why) where the tool cannot be had."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.integration.k8s.k8s_support import Rendered


@pytest.fixture(scope="session")
def rendered(kustomize: Path) -> Rendered:
    return Rendered(kustomize)

"""A small synthetic registry shared by the fusion unit tests (written once)."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.common.registry import ModelRegistry
from services.fusion.synthetic import publish_version


@pytest.fixture(scope="session")
def synthetic_registry(tmp_path_factory: pytest.TempPathFactory) -> ModelRegistry:
    registry = ModelRegistry(tmp_path_factory.mktemp("registry"))
    publish_version(registry, n_items=1_000, seed=0)
    return registry


@pytest.fixture(scope="session")
def version_path(synthetic_registry: ModelRegistry) -> Path:
    version = synthetic_registry.current()
    assert version is not None
    return synthetic_registry.path(version)

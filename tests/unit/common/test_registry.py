from __future__ import annotations

from pathlib import Path

import pytest

from services.common.registry import ModelRegistry, RegistryError


def publish(registry: ModelRegistry, payload: str) -> str:
    manifest: dict[str, object] = {"payload": payload}
    with registry.stage(manifest) as folder:
        (folder / "model.txt").write_text(payload)
    version = str(manifest["version"])
    registry.set_current(version)
    return version


def test_staged_version_appears_complete_and_becomes_current(tmp_path: Path) -> None:
    registry = ModelRegistry(tmp_path)
    assert registry.current() is None
    first = publish(registry, "a")
    second = publish(registry, "b")
    assert registry.current() == second
    assert registry.versions() == [first, second]
    assert registry.manifest(second)["parent_version"] == first
    assert (registry.path(second) / "model.txt").read_text() == "b"


def test_failure_while_staging_leaves_no_version(tmp_path: Path) -> None:
    registry = ModelRegistry(tmp_path)
    with pytest.raises(RuntimeError, match="disk full"), registry.stage({}) as folder:
        (folder / "half.onnx").write_text("partial")
        raise RuntimeError("disk full")
    assert registry.versions() == []
    assert registry.current() is None
    assert list(registry.staging_dir.iterdir()) == []


def test_rollback_and_prune_keep_the_current_version(tmp_path: Path) -> None:
    registry = ModelRegistry(tmp_path)
    versions = [publish(registry, str(i)) for i in range(4)]
    assert registry.rollback() == (versions[2], versions[3])
    assert registry.current() == versions[2]
    pruned = registry.prune(keep=1)
    assert versions[2] not in pruned
    assert registry.versions() == [versions[2], versions[3]]
    with pytest.raises(RegistryError, match="not found"):
        registry.set_current("v-missing")


def test_clean_staging_removes_leftovers_of_a_dead_writer(tmp_path: Path) -> None:
    registry = ModelRegistry(tmp_path)
    leftover = registry.staging_dir / "dead"
    leftover.mkdir(parents=True)
    (leftover / "x").write_text("x")
    assert registry.clean_staging() == 1
    assert not leftover.exists()

"""The offline kustomize renderer (k8s/tools/kustomize.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from k8s.tools.kustomize import KustomizeError, config_map_hash, render, strategic_merge
from tests.unit.k8s.k8s_support import K8S, TREES, config_map, find, rendered


def write(path: Path, documents: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(documents, list):
        path.write_text(yaml.safe_dump_all(documents))
    else:
        path.write_text(yaml.safe_dump(documents))


DEPLOYMENT = {
    "apiVersion": "apps/v1",
    "kind": "Deployment",
    "metadata": {"name": "app"},
    "spec": {
        "template": {
            "spec": {
                "containers": [
                    {
                        "name": "app",
                        "image": "coldstart",
                        "env": [{"name": "A", "value": "1"}],
                        "envFrom": [{"configMapRef": {"name": "settings"}}],
                    }
                ],
                "volumes": [{"name": "config", "configMap": {"name": "settings"}}],
            }
        }
    },
}


@pytest.mark.parametrize("tree", TREES)
def test_every_tree_renders(tree: str) -> None:
    resources = rendered(tree)
    assert resources
    names = [(r["kind"], r["metadata"].get("namespace"), r["metadata"]["name"]) for r in resources]
    assert len(names) == len(set(names)), "duplicate resources"


def test_overlays_set_namespace_and_images() -> None:
    for tree, tag in (("overlays/cpu", "0.1.0-cpu"), ("overlays/gpu", "0.1.0-gpu")):
        resources = rendered(tree)
        assert {r["metadata"].get("namespace") for r in resources} == {"coldstart"}
        images = {
            c["image"]
            for r in resources
            if r["kind"] == "Deployment"
            for c in r["spec"]["template"]["spec"]["containers"]
        }
        assert images == {f"registry.example.com/coldstart:{tag}"}
        binding = find(resources, "RoleBinding", "coldstart-trainer")
        assert binding["subjects"][0]["namespace"] == "coldstart"


def test_generated_config_map_gets_a_content_hash_and_references_follow() -> None:
    resources = rendered("overlays/cpu")
    settings = config_map(resources, "coldstart-config")
    suffix = settings["metadata"]["name"].rsplit("-", 1)[1]
    assert suffix == config_map_hash(settings)
    for name in ("gateway", "encoder", "fusion", "trainer"):
        deployment = find(resources, "Deployment", f"coldstart-{name}")
        volumes = deployment["spec"]["template"]["spec"]["volumes"]
        assert {"name": "config", "configMap": {"name": settings["metadata"]["name"]}} in volumes
    # The GPU overlay merges its own job template: different data, different name.
    gpu = config_map(rendered("overlays/gpu"), "coldstart-config")
    assert gpu["metadata"]["name"] != settings["metadata"]["name"]
    assert gpu["data"]["coldstart.toml"] == settings["data"]["coldstart.toml"]


def test_config_map_hash_matches_kustomize_v5() -> None:
    # Values computed by `kubectl kustomize` (kustomize v5.5.0) for these data.
    assert config_map_hash({"data": {"y": "2"}}) == "786c7hbck9"
    data = {"coldstart.toml": '[gateway]\nport = 1\nname = "é"\n', "x": "<a&b>", "y": "2"}
    assert config_map_hash({"data": data}) == "mmc7mk64gc"


def test_generator_patch_namespace_and_image_in_a_small_tree(tmp_path: Path) -> None:
    base, overlay = tmp_path / "base", tmp_path / "overlay"
    write(base / "app.yaml", [DEPLOYMENT])
    (base / "s.toml").write_text("[x]\nport = 1\n")
    write(
        base / "kustomization.yaml",
        {
            "resources": ["app.yaml"],
            "configMapGenerator": [{"name": "settings", "files": ["app.toml=s.toml"]}],
        },
    )
    write(
        overlay / "patch.yaml",
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": "app"},
            "spec": {
                "template": {
                    "spec": {
                        "containers": [
                            {
                                "name": "app",
                                "env": [{"name": "B", "value": "2"}, {"name": "A", "value": "3"}],
                            }
                        ]
                    }
                }
            },
        },
    )
    write(
        overlay / "kustomization.yaml",
        {
            "namespace": "ns",
            "resources": ["../base"],
            "patches": [{"path": "patch.yaml"}],
            "images": [{"name": "coldstart", "newName": "reg/cs", "newTag": "1"}],
            "configMapGenerator": [
                {"name": "settings", "behavior": "merge", "literals": ["extra=yes"]}
            ],
        },
    )
    resources = render(overlay)
    settings = next(r for r in resources if r["kind"] == "ConfigMap")
    assert settings["data"] == {"app.toml": "[x]\nport = 1\n", "extra": "yes"}
    assert settings["metadata"] == {
        "name": f"settings-{config_map_hash(settings)}",
        "namespace": "ns",
    }
    app = next(r for r in resources if r["kind"] == "Deployment")
    container = app["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == "reg/cs:1"
    # Patched entries merge by name; new ones come first, as kustomize puts them.
    assert container["env"] == [{"name": "B", "value": "2"}, {"name": "A", "value": "3"}]
    assert container["envFrom"][0]["configMapRef"]["name"] == settings["metadata"]["name"]


def test_unsupported_fields_and_missing_targets_are_errors(tmp_path: Path) -> None:
    write(tmp_path / "a" / "kustomization.yaml", {"resources": [], "commonLabels": {"a": "b"}})
    with pytest.raises(KustomizeError, match="unsupported fields"):
        render(tmp_path / "a")
    write(tmp_path / "b" / "app.yaml", [DEPLOYMENT])
    write(
        tmp_path / "b" / "kustomization.yaml",
        {
            "resources": ["app.yaml"],
            "patches": [{"patch": "kind: Deployment\nmetadata:\n  name: nope\n"}],
        },
    )
    with pytest.raises(KustomizeError, match="matches no resource"):
        render(tmp_path / "b")
    write(tmp_path / "c" / "kustomization.yaml", {"resources": ["missing.yaml"]})
    with pytest.raises(KustomizeError, match="not found"):
        render(tmp_path / "c")


def test_strategic_merge_semantics() -> None:
    original = {
        "containers": [{"name": "a", "resources": {"limits": {"cpu": "1"}}, "args": ["x"]}],
        "tolerations": [{"key": "old"}],
        "drop": 1,
    }
    patch = {
        "containers": [
            {"name": "a", "resources": {"limits": {"nvidia.com/gpu": 1}}, "args": ["y"]}
        ],
        "tolerations": [{"key": "new"}],
        "drop": None,
    }
    assert strategic_merge(original, patch) == {
        # maps merge, plain lists (args, tolerations) are replaced, null deletes
        "containers": [
            {"name": "a", "resources": {"limits": {"cpu": "1", "nvidia.com/gpu": 1}}, "args": ["y"]}
        ],
        "tolerations": [{"key": "new"}],
    }
    deleted = strategic_merge(original, {"containers": [{"name": "a", "$patch": "delete"}]})
    assert deleted["containers"] == []


def test_cli_renders_an_overlay(capsys: pytest.CaptureFixture[str]) -> None:
    from k8s.tools.kustomize import main

    assert main([str(K8S / "overlays" / "cpu")]) == 0
    documents = list(yaml.safe_load_all(capsys.readouterr().out))
    assert documents == rendered("overlays/cpu")

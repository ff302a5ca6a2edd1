"""What the real kustomize makes of k8s/: every tree renders without duplicates,
the overlays set namespace and images, the generated settings carry a content
hash that every reference follows."""

from __future__ import annotations

import pytest

from tests.integration.k8s.k8s_support import TREES, Rendered, config_map, find

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("tree", TREES)
def test_every_tree_renders(tree: str, rendered: Rendered) -> None:
    resources = rendered(tree)
    assert resources
    names = [(r["kind"], r["metadata"].get("namespace"), r["metadata"]["name"]) for r in resources]
    assert len(names) == len(set(names)), "duplicate resources"


def test_overlays_set_namespace_and_images(rendered: Rendered) -> None:
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


def test_generated_config_map_gets_a_content_hash_and_references_follow(
    rendered: Rendered,
) -> None:
    resources = rendered("overlays/cpu")
    settings = config_map(resources, "coldstart-config")
    suffix = settings["metadata"]["name"].removeprefix("coldstart-config-")
    assert suffix and suffix.isalnum()
    for name in ("gateway", "encoder", "fusion", "trainer"):
        deployment = find(resources, "Deployment", f"coldstart-{name}")
        volumes = deployment["spec"]["template"]["spec"]["volumes"]
        assert {"name": "config", "configMap": {"name": settings["metadata"]["name"]}} in volumes
    # The GPU overlay merges its own job template: different data, different name.
    gpu = config_map(rendered("overlays/gpu"), "coldstart-config")
    assert gpu["metadata"]["name"] != settings["metadata"]["name"]
    assert gpu["data"]["coldstart.toml"] == settings["data"]["coldstart.toml"]
